"""One run at a glance (`rayattr show`, the report): status, config, timings, counts, loss.

Reads run.json and the step records only (pyarrow, no torch), so it works on runs that are
still training or failed, and on runs whose intermediates were deleted by `rayattr gc`.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from rayattr.report.units import human_bytes
from rayattr.store import Run

STAGES = ("data", "train", "embed", "reduce")
SPARK = "▁▂▃▄▅▆▇█"


def loss_summary(records) -> dict[str, Any] | None:
    """First, last and lowest recorded training loss and the per-step series; None when the
    run recorded none (the training loop gave the Recorder no loss)."""
    pts = [(r.step, r.loss) for r in records if r.loss is not None]
    if not pts:
        return None
    steps, losses = zip(*pts)
    low = int(np.argmin(losses))
    return {"steps": list(steps), "loss": [float(v) for v in losses], "first": float(losses[0]),
            "last": float(losses[-1]), "min": float(losses[low]), "min_step": int(steps[low]),
            "first_step": int(steps[0]), "last_step": int(steps[-1])}


def sparkline(values: list[float], width: int = 40) -> str:
    """Values averaged into at most `width` buckets, one block character each (low to high)."""
    if not values:
        return ""
    v = np.asarray(values, dtype=float)
    means = np.array([c.mean() for c in np.array_split(v, min(width, len(v)))])
    lo, hi = means.min(), means.max()
    idx = np.zeros(len(means), int) if hi == lo else np.round((means - lo) / (hi - lo) * (len(SPARK) - 1)).astype(int)
    return "".join(SPARK[i] for i in idx)


def run_summary(run: Run) -> dict[str, Any]:
    """The facts `rayattr show` prints, as a JSON-ready dict."""
    m = run.manifest
    cfg = m.get("config") or {}
    model, data, train = cfg.get("model") or {}, cfg.get("data") or {}, cfg.get("train") or {}
    capture, embed = cfg.get("capture") or {}, cfg.get("embed") or {}
    timings = {k: float(v) for k, v in (m.get("timings") or {}).items()}
    order = [s for s in STAGES if s in timings] + sorted(set(timings) - set(STAGES))
    builtin = data.get("train") is None
    out = {
        "run_id": run.run_id, "uri": run.uri, "status": m.get("status", "unknown"),
        "error": m.get("error"), "created": m.get("created"), "finished": m.get("finished"),
        "rayattr_version": m.get("rayattr_version"),
        "model": {k: model.get(k) for k in ("family", "factory", "n_layer", "n_embd", "n_head")},
        "data": {"train": "built-in corpus" if builtin else data.get("train"),
                 "validation": ("built-in corpus" if builtin else data.get("validation")),
                 "n_train": m.get("n_train"), "n_sources": m.get("n_sources"),
                 "n_validation": (data.get("builtin") or {}).get("n_validation") if builtin else None,
                 "seq_len": data.get("seq_len"), "tokenizer": data.get("tokenizer")},
        "training": {"num_steps": m.get("num_steps"), "epochs": train.get("epochs"),
                     "steps_per_epoch": m.get("steps_per_epoch"), "global_batch": m.get("global_batch"),
                     "ranks": m.get("world_size", train.get("ranks")), "lr": train.get("lr"),
                     "restarts": m.get("train_restarts"), "use_gpu": train.get("use_gpu")},
        "projection": m.get("projection"),
        "capture": {k: capture.get(k) for k in ("kind", "rank", "seed", "dtype", "curvature")},
        "layers": len(m.get("layer_dims") or {}) or None,
        "embedding": {"segments": m.get("segments"), "phases": embed.get("phases"),
                      "keep_sample_embeddings": embed.get("keep_sample_embeddings")},
        "timings": {s: timings[s] for s in order},
        "total_seconds": sum(timings.values()) if timings else None,
        "gc": m.get("gc"),
    }
    records = run.step_losses()  # two columns, not every step's per-sample lists
    out["optimizer"], out["schedule"] = optimizer_summary(cfg), schedule_summary(train, records)
    out["recorded_steps"] = len(records)
    out["loss"] = loss_summary(records)
    out["validation"] = validation_summary(run)
    return out


def optimizer_summary(cfg: dict) -> dict[str, Any] | None:
    """The optimizer the run trained with, resolved as training resolved it (None: unknown)."""
    from rayattr.config import Config
    from rayattr.optim.spec import resolve_optimizer

    if not cfg:
        return None
    try:
        spec = resolve_optimizer(Config.from_dict(cfg))
    except Exception:  # noqa: BLE001 - a run from another version: show says "unknown", not a traceback
        return None
    return {k: getattr(spec, k) for k in ("type", "lr", "beta1", "beta2", "eps", "weight_decay")}


def schedule_summary(train: dict, records) -> dict[str, Any]:
    """DeepSpeed's scheduler block (type and params; None for none) and the learning rate the
    step records hold: first, peak (and its step) and last."""
    block = (train.get("deepspeed") or {}).get("scheduler")
    out: dict[str, Any] = {"type": block.get("type") if block else None,
                           "params": (block.get("params") or {}) if block else {}}
    if records:
        lrs = [float(r.lr) for r in records]
        peak = int(np.argmax(lrs))
        out.update(lr_first=lrs[0], lr_peak=lrs[peak], lr_peak_step=int(records[peak].step), lr_last=lrs[-1])
    return out


def validation_summary(run: Run) -> dict[str, Any] | None:
    """validation/summary.json's headline figures and verdict, or None if never validated."""
    from rayattr.store.layout import VALIDATION_SUMMARY

    if not run.exists(VALIDATION_SUMMARY):
        return None
    s = run.read_json(VALIDATION_SUMMARY)
    keys = ("n_subsets", "lds", "lds_ci", "n_sources", "source_spearman", "n_occurrences", "occurrence_spearman",
            "linearity_spearman", "first_order_spearman", "verdict")
    return {k: s.get(k) for k in keys}


def _num(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def format_summary(s: dict[str, Any]) -> str:
    """`rayattr show`'s text: one labelled line per aspect of the run."""
    mo, d, t, c, e = s["model"], s["data"], s["training"], s["capture"], s["embedding"]
    status = s["status"] + (f" (finished {s['finished'][:19]})" if s.get("finished") else "")
    lines = [("run", f"{s['run_id']}   {s['uri']}"), ("status", status)]
    if s.get("error"):
        lines.append(("error", s["error"]))
    lines.append(("created", f"{s.get('created')}, rayattr {s.get('rayattr_version')}"))
    lines.append(("model", mo["factory"] or f"{mo['family']}, {mo['n_layer']} layers, width {mo['n_embd']}, "
                                             f"{mo['n_head']} heads"))
    val = f", validation: {d['n_validation']} texts" if d.get("n_validation") else \
        (f", validation: {d['validation']}" if d.get("validation") else "")
    lines.append(("data", f"{d['train']}: {d['n_train']} training samples from {d['n_sources']} sources{val}; "
                          f"seq_len {d['seq_len']}, {d['tokenizer']} tokenizer"))
    epochs = f" = {t['epochs']} epochs x {t['steps_per_epoch']}" if t.get("steps_per_epoch") else ""
    lines.append(("training", f"{t['num_steps']} steps{epochs}, global batch {t['global_batch']} on "
                              f"{t['ranks']} {'GPU' if t.get('use_gpu') else 'CPU'} ranks, lr {t['lr']}, "
                              f"{t['restarts'] or 0} restarts"))
    lines.append(("optimizer", format_optimizer(s.get("optimizer"))))
    lines.append(("schedule", format_schedule(s.get("schedule"))))
    lines.append(("capture", f"{c['kind']} projection rank {c['rank']} (seed {c['seed']}), "
                             f"{s['layers'] or '?'} layers, {c['dtype']}, {c['curvature']} curvature"))
    lines.append(("embedding", f"{e['segments']} segments, {e['phases']} phases, per-sample embeddings "
                               f"{'kept' if e['keep_sample_embeddings'] else 'not kept'}"))
    if s["timings"]:
        lines.append(("timings", ", ".join(f"{k} {v:.1f}s" for k, v in s["timings"].items())
                      + f", total {s['total_seconds']:.1f}s"))
    loss = s["loss"]
    if loss:
        lines.append(("loss", f"{_num(loss['first'])} at step {loss['first_step']} -> {_num(loss['last'])} at step "
                              f"{loss['last_step']} (lowest {_num(loss['min'])} at step {loss['min_step']}; "
                              f"{len(loss['loss'])} of {s['recorded_steps']} steps recorded)"))
        lines.append(("", sparkline(loss["loss"])))
    else:
        lines.append(("loss", "not recorded (the training loop gave the Recorder no loss)"
                      if s["recorded_steps"] else "no steps recorded yet"))
    lines += format_validation(s.get("validation"), s["run_id"])
    if s.get("gc"):
        g = s["gc"]
        lines.append(("gc", f"{g['objects']} intermediate objects ({human_bytes(g['bytes'])}) deleted {g['at']}: "
                            + ", ".join(g["deleted"])))
    width = max(len(k) for k, _ in lines) + 2
    return "\n".join(f"{k:<{width}}{v}".rstrip() for k, v in lines)


def format_optimizer(o: dict[str, Any] | None) -> str:
    if not o:
        return "unknown (no recorded config)"
    if o["type"] == "adamw":
        return (f"AdamW, peak lr {_num(o['lr'])}, betas ({o['beta1']:g}, {o['beta2']:g}), eps {o['eps']:g}, "
                f"weight decay {o['weight_decay']:g}")
    return f"SGD (no momentum), lr {_num(o['lr'])}"


def format_schedule(sch: dict[str, Any] | None) -> str:
    sch = sch or {}
    text = sch.get("type") or "no scheduler (constant learning rate)"
    if sch.get("lr_peak") is not None:
        text += (f": lr {_num(sch['lr_first'])} at the first recorded step, peak {_num(sch['lr_peak'])} at step "
                 f"{sch['lr_peak_step']}, {_num(sch['lr_last'])} at the last")
    return text


def format_validation(v: dict[str, Any] | None, run_id: str) -> list[tuple[str, str]]:
    """`show`'s validation lines: the measured figures, then the verdict; or how to validate."""
    if not v:
        return [("validation", f"not validated: rayattr validate {run_id} --subsets 16 --sources")]
    f = lambda x: "-" if x is None else f"{x:.2f}"  # noqa: E731
    parts = []
    if v.get("n_subsets"):
        ci = v.get("lds_ci")
        spans = ci is not None and ci[0] <= 0 <= ci[1]
        parts.append(f"LDS {f(v['lds'])} over {v['n_subsets']} subsets"
                     + (f" (95% CI [{ci[0]:.2f}, {ci[1]:.2f}]{', spans zero' if spans else ''})" if ci else ""))
    if v.get("n_sources"):
        parts.append(f"sources Spearman {f(v['source_spearman'])} over {v['n_sources']}")
    if v.get("n_occurrences"):
        parts.append(f"occurrences Spearman {f(v['occurrence_spearman'])} over {v['n_occurrences']}")
    if v.get("linearity_spearman") is not None:
        parts.append(f"linear response Spearman {f(v['linearity_spearman'])}")
    lines = [("validation", "; ".join(parts) or "no counterfactuals measured")]
    if v.get("verdict"):
        lines.append(("verdict", v["verdict"]))
    return lines
