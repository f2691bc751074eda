"""The report's answer to "how far to trust this run": the box that opens the page (the
verdict, which opens with whether the run is attributable where `validate --smoothness`
measured it; smoothness, LDS with its interval, the sources that stand apart, the step-size
bound that applies to the run's optimizer) and the details further down (noise, seeds,
validation plots)."""

from __future__ import annotations

import html
from pathlib import Path

import pyarrow as pa

from rayattr.report import figures
from rayattr.report.standing import clear_of_others, standing_sentence
from rayattr.store import Run
from rayattr.store.layout import EXACT_SUMMARY, SOURCE_VALUES


def separated_sources(sources: pa.Table) -> tuple[list[str], int]:
    """Sources whose 95 % interval overlaps no other source's (their place in the order is
    established by this run), and how many sources have intervals at all."""
    if "value_low" not in sources.column_names:
        return [], 0
    rows = [r for r in sources.to_pylist() if r["value_low"] is not None]
    return clear_of_others(rows), len(rows)


def validate_command(run: Run) -> str:
    return f"rayattr validate {run.run_id} --subsets 16 --sources"


def optimizer_type(run: Run) -> str | None:
    """"sgd" or "adamw" as training resolved it (None: no recorded config)."""
    from rayattr.report.summary import optimizer_summary

    spec = optimizer_summary(run.manifest.get("config") or {})
    return spec["type"] if spec else None


def stability_sentence(run: Run) -> str | None:
    """The step-size bound that applies to the run's optimizer, with what the run measured.
    An AdamW step is η·P·H (docs/method.md §7): its number is η·λ_max(P·H), judged against the
    recursion's 2 and Adam's own stability edge 2(1+β₁)/(1−β₁); plain SGD's is η·λ_max(H) < 2."""
    from rayattr.embed.guard import ETA_LAMBDA_WARN, WHOSE_H, describe

    from rayattr.report.summary import optimizer_summary

    el, at = run.manifest.get("max_eta_lambda"), run.manifest.get("max_eta_lambda_step")
    spec = optimizer_summary(run.manifest.get("config") or {}) or {}
    adamw = spec.get("type") == "adamw"
    if el is None:
        return None
    if adamw and not run.manifest.get("eta_lambda_preconditioned"):
        return ("Step size against curvature: this run trained with AdamW, whose step is η·P·H "
                "(docs/method.md §7), but it was embedded before η·λ_max(P·H) was measured; plain SGD's "
                "η·λ_max(H) says nothing about it. Retraining (rayattr validate) is what says how far the values hold.")
    what = "η·λ_max(P·H)" if adamw else "η·λ_max(H)"
    momentum = float(spec.get("beta1") or 0.0) if adamw else 0.0
    text = (f"Step size against curvature: the largest {what} of any step was {el:.2g} (step {at}; {WHOSE_H}), "
            f"{describe(el, momentum)}. ")
    if el > ETA_LAMBDA_WARN:
        return text + ("Where it does, first-order values, Data Value Embedding included, rank sources and samples "
                       "less reliably (docs/method.md §9).")
    return text + "Below 2 throughout: the regime where first-order values are reliable."


def _lds_text(s: dict) -> str | None:
    if not s.get("n_subsets") or s.get("lds") is None:
        return None
    ci = s.get("lds_ci")
    text = f"LDS {s['lds']:.2f} over {s['n_subsets']} random subsets"
    if ci:
        spans = ci[0] <= 0 <= ci[1]
        text += f", 95 % interval [{ci[0]:.2f}, {ci[1]:.2f}]" + (" — spans zero: no evidence yet" if spans else "")
    return text


def _smoothness_text(s: dict) -> str:
    lin = s.get("linearity_spearman")
    eps = s.get("linearity_eps") or ["?", "?"]
    single = (f"the response to one occurrence at ε = {eps[0]:g} and ε = {eps[1]:g} ranks occurrences alike at "
              f"Spearman {lin:.2f} (1: a first-order event)") if lin is not None else None
    sm = s.get("smoothness")
    if sm and sm.get("score") is not None:
        per = ", ".join(f"ν {p['nu']:.2f} at h = {p['h']:g}" for p in sm["per_step"])
        text = (f"Smoothness {sm['score']:.2f} (attributable at ≥ {sm['threshold']:g}): retrained along a random "
                f"±1 direction over the occurrences, the final loss bends by {per} (0: linear) and its slopes at "
                f"the step sizes agree to {sm['slope_agreement']:.0%}.")
        return text + (f" Single occurrences: {single}." if single else "")
    if single is None:
        return ("Smoothness (does the final loss respond linearly to the data?): not measured; "
                "<code>--smoothness</code> measures it (4 retrains).")
    return (f"Smoothness: {single}; <code>--smoothness</code> measures the whole run's response "
            "along a random direction.")


def exact_sentence(run: Run) -> str | None:
    """How the values agree with the exact first-order response, phase by phase, where
    `rayattr exact` measured it (docs/method.md §10)."""
    if not run.exists(EXACT_SUMMARY):
        return None
    s = run.read_json(EXACT_SUMMARY)
    parts = []
    for band, a in (s.get("agreement") or {}).items():
        if a.get("spearman") is not None and a.get("rms_ratio") is not None:
            parts.append(f"{band} (steps {a['steps'][0]}–{a['steps'][1]}): Spearman {a['spearman']:+.2f}, "
                         f"{a['rms_ratio']:.2g}× its size")
    if not parts:
        return None
    text = "Against the exact first-order response (rayattr exact; 1 and 1× are right): " + "; ".join(parts) + "."
    if s.get("replay_departs_at") is not None:
        text += (f" The run amplifies rounding from step {s['replay_departs_at']}: from there the float64 replay "
                 "follows a sibling of the run's trajectory" + (" between the states the run kept." if s.get("anchors")
                                                                 else "; keep states (train.states_every) to follow the run itself."))
    sharp = s.get("sharpness")
    if sharp and sharp.get("turns"):  # exact/sharpness.py: one step back turns w past zero
        text += (f" The run ends at the edge of stability along the validation gradient (η·⟨w, H w⟩/‖w‖² = "
                 f"{sharp['eta_along_validation']:.2f} > 1), where {curvature_kind(run)} follows it "
                 "only in part: trust the exact values over the run's values.")
    return text


def curvature_kind(run: Run) -> str:
    """The curvature the run's K held, as a reader should picture it: the edge of stability
    needs one near the Hessian, across layers (docs/method.md §3, §9)."""
    capture = (run.manifest.get("config") or {}).get("capture") or {}
    fisher = "a sampled-label Fisher" if capture.get("curvature") == "sampled" else "an empirical Fisher"
    if run.manifest.get("joint_layers"):
        return f"the values' K, {fisher} across all layers,"
    return (f"the values' K, {fisher} layer by layer (embed.joint_layers with capture.curvature: sampled "
            "follows it further, docs/method.md §9),")


def clipping_sentence(run: Run) -> str | None:
    """The clip factor's caveat where gradient clipping acted (None: it never did, or the run
    was embedded before clipped steps were counted)."""
    from rayattr.embed.guard import clipping_note

    clipped, steps = run.manifest.get("clipped_steps"), run.manifest.get("num_steps")
    if not clipped or not steps:
        return None
    note = clipping_note(int(clipped), int(steps), bool(run.manifest.get("clip_response")))
    return note[0].upper() + note[1:] + "."


def attributable_sentence(run: Run) -> str | None:
    """Where embed.unstable "cut" withheld the earlier occurrences' values (None: every
    occurrence has one)."""
    first = run.manifest.get("attributable_from")
    if not first:
        return None
    m = run.manifest
    return (f"Only occurrences from step {first} on have values: the recursion is unstable at step "
            f"{m.get('unstable_step')} ({m.get('unstable_why')}, η·λ_max {m.get('unstable_eta_lambda', float('nan')):.3g}), "
            "so a first-order value of anything before it means nothing (embed.unstable: cut; docs/method.md §9). "
            "Source totals sum the later occurrences only.")


def trust_box(run: Run, sources: pa.Table, noise: tuple[float, float] | None) -> list[str]:
    """The page's first section: the verdict and the few figures it rests on."""
    from rayattr.validate import read_validation
    from rayattr.validate.validation import verdict

    result = read_validation(run)
    items = []
    if result is None:
        head = (f"<p><b>Verdict: not validated yet.</b> Nothing has checked these values against retraining. "
                f"<code>{html.escape(validate_command(run))}</code> retrains the run without chosen data; "
                f"then <code>rayattr report {html.escape(run.run_id)}</code> shows the verdict here.</p>")
    else:
        s = result.summary
        head = f"<p><b>Verdict:</b> {html.escape(s.get('verdict') or verdict(s))}</p>"
        items.append(_smoothness_text(s))
        lds = _lds_text(s)
        if lds:
            items.append(html.escape(lds))
        if s.get("n_sources") and s.get("source_spearman") is not None:
            items.append(f"Sources left out one at a time: Spearman {s['source_spearman']:.2f} over {s['n_sources']}.")
    items.append("Sources: " + html.escape(standing_sentence(sources.to_pylist())) + ".")
    if noise is not None:
        items.append(f"Projection noise: {noise[1]:.0%} of the occurrences lie within 2 SE of zero "
                     "(their sign is not known); ranked samples below list those clear of noise first.")
    for sentence in (attributable_sentence(run), stability_sentence(run)):
        if sentence:
            items.append(html.escape(sentence))
    clipping = clipping_sentence(run)
    if clipping:
        items.append(html.escape(clipping))
    exact = exact_sentence(run)
    if exact:
        items.append(html.escape(exact))
    lis = "".join(f"<li>{i}</li>" for i in items)
    return [f'<section class="trust" id="trust"><h2>How far to trust this run</h2>{head}<ul>{lis}</ul>'
            "<p><small>Details: <a href=\"#trust-details\">below</a>.</small></p></section>"]


def seed_caveat(run: Run) -> str:
    """What one training run's source values say and do not say (docs/method.md §9)."""
    apart, n = separated_sources(run.read_table(SOURCE_VALUES))
    text = ("Training seed: these values belong to this run's trajectory (its initial weights and batch "
            "order), and a retrain with another seed orders similar sources differently; on the built-in job "
            "only a source that stands apart, like the deliberately corrupted one, keeps its place from seed "
            "to seed (measurements in docs/method.md §9). ")
    if n:
        signed = [r["source"] for r in run.read_table(SOURCE_VALUES).to_pylist()
                  if r.get("value_low") is not None and (r["value_low"] > 0 or r["value_high"] < 0)]
        text += (f"In this run {len(apart)} of {n} sources have a 95 % interval clear of every other source's"
                 + (f" ({', '.join(apart)})" if apart else "")
                 + f", and {len(signed)} an interval clear of zero"
                 + (f" ({', '.join(signed)})" if signed else "")
                 + ": act on such places and signs, not on the order among sources whose intervals overlap.")
    cfg = (run.manifest.get("config") or {}).get("capture") or {}
    if optimizer_type(run) == "adamw" and cfg.get("preconditioner") == "lagged":
        text += (" This AdamW run used the lagged preconditioner, which overstates single occurrences "
                 "wherever gradients grow (early training): rerun with capture.preconditioner: lookahead "
                 "before trusting its source order (docs/method.md §7).")
    return text


def trust_section(run: Run, noise: tuple[float, float] | None, out: Path, img) -> list[str]:
    """The details behind the box: projection noise, the seed caveat, and the validation
    figures where `rayattr validate` has run (`img`: the page's figure helper)."""
    from rayattr.validate import read_validation

    parts = ['<h2 id="trust-details">How far to trust this run: the details</h2>']
    if noise is not None:
        median, within = noise
        parts.append(f"<p>Projection noise: each value carries a standard error from the random projection "
                     f"(spread over projection blocks, docs/method.md). For this run the median |value|/SE is "
                     f"{median:.1f}, and {within:.0%} of the occurrences lie "
                     "within 2 SE of zero: their sign is not known. Ranked samples marked <i>within noise</i> "
                     "below are such samples.</p>")
    parts.append(f"<p>{html.escape(seed_caveat(run))}</p>")
    result = read_validation(run)
    if result is None:
        parts.append("<p>This run has not been validated against retraining. <code>"
                     f"{html.escape(validate_command(run))}</code> retrains its trajectory without chosen "
                     "data and shows here how well the values predicted it.</p>")
        return parts
    s = result.summary
    f = lambda x: "–" if x is None else f"{x:.2f}"  # noqa: E731
    ci = s.get("lds_ci")
    parts.append(
        f"<p>Validated by retraining the run's own trajectory without chosen data (loss weight 0, "
        f"everything else identical). Subsets: LDS (Spearman of predicted against actual over "
        f"{s['n_subsets']} random subsets) <b>{f(s['lds'])}</b>"
        + (f" (95 % interval {ci[0]:.2f} to {ci[1]:.2f})" if ci else "")
        + f", magnitude {f(s['subset_slope'])} (actual ≈ magnitude × predicted; 1 is the right size). "
        f"Sources left out one at a time: Spearman <b>{f(s['source_spearman'])}</b>"
        f" over {s['n_sources']}. Single occurrences: Spearman {f(s['occurrence_spearman'])} over "
        f"{s['n_occurrences']}"
        + (f"; one occurrence moves the final loss by {s['occurrence_actual_rms']:.2g} (rms) where "
           f"{s['occurrence_predicted_rms']:.2g} was predicted" if s.get("occurrence_actual_rms") else "")
        + f". A retrain with nothing removed reproduced the final weights to {s['baseline_max_abs_diff']:.2g} "
        f"(noise floor of the loss {s['noise_floor']:.2g}).</p>")
    for kind, label, title in (("source", "source", "leave one source out"),
                               ("subset", None, "random subsets removed")):
        table = result.tables.get(kind)
        if table is not None and table.num_rows:
            name = f"validation_{kind}s.png"
            png = figures.predicted_vs_actual(table, label, title)
            (out / name).write_bytes(png)
            parts.append(img(name, png, f"predicted against retrained loss change, {title}"))
            parts.append(f"<p>Each point is one retrain ({title}): x is the sum of the removed occurrences' "
                         "values, y the retrained change of the validation loss; on the dashed line the "
                         "values predicted retraining exactly.</p>")
    return parts
