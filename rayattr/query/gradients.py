"""Test gradients of query texts at a run's final model, in the run's projected space."""

from __future__ import annotations

import pyarrow as pa
import torch

from rayattr.config import Config
from rayattr.data import load_tokenizer
from rayattr.query.texts import Notice, check_texts
from rayattr.model.gradients import final_model, text_gradients
from rayattr.store import Run


def query_gradients(run: Run, texts: list[str], cfg: Config | None = None,
                    model: torch.nn.Module | None = None, batch_size: int = 32
                    ) -> tuple[dict[str, torch.Tensor], list[Notice]]:
    """Projected gradient (Q, p) per layer of each text's own loss, and notices about the texts.

    Reuses the reducer's text_gradients, so queries are scored exactly like validation data.
    """
    cfg = cfg or Config.from_dict(run.manifest["config"])
    notices = check_texts(texts, load_tokenizer(cfg.data.tokenizer), cfg.data.seq_len)
    table = pa.table({"id": pa.array(range(len(texts)), pa.int64()),
                      "source": pa.array(["query"] * len(texts), pa.string()),
                      "text": pa.array(texts, pa.string())})
    model = model if model is not None else final_model(run, cfg)
    grads = text_gradients(run, table, batch_size=batch_size, cfg=cfg, model=model)
    return grads, notices
