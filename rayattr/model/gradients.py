"""Projected gradients of texts at a run's final model: the test side of every influence score.

The same projection matrices as training are regenerated from the run's recorded spec, so a
test gradient lives in the same space as the stored embeddings.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from safetensors.torch import load

from rayattr.capture import GradientCapture, ProjectionSpec, per_sample_loss
from rayattr.config import Config
from rayattr.data import TokenizedDataset, load_tokenizer
from rayattr.store import Run
from rayattr.model.build import build_model
from rayattr.model.loss import SAMPLE_LOSS_REDUCTION, logits_of
from rayattr.model.limits import VALIDATION_ROWS
from rayattr.store.layout import FINAL_WEIGHTS, VALIDATION_DATA


def final_model(run: Run, cfg: Config | None = None) -> torch.nn.Module:
    cfg = cfg or Config.from_dict(run.manifest["config"])
    tok = load_tokenizer(cfg.data.tokenizer)
    model = build_model(cfg.model, tok.vocab_size, cfg.data.seq_len, seed=cfg.train.seed)
    model.load_state_dict(load(run.read_bytes(FINAL_WEIGHTS)))
    return model.float().eval()


def text_gradients(run: Run, table: pa.Table, batch_size: int = 32, cfg: Config | None = None,
                   model: torch.nn.Module | None = None, device: str | torch.device = "cpu"
                   ) -> dict[str, torch.Tensor]:
    """Per-sample projected gradients (N, p) per layer of each text's own loss at the final model
    (computed on `device`, returned on the CPU).

    `table` has id, source, text columns; a sample's loss is the mean of its token losses,
    as in training.
    """
    cfg = cfg or Config.from_dict(run.manifest["config"])
    model = (model if model is not None else final_model(run, cfg)).to(device)
    data = TokenizedDataset(table, load_tokenizer(cfg.data.tokenizer), cfg.data.seq_len)
    spec = ProjectionSpec.from_dict(run.manifest["projection"])
    cap = GradientCapture(model, projection=spec, layers=cfg.capture.layers)
    params = [p for p in model.parameters() if p.requires_grad]
    out: dict[str, list[torch.Tensor]] = {}
    for a in range(0, len(data), batch_size):
        b = {k: v.to(device) for k, v in data.batch(np.arange(a, min(len(data), a + batch_size))).items()}
        with cap:
            cap.set_mask(b["attention_mask"])
            logits = logits_of(model, b["input_ids"], b["attention_mask"])
            losses = per_sample_loss(logits[:, :-1].float(), b["labels"][:, 1:],
                                     reduction=SAMPLE_LOSS_REDUCTION)
            torch.autograd.grad(losses.sum(), params, allow_unused=True)
        for n, g in cap.gradients().items():
            out.setdefault(n, []).append(g.cpu())
    return {n: torch.cat(v) for n, v in out.items()}


def validation_gradient(run: Run) -> dict[str, torch.Tensor]:
    """Gradient of the mean validation loss at the final model (the values' test point)."""
    grads = text_gradients(run, run.read_table(VALIDATION_DATA))
    return {n: g.double().mean(0) for n, g in grads.items()}


def shard_rows(n_rows: int, shard: int, n_shards: int) -> tuple[int, int]:
    """Rows [start, end) of one of n_shards near-equal contiguous shards."""
    if not 0 <= shard < n_shards:
        raise ValueError(f"shard {shard} is not in [0, {n_shards})")
    return n_rows * shard // n_shards, n_rows * (shard + 1) // n_shards


def validation_gradient_sum(run: Run, shard: int, n_shards: int, device: str | torch.device = "cpu"
                            ) -> tuple[dict[str, torch.Tensor], int]:
    """(Σ of the per-sample gradients in float64, rows) over one shard of the validation set:
    shards summed and divided by the total rows give validation_gradient (the loss is a mean
    over samples, so its gradient is too). Only the shard's rows are read (the row groups
    holding each slice of VALIDATION_ROWS), tokenised and run."""
    with run.open_read(VALIDATION_DATA) as f:
        pf = pq.ParquetFile(f)
        a, b = shard_rows(pf.metadata.num_rows, shard, n_shards)
        if b == a:
            return {}, 0
        cfg = Config.from_dict(run.manifest["config"])
        model = final_model(run, cfg)
        sums: dict[str, torch.Tensor] = {}
        for rows in row_slices(pf, a, b, VALIDATION_ROWS):  # the per-sample rows of one slice at a time
            grads = text_gradients(run, rows, cfg=cfg, model=model, device=device)
            for n, g in grads.items():
                sums[n] = sums[n] + g.double().sum(0) if n in sums else g.double().sum(0)
    return sums, b - a


def row_slices(pf: pq.ParquetFile, a: int, b: int, size: int) -> Iterator[pa.Table]:
    """Rows [a, b) of a Parquet file as tables of `size` rows (the last one shorter), each
    read from the row groups it overlaps only; a row group spanning several slices is read
    once and kept while they need it."""
    bounds = [0]
    for i in range(pf.metadata.num_row_groups):
        bounds.append(bounds[-1] + pf.metadata.row_group(i).num_rows)
    held: dict[int, pa.Table] = {}
    for s in range(a, b, size):
        e = min(b, s + size)
        need = [i for i in range(len(bounds) - 1) if bounds[i] < e and bounds[i + 1] > s]
        held = {i: held[i] if i in held else pf.read_row_group(i, use_threads=False) for i in need}
        yield pa.concat_tables([held[i] for i in need]).slice(s - bounds[need[0]], e - s)


def mean_of_sums(parts: list[tuple[dict[str, torch.Tensor], int]]) -> dict[str, torch.Tensor]:
    """The mean gradient from shards' (sums, rows), in float64."""
    rows = sum(n for _, n in parts)
    if rows == 0:
        raise ValueError("the validation set has no rows")
    total: dict[str, torch.Tensor] = {}
    for sums, _ in parts:
        for name, g in sums.items():
            total[name] = total[name] + g if name in total else g.clone()
    return {name: g / rows for name, g in total.items()}


@torch.no_grad()
def mean_loss(model: torch.nn.Module, data: TokenizedDataset, batch_size: int = 64) -> float:
    """Mean over `data`'s samples of each sample's own loss: the validation loss whose change
    the values predict (accumulated in float64)."""
    device = next(model.parameters()).device
    total = 0.0
    for a in range(0, len(data), batch_size):
        b = data.batch(np.arange(a, min(len(data), a + batch_size)))
        ids, mask = b["input_ids"].to(device), b["attention_mask"].to(device)
        logits = logits_of(model, ids, mask)
        losses = per_sample_loss(logits[:, :-1].float(), b["labels"][:, 1:].to(device),
                                 reduction=SAMPLE_LOSS_REDUCTION)
        total += float(losses.double().sum())
    return total / len(data)
