"""The validation of one finished run: choose counterfactuals, retrain them, compare, write."""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import pyarrow as pa

from rayattr.config import Config
from rayattr.store import Run, StoreOptions, open_run_ref
from rayattr.store.lease import driver_lease
from rayattr.validate.counterfactuals import (Removal, direction_predicted, occurrence_removals, parse_window,
                                              predicted_all, run_samples, source_removals, subset_removals,
                                              windowed)
from rayattr.validate.errors import ValidationError
from rayattr.validate.smoothness import (DEFAULT_STEPS, along, attributability_sentence, check_steps,
                                         direction_retrains, smoothness_of)
from rayattr.validate.stats import bootstrap_spearman_ci, slope, spearman
from rayattr.store.layout import (EXACT_SAMPLES, VALIDATION_DATA, VALIDATION_OCCURRENCES, VALIDATION_RETRAINS, VALIDATION_SMOOTHNESS,
                                  VALIDATION_SOURCES, VALIDATION_SUBSETS, VALIDATION_SUMMARY, retrain_path)

SCHEMA_VERSION = 1
TABLES = {  # kind -> (file, columns)
    "subset": (VALIDATION_SUBSETS, ["subset", "n_removed", "n_occurrences", "predicted", "actual"]),
    "source": (VALIDATION_SOURCES, ["source", "n_removed", "n_occurrences", "predicted", "actual"]),
    # actual = Δloss / ε: the response to giving the occurrence loss weight 1 − ε (ε = 1: removed)
    "occurrence": (VALIDATION_OCCURRENCES, ["sample_id", "step", "eps", "predicted", "actual"]),
}


@dataclass
class ValidationResult:
    """What `validate_run` wrote: the summary and the per-counterfactual tables."""

    uri: str
    summary: dict[str, Any]
    tables: dict[str, pa.Table] = field(default_factory=dict)
    """kind ("subset", "source", "occurrence") -> its table."""


def open_validatable(uri: str | Run, storage_options: dict | None = None) -> Run:
    """The run, writable, if its pipeline finished (values exist to compare with)."""
    run = uri if isinstance(uri, Run) else open_run_ref(  # a run id, path or URI
        str(uri).rstrip("/"), StoreOptions(storage_options=dict(storage_options or {})), mode="record")
    status = run.manifest.get("status", "unknown")
    if status != "done":
        raise ValidationError(f"run '{run.run_id}' is not finished (status '{status}'): validation "
                              "compares its values with retraining, so the run must have completed")
    if "config" not in run.manifest:
        raise ValidationError(f"run '{run.run_id}' has no recorded config: it cannot be retrained")
    return run


def validate_run(uri: str | Run, subsets: int = 0, fraction: float = 0.1, sources: bool | list[str] = False,
                 occurrences: int = 0, seed: int = 0, gangs: int | None = None,
                 storage_options: dict | None = None, progress: bool = True,
                 eps: tuple[float, ...] = (1.0,), window: str | None = None, smoothness: bool = False,
                 smoothness_steps=None) -> ValidationResult:
    """Retrain the chosen counterfactuals and write validation/. Retrains already in the run
    (same removal) are reused; Ray is started (or joined) only when there is one to run.

    `eps`: each drawn occurrence is retrained once per ε, with loss weight 1 − ε (ε = 1 removes
    it). Δloss/ε at a small ε is the first-order response a value estimates; two ε say whether
    the run responds linearly (docs/method.md §6).

    `window`: "A:B" restricts every removal to the occurrences at steps [A, B); predictions
    sum only those occurrences' values.

    `smoothness`: the attributability check (rayattr/validate/smoothness.py): retrains at loss
    weights 1 + h·w and 1 + 2h·w along a random ±1 direction w (seeded by `seed`), for each h
    of `smoothness_steps` (default 0.1 and 0.01; giving them asks for the check)."""
    if subsets < 0 or occurrences < 0:
        raise ValidationError("--subsets and --occurrences must be >= 0")
    eps = tuple(sorted({float(e) for e in eps}, reverse=True))
    if not eps or any(not 0 < e <= 1 for e in eps):
        raise ValidationError(f"--weight: each ε must lie in (0, 1], got {list(eps)}")
    if subsets and not 0 < fraction < 1:
        raise ValidationError(f"--fraction must lie strictly between 0 and 1, got {fraction}")
    smoothness = bool(smoothness or smoothness_steps)
    steps = check_steps(smoothness_steps or DEFAULT_STEPS) if smoothness else ()
    if not (subsets or sources or occurrences or smoothness):
        raise ValidationError("nothing to validate: ask for --subsets N, --sources, --occurrences N "
                              "and/or --smoothness")
    run = open_validatable(uri, storage_options)
    with driver_lease(run):  # one driver per run (store/lease.py)
        span = None
        if window:  # the run's steps, read only when a window asks for them
            span = parse_window(window, int(run.manifest.get("num_steps") or (run.last_step_record() or 0) + 1))
        return _validate(run, subsets, fraction, sources, occurrences, seed, gangs, progress, eps, span, steps)


def _validate(run: Run, subsets, fraction, sources, occurrences, seed, gangs, progress, eps,
              window: tuple[int, int] | None, steps: tuple[float, ...] = ()) -> ValidationResult:
    cfg = Config.from_dict(run.manifest["config"])
    samples = windowed(run_samples(run), window)  # by row group and column, never the whole table
    if window is not None and not any(b.num_rows for b in samples(["step"])):
        raise ValidationError(f"no occurrence of the run lies in the window {window}")
    rng = np.random.default_rng(seed)
    plan: list[Removal] = [Removal("baseline", "nothing removed")]
    if subsets:
        plan += subset_removals(samples, subsets, fraction, rng)
    if sources:
        plan += source_removals(samples, None if sources is True else list(sources))
    if occurrences:
        plan += [replace(r, weight=1.0 - e) for r in occurrence_removals(samples, occurrences, rng) for e in eps]
    if window is not None:
        plan = plan[:1] + [replace(r, window=window) for r in plan[1:]]
    directions = direction_retrains(seed, steps, window) if steps else []

    done = finished_retrains(run)
    todo = [r for r in plan + directions if r.key not in done]
    if todo:
        from rayattr.runtime.cluster import connect
        from rayattr.validate.gangs import retrain_all

        connect(log_to_driver=False)  # RAY_ADDRESS's cluster, else a local one

        def keep(removal: Removal, out: dict) -> None:
            record = {"removal": removal.to_dict(), **out}
            run.write_json(retrain_path(removal.key), record)
            done[removal.key] = record

        retrain_all(cfg, run, todo, keep, gangs=gangs, storage_options=run.options.storage_options or None,
                    progress=progress)
    return _write_results(run, plan, done, samples, seed, fraction, window,
                          _smoothness(run, done, directions, steps, samples, seed, window))


def _smoothness(run: Run, done: dict[str, dict], directions: list[Removal], steps: tuple[float, ...],
                samples, seed: int, window: tuple[int, int] | None) -> dict[str, Any] | None:
    """The attributability check from its retrains, written to validation/smoothness.json; when
    it was not asked for this time, the last one measured on the same window (None: never)."""
    if not directions:
        if run.exists(VALIDATION_SMOOTHNESS):
            last = run.read_json(VALIDATION_SMOOTHNESS)
            return last if last.get("window") == (list(window) if window else None) else None
        return None
    f0 = done[Removal("baseline", "nothing removed").key]["loss"]
    losses = {h: (done[along(directions, h).key]["loss"], done[along(directions, 2 * h).key]["loss"]) for h in steps}
    out = smoothness_of(f0, losses)
    slope, n = direction_predicted(samples, seed)
    out.update(seed=seed, baseline_loss=f0, n_occurrences=n, predicted_slope=slope,
               window=list(window) if window else None,
               retrains=[r.key for r in directions])
    run.write_json(VALIDATION_SMOOTHNESS, out)
    return out


def finished_retrains(run: Run) -> dict[str, dict]:
    """Every retrain the run's validations finished, by its removal's key: its record
    ({"removal", "loss", "seconds", ...}) as written when it finished."""
    out = {}
    for name in run.list(VALIDATION_RETRAINS):  # [] when there is none yet
        if name.endswith(".json"):
            rec = run.read_json(f"{VALIDATION_RETRAINS}/{name}")
            out[Removal.from_dict(rec["removal"]).key] = rec
    return out


def _write_results(run: Run, plan: list[Removal], done: dict[str, dict], samples,
                   seed: int, fraction: float, window: tuple[int, int] | None = None,
                   smoothness: dict[str, Any] | None = None) -> ValidationResult:
    import torch

    from rayattr.model.gradients import final_model, mean_loss
    from rayattr.data import TokenizedDataset, load_tokenizer

    cfg = Config.from_dict(run.manifest["config"])
    base = done[plan[0].key]
    val = TokenizedDataset(run.read_table(VALIDATION_DATA), load_tokenizer(cfg.data.tokenizer),
                           cfg.data.seq_len)
    # one thread, as the local retrain actors evaluate (runtime/cluster.LOCAL_ENV): with more,
    # the BLAS may split its sums differently from call to call under load, and a bit-equal
    # baseline would show a noise floor of rounding
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        run_loss = mean_loss(final_model(run, cfg), val)
    finally:
        torch.set_num_threads(threads)
    rows: dict[str, list[dict]] = {k: [] for k in TABLES}
    for r, (pred, n_occ) in zip(plan[1:], predicted_all(samples, plan[1:])):
        actual = done[r.key]["loss"] - base["loss"]
        if r.kind == "occurrence":
            e = round(1.0 - r.weight, 12)  # the ε asked for, not 1 − (1 − ε)'s rounding
            rows[r.kind].append({"sample_id": r.sample_ids[0], "step": r.step, "eps": e, "predicted": pred,
                                 "actual": actual / e})
        else:
            rows[r.kind].append({r.kind: r.name, "n_removed": len(r.sample_ids), "n_occurrences": n_occ,
                                 "predicted": pred, "actual": actual})
    tables = {}
    tag = {b"window": json.dumps(list(window) if window else None).encode()}
    for kind, (path, cols) in TABLES.items():
        if rows[kind]:
            run.write_table(path, pa.Table.from_pylist(rows[kind]).select(cols).replace_schema_metadata(tag))
        if run.exists(path):  # kinds not asked for this time keep their last results
            table = run.read_table(path)
            if (table.schema.metadata or {}).get(b"window", b"null") == tag[b"window"]:
                tables[kind] = table  # never summarised beside another window's results
    summary = summarise(tables, np.random.default_rng(seed))
    if run.exists(EXACT_SAMPLES):
        exact = run.read_table(EXACT_SAMPLES)
        summary.update(exact_against_retrains(exact, _by_eps(tables.get("occurrence"))))
        removals = [r for r in plan[1:] if r.kind in ("subset", "source")]
        summary.update(exact_counterfactuals(windowed(exact, window), removals,
                                             [done[r.key]["loss"] - base["loss"] for r in removals],
                                             np.random.default_rng(seed)))
    summary.update(schema_version=SCHEMA_VERSION, run_id=run.run_id, seed=seed, fraction=fraction,
                   window=list(window) if window else None,
                   world_size=cfg.train.ranks, baseline_max_abs_diff=base["max_abs_diff"],
                   baseline_loss=base["loss"], run_loss=run_loss, noise_floor=abs(base["loss"] - run_loss),
                   retrain_seconds=float(np.median([done[k]["seconds"] for k in
                                                    [r.key for r in plan] + (smoothness or {}).get("retrains", [])])))
    summary["smoothness"] = {k: v for k, v in smoothness.items() if k != "attributable"} if smoothness else None
    summary["attributable"] = smoothness.get("attributable") if smoothness else None
    summary["verdict"] = verdict(summary)
    run.write_json(VALIDATION_SUMMARY, summary)
    return ValidationResult(uri=run.uri, summary=summary, tables=tables)


def summarise(tables: dict[str, pa.Table], rng: np.random.Generator) -> dict[str, Any]:
    """The figures of summary.json from the per-counterfactual tables (None where a kind is
    missing or has too few rows to rank)."""
    def pa_(kind, t=None):
        t = tables.get(kind) if t is None else t
        return (t["predicted"].to_numpy(), t["actual"].to_numpy()) if t is not None else (np.zeros(0), np.zeros(0))

    sp, sa = pa_("subset")
    cp, ca = pa_("source")
    occ = tables.get("occurrence")
    by_eps = _by_eps(occ)
    # the headline occurrence figures are the full removal's (ε = 1), else the largest ε asked
    op, oa = pa_("occurrence", by_eps[max(by_eps)]) if by_eps else pa_("")
    return {
        "n_subsets": len(sp), "n_sources": len(cp), "n_occurrences": len(op),
        "lds": spearman(sp, sa), "lds_ci": bootstrap_spearman_ci(sp, sa, rng),
        "subset_slope": slope(sp, sa),
        "source_spearman": spearman(cp, ca), "source_slope": slope(cp, ca),
        "occurrence_spearman": spearman(op, oa), "occurrence_slope": slope(op, oa),
        # how far one occurrence moves the final loss, retrained and predicted: an actual far
        # above the prediction means the trajectory amplifies small changes (docs/method.md §6)
        "occurrence_actual_rms": _rms(oa), "occurrence_predicted_rms": _rms(op),
        **first_order(by_eps),
    }


def _by_eps(occ: pa.Table | None) -> dict[float, pa.Table]:
    """The occurrence table split by ε, each sorted by (step, sample_id) so that tables of two ε
    pair the same occurrences row by row (only occurrences retrained at every ε are kept)."""
    if occ is None or occ.num_rows == 0:
        return {}
    eps = occ["eps"].to_numpy() if "eps" in occ.column_names else np.ones(occ.num_rows)
    keys = [set(zip(occ["step"].to_numpy()[eps == e], occ["sample_id"].to_numpy()[eps == e])) for e in np.unique(eps)]
    common = set.intersection(*keys)
    out = {}
    for e in np.unique(eps):
        t = occ.filter(pa.array(eps == e))
        pick = [(s, z) in common for s, z in zip(t["step"].to_numpy(), t["sample_id"].to_numpy())]
        out[float(e)] = t.filter(pa.array(pick)).sort_by([("step", "ascending"), ("sample_id", "ascending")])
    return out


def first_order(by_eps: dict[float, pa.Table]) -> dict[str, Any]:
    """Do the values estimate the run's first-order response? With occurrences retrained at two
    ε or more: linearity (Spearman and rms ratio of Δloss/ε at the largest ε against the
    smallest), and the values against Δloss/ε at the smallest ε (Spearman, and rms of the
    values over rms of the response: 1 is the right size)."""
    if not by_eps:
        return {"first_order_eps": None}
    small, large = min(by_eps), max(by_eps)
    p, a = by_eps[small]["predicted"].to_numpy(), by_eps[small]["actual"].to_numpy()
    out: dict[str, Any] = {"first_order_eps": small, "first_order_n": len(a),
                           "first_order_spearman": spearman(p, a), "first_order_rms_ratio": _ratio(p, a)}
    if large != small:
        b = by_eps[large]["actual"].to_numpy()
        out.update(linearity_eps=[large, small], linearity_spearman=spearman(b, a), linearity_rms_ratio=_ratio(b, a))
    return out


def exact_against_retrains(exact: pa.Table, by_eps: dict[float, pa.Table]) -> dict[str, Any]:
    """The exact first-order response (`rayattr exact`, docs/method.md §10) against Δloss/ε at
    the smallest ε retrained, on the same occurrences: it must match where the retrains are
    linear, or the reference (or the retrains) cannot be trusted."""
    if not by_eps:
        return {}
    t = by_eps[min(by_eps)]
    value = {(s, z): v for s, z, v in zip(exact["step"].to_numpy(), exact["sample_id"].to_numpy(),
                                          exact["value"].to_numpy())}
    pairs = [(value[(s, z)], a) for s, z, a in zip(t["step"].to_numpy(), t["sample_id"].to_numpy(),
                                                   t["actual"].to_numpy()) if (s, z) in value]
    if not pairs:
        return {}
    x, a = (np.array(c) for c in zip(*pairs))
    return {"exact_first_order_n": len(x), "exact_first_order_spearman": spearman(x, a),
            "exact_first_order_rms_ratio": _ratio(x, a)}


def exact_counterfactuals(exact: pa.Table, removals: list[Removal], actual: list[float],
                          rng: np.random.Generator | None = None) -> dict[str, Any]:
    """The exact values' own predictions of this validation's subset and source retrains:
    LDS (with its bootstrap interval when `rng` is given) and source Spearman as the values'
    are figured, for the same removals."""
    pairs: dict[str, tuple[list, list]] = {}
    for r, (pred, _), a in zip(removals, predicted_all(exact, removals), actual):
        pairs.setdefault(r.kind, ([], []))
        pairs[r.kind][0].append(pred)
        pairs[r.kind][1].append(a)
    out: dict[str, Any] = {}
    if "subset" in pairs:
        out["exact_lds"] = spearman(*pairs["subset"])
        if rng is not None:
            out["exact_lds_ci"] = bootstrap_spearman_ci(*pairs["subset"], rng)
    if "source" in pairs:
        out["exact_source_spearman"] = spearman(*pairs["source"])
    return out


def _ratio(x: np.ndarray, y: np.ndarray) -> float | None:
    rx, ry = _rms(x), _rms(y)
    return rx / ry if rx is not None and ry else None


def _rms(x: np.ndarray) -> float | None:
    return float(np.sqrt(np.mean(np.square(x)))) if len(x) else None


def read_validation(run: Run) -> ValidationResult | None:
    """The validation results a run holds, or None if it was never validated."""
    if not run.exists(VALIDATION_SUMMARY):
        return None
    tables = {k: run.read_table(p) for k, (p, _) in TABLES.items() if run.exists(p)}
    return ValidationResult(uri=run.uri, summary=run.read_json(VALIDATION_SUMMARY), tables=tables)


# What a verdict asks of the measurements (docs/method.md §6, "The verdict"): values that
# track the first-order response as a rank (Spearman) and in size (rms ratio) ...
TRACKS_SPEARMAN, TRACKS_RATIO = 0.9, (0.7, 1.4)
# ... and a run whose single removals are first-order events at all
LINEAR_SPEARMAN = 0.8


def verdict(summary: dict[str, Any]) -> str:
    """How far to trust the run, in plain words, from what validation measured: whether the run
    is attributable at all (the smoothness check), then single values (linearity, then the
    values against the first-order response), then rankings (LDS, sources)."""
    lin, fo = summary.get("linearity_spearman"), summary.get("first_order_spearman")
    ratio = summary.get("first_order_rms_ratio")
    if summary.get("linearity_eps") and lin is not None and lin < LINEAR_SPEARMAN:
        single = (f"Do not act on single values: removing one occurrence is not a first-order event on this run "
                  f"(the response at ε = {summary['linearity_eps'][0]:g} and ε = {summary['linearity_eps'][1]:g} "
                  f"ranks occurrences alike only at Spearman {lin:.2f}), so no first-order value can predict it.")
    elif summary.get("first_order_n") and fo is not None and ratio is not None:
        eps = summary["first_order_eps"]
        if fo >= TRACKS_SPEARMAN and TRACKS_RATIO[0] <= ratio <= TRACKS_RATIO[1]:
            single = (f"The values track this run's response to removing single occurrences (Δloss/ε at ε = "
                      f"{eps:g}: Spearman {fo:.2f}, {ratio:.2f}× its size): single values can be read as predicted "
                      "loss changes.")
        else:
            linear = (f"this run responds linearly to one occurrence (Spearman {lin:.2f} across ε), but "
                      if lin is not None else "")
            single = (f"Do not act on single values yet: {linear}the values miss the response to removing single "
                      f"occurrences (Δloss/ε at ε = {eps:g}: Spearman {fo:.2f}, {ratio:.2f}× its size); act only on "
                      "sources whose intervals stand apart (docs/method.md §9).")
    else:
        single = ""
    return " ".join(x for x in (attributability_sentence(summary), single, _rankings(summary)) if x) or \
        ("Too few counterfactuals to judge: validate with --smoothness, --subsets N, --sources, or "
         "--occurrences N --weight 1 0.01.")


def _rankings(summary: dict[str, Any]) -> str:
    """What the subset and source retrains say about the values' rankings."""
    lds, src, ci = summary.get("lds"), summary.get("source_spearman"), summary.get("lds_ci")
    best = max((x for x in (lds, src) if x is not None), default=None)
    if best is None:
        return ""
    if ci is not None and ci[0] <= 0 <= ci[1] and (src is None or src < 0.8):
        text = (f"No evidence yet that the values rank data as retraining does: the LDS interval "
                f"[{ci[0]:.2f}, {ci[1]:.2f}] spans zero.")
    elif best >= 0.8:
        text = "The values predict what retraining does; rankings can be acted on."
    elif best >= 0.5:
        text = "The values predict retraining only roughly: trust large differences, not the exact order."
    else:
        text = ("The values do not predict what retraining this run does: treat rankings as hypotheses to "
                "check, not as measurements.")
    amp, pred = summary.get("occurrence_actual_rms"), summary.get("occurrence_predicted_rms")
    if amp and pred and amp > 3 * pred:
        text += (f" Removing one occurrence moved the final loss {amp / pred:.0f}× more than predicted (rms); "
                 "docs/method.md §9 says where such excess comes from.")
    return text


def format_summary(summary: dict[str, Any]) -> str:
    """The summary as a few lines for a terminal: the sections that were measured, then the verdict."""
    def f(x):
        return "-" if x is None else (f"{x:.3f}" if isinstance(x, float) else str(x))

    def size(c):
        return f"magnitude {f(c)} (actual ≈ {f(c)} × predicted; 1 is the right size)"

    lines = []
    ci = summary.get("lds_ci")
    if summary.get("n_subsets"):
        spans = " — spans zero" if ci and ci[0] <= 0 <= ci[1] else ""
        lines.append(f"subsets: {summary['n_subsets']}  LDS (Spearman) {f(summary['lds'])}"
                     + (f"  95% CI [{ci[0]:.3f}, {ci[1]:.3f}]{spans}" if ci else "")
                     + f"  {size(summary['subset_slope'])}")
    if summary.get("n_sources"):
        lines.append(f"sources: {summary['n_sources']}  Spearman {f(summary['source_spearman'])}  "
                     f"{size(summary['source_slope'])}")
    if summary.get("n_occurrences"):
        lines.append(f"occurrences: {summary['n_occurrences']}  Spearman {f(summary['occurrence_spearman'])}  "
                     f"{size(summary['occurrence_slope'])}  rms actual {f(summary.get('occurrence_actual_rms'))} "
                     f"vs predicted {f(summary.get('occurrence_predicted_rms'))}")
    if summary.get("linearity_eps"):
        big, small = summary["linearity_eps"]
        lines.append(f"linear response: Δloss/ε at ε = {big:g} against ε = {small:g}: Spearman "
                     f"{f(summary['linearity_spearman'])}, rms ratio {f(summary.get('linearity_rms_ratio'))} "
                     "(1 and 1: one occurrence is a first-order event)")
    if summary.get("first_order_eps") is not None and summary.get("first_order_n"):
        lines.append(f"values against the first-order response (Δloss/ε at ε = {summary['first_order_eps']:g}, "
                     f"{summary['first_order_n']} occurrences): Spearman {f(summary['first_order_spearman'])}, "
                     f"rms ratio {f(summary['first_order_rms_ratio'])} (values ÷ response; 1 is the right size)")
    if summary.get("exact_lds") is not None or summary.get("exact_source_spearman") is not None:
        ci = summary.get("exact_lds_ci")
        lines.append(f"the exact first-order values (rayattr exact) on the same retrains: LDS {f(summary.get('exact_lds'))}"
                     + (f" [{ci[0]:.2f}, {ci[1]:.2f}]" if ci else "") + ", "
                     f"sources Spearman {f(summary.get('exact_source_spearman'))}")
    if summary.get("exact_first_order_n"):
        lines.append(f"the exact first-order values (rayattr exact) against the same response, "
                     f"{summary['exact_first_order_n']} occurrences: Spearman {f(summary['exact_first_order_spearman'])}, "
                     f"rms ratio {f(summary['exact_first_order_rms_ratio'])}")
    sm = summary.get("smoothness")
    if sm and sm.get("score") is not None:
        per = "; ".join(f"h = {p['h']:g}: slope {p['slope']:.4g}, ν {p['nu']:.3f}" for p in sm["per_step"])
        lines.append(f"smoothness (random ±1 direction, seed {sm['seed']}): {per}; slope agreement "
                     f"{f(sm['slope_agreement'])}; values predict slope {sm['predicted_slope']:.4g}; score "
                     f"{f(sm['score'])} (attributable at ≥ {sm['threshold']:g}: "
                     f"{'yes' if summary.get('attributable') else 'no'})")
    lines += [
        f"nothing-removed retrain: max |Δweight| {summary['baseline_max_abs_diff']:.3g}, "
        f"validation loss {summary['baseline_loss']:.6f} vs run {summary['run_loss']:.6f} "
        f"(noise floor {summary['noise_floor']:.3g})",
        f"verdict: {summary.get('verdict') or verdict(summary)}",
    ]
    return "\n".join(lines)


def dumps(summary: dict[str, Any]) -> str:
    return json.dumps(summary, indent=1)
