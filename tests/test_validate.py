"""`rayattr validate`: counterfactual retraining of a run's own trajectory.

- a retrain that removes nothing reproduces the run's final weights exactly;
- removal by loss weight 0 is the trajectory-specific leave-out: a plain float64 PyTorch
  loop over the same plan, dropping the same occurrences, gives the same loss change;
- the files follow their schema, retrains already done are reused, bad arguments are named.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest
import torch
from safetensors.torch import load

from rayattr.config import Config
from rayattr.data import BatchPlan, TokenizedDataset, load_tokenizer
from rayattr.pipeline.stages import run_pipeline
from rayattr.model.gradients import mean_loss
from rayattr.store import Run
from rayattr.model.build import build_model
from rayattr.validate import Removal, ValidationError, validate_run
from rayattr.validate.counterfactuals import (occurrence_removals, parse_window, predicted, source_removals,
                                              subset_removals, windowed)
from rayattr.validate.stats import bootstrap_spearman_ci, slope, spearman
from rayattr.store.layout import VALIDATION_SUMMARY as SUMMARY
from rayattr.validate.validation import TABLES, format_summary, read_validation, summarise, verdict

ROOT = Path(__file__).resolve().parent.parent


def tiny_config(store: str, run_id: str, **train) -> Config:
    return Config.from_dict({
        "run_id": run_id,
        "data": {"seq_len": 32, "builtin": {"n_train": 96, "n_validation": 16, "max_chars": 96}},
        "train": {"ranks": 2, "micro_batch": 4, "epochs": 2, "lr": 0.1, "optimizer": {"type": "sgd"},
                  "deepspeed": {"zero_optimization": {"stage": 1}}, **train},
        "capture": {"rank": 4},
        "embed": {"phases": 2},
        "store": {"uri": store, "steps_per_shard": 4},
    }).validate()


@pytest.fixture(scope="module")
def two_ranks(local_ray, tmp_path_factory) -> Run:
    """A finished run on 2 ranks with ZeRO off and gradient accumulation (2 micro-batches of 2
    per rank and step), to validate. (ZeRO-1, the default, is the session's validated_run.)"""
    cfg = tiny_config(str(tmp_path_factory.mktemp("store")), "two", grad_accum=2, micro_batch=2,
                      deepspeed={"zero_optimization": {"stage": 0}})
    return Run.open_uri(run_pipeline(cfg, progress=False).uri, mode="record")


@pytest.fixture(scope="module")
def validated(two_ranks):
    """One `rayattr validate` of two_ranks in this process (the session's Ray), asking for all
    that the leave-out, ε and smoothness tests compare: 1 subset of 10 %, 2 occurrences at
    ε = 1 and 0.01, the smoothness check, seed 3. One retraining gang for them all (its
    start-up, not the retrains, is what a validation costs here). Returns the printed lines,
    and the summary and tables as this validation left them (later tests validate again)."""
    import contextlib
    import io
    from types import SimpleNamespace

    from rayattr.cli import main

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = main(["validate", two_ranks.uri, "--subsets", "1", "--fraction", "0.1", "--occurrences", "2",
                     "--weight", "1", "0.01", "--smoothness", "--seed", "3", "--no-progress"])
    assert code == 0
    result = read_validation(Run.open_uri(two_ranks.uri))
    return SimpleNamespace(lines=out.getvalue().rstrip().splitlines(), summary=result.summary, tables=result.tables)


# --------------------------------------------------------------------------- retraining


def test_validate_writes_schema_and_reproduces_the_run(validated_run):
    """The session's validation of the finished run (ZeRO-1, the default; `rayattr validate` in
    its own process): 4 subsets of 20 %, every source, 3 occurrences."""
    run = Run.open_uri(validated_run.uri)
    summary = json.loads(run.read_bytes(SUMMARY))
    n_train = run.read_table("data/train.parquet").num_rows
    sources = run.read_table("values/sources.parquet")["source"].to_pylist()
    # nothing removed: the same weights bit for bit on the same world size, so no noise floor
    assert summary["baseline_max_abs_diff"] == 0.0
    assert summary["noise_floor"] == 0.0 and summary["baseline_loss"] == summary["run_loss"]
    assert (summary["n_subsets"], summary["n_sources"], summary["n_occurrences"]) == (4, len(sources), 3)
    assert len(sources) >= 2
    for kind, (path, cols) in TABLES.items():
        table = run.read_table(path)
        assert table.column_names == cols, kind
        assert np.isfinite(table["actual"].to_numpy()).all() and np.isfinite(table["predicted"].to_numpy()).all()
    samples = run.read_table("values/samples.parquet")
    subsets = run.read_table("validation/subsets.parquet").to_pylist()
    assert all(r["n_removed"] == round(0.2 * n_train) and r["n_occurrences"] == 2 * r["n_removed"] for r in subsets)
    # predicted is the sum of the removed occurrences' values
    src = run.read_table("validation/sources.parquet").to_pylist()
    corrupted = samples.filter(pc.equal(samples["source"], "corrupted"))
    got = {r["source"]: r["predicted"] for r in src}
    assert corrupted.num_rows and got["corrupted"] == pytest.approx(float(np.sum(corrupted["value"].to_numpy())))
    # removing a whole source moves the loss by more than nothing
    assert all(r["actual"] != 0.0 for r in src)
    for key in ("lds", "lds_ci", "source_spearman", "occurrence_spearman", "occurrence_slope",
                "baseline_max_abs_diff", "schema_version"):
        assert key in summary
    assert summary["lds_ci"] is None or summary["lds_ci"][0] <= summary["lds"] <= summary["lds_ci"][1]
    assert read_validation(run).summary == summary


def test_clip_coefficients_recorded_under_zero1(finished_run):
    """Under ZeRO-1 the clip factor comes from the optimizer's global norm; it matches a
    by-hand float64 replay of the same trajectory (the finished run: ZeRO-1, lr 0.3)."""
    run = Run.open_uri(finished_run[1])
    _, kappas = _reference_loss(run, None, 1.0)
    assert min(kappas) < 0.9
    np.testing.assert_allclose([r.clip for r in run.step_records()], kappas, rtol=1e-4)


def test_finished_retrains_are_reused(validated_run, tmp_path, monkeypatch):
    """A second validation asking for counterfactuals the run already retrained (here in the
    session's `rayattr validate` process) retrains nothing."""
    import shutil

    from rayattr.validate import gangs

    copy = tmp_path / "again"  # a copy: the shared validated run keeps its files
    shutil.copytree(validated_run.uri, copy)
    run = Run.open_uri(str(copy), mode="record")
    stored = {r["source"]: r["actual"] for r in run.read_table("validation/sources.parquet").to_pylist()}

    def fail(*args, **kwargs):
        raise AssertionError("retrained a counterfactual that was already in the run")

    monkeypatch.setattr(gangs, "retrain_all", fail)
    again = validate_run(run, sources=["corrupted"], progress=False)
    (row,) = again.tables["source"].to_pylist()
    assert row["actual"] == stored["corrupted"]


def _reference_loss(run: Run, removal: Removal | None, clip: float) -> tuple[float, list[float]]:
    """Trajectory-specific leave-out by hand: float64 SGD over the run's batch plan with each
    occurrence's loss weighted as `removal` says (removed ones dropped from their micro-batches'
    sums, the divisor kept; a direction's 1 + scale·w on every one), clipped to global norm
    `clip` as DeepSpeed does."""
    cfg = Config.from_dict(run.manifest["config"])
    tok = load_tokenizer(cfg.data.tokenizer)
    data = TokenizedDataset(run.read_table("data/train.parquet"), tok, cfg.data.seq_len)
    t = cfg.train
    plan = BatchPlan(len(data), t.micro_batch, t.ranks, t.grad_accum, t.epochs, t.seed)
    model = build_model(cfg.model, tok.vocab_size, cfg.data.seq_len, seed=t.seed)
    model.load_state_dict(load(run.read_bytes("weights/initial.safetensors")))
    model.double()
    ids = data.ids.numpy()
    kappas = []
    for step in range(plan.num_steps):
        model.zero_grad()
        for rank in range(t.ranks):
            for micro in range(t.grad_accum):
                idx = plan.rank_slice(step, rank, micro)
                weights = removal.loss_weights(step, ids[idx]) if removal else np.ones(len(idx))
                keep = weights != 0
                if not keep.any():  # the whole micro-batch removed: it adds nothing to the sum
                    continue
                b = data.batch(idx[keep])
                logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits[:, :-1]
                tok_loss = torch.nn.functional.cross_entropy(logits.transpose(1, 2), b["labels"][:, 1:],
                                                             ignore_index=-100, reduction="none")
                per_sample = tok_loss.sum(1) / (b["labels"][:, 1:] != -100).sum(1) * torch.from_numpy(weights[keep])
                # the global batch's mean loss: each rank's micro-batch mean, averaged over ranks and micro-steps
                (per_sample.sum() / (t.micro_batch * t.ranks * t.grad_accum)).backward()
        with torch.no_grad():
            grads = [p.grad for p in model.parameters() if p.grad is not None]
            norm = float(torch.stack([g.pow(2).sum() for g in grads]).sum().sqrt())
            kappa = min(1.0, clip / (norm + 1e-6)) if clip else 1.0  # DeepSpeed's global-norm clipping
            kappas.append(kappa)
            for p in model.parameters():
                if p.grad is not None:
                    p -= kappa * t.lr * p.grad
    val = TokenizedDataset(run.read_table("data/validation.parquet"), tok, cfg.data.seq_len)
    return mean_loss(model.eval(), val), kappas


def test_zero_weight_equals_trajectory_specific_leave_out(two_ranks, validated):
    """On a tiny GPT-2 with ZeRO off and gradient accumulation, the retrained loss change
    equals a float64 by-hand leave-out for a subset and for single occurrences."""
    run = two_ranks
    samples = run.read_table("values/samples.parquet")
    rng = np.random.default_rng(3)  # validated's seed: the same draws, subsets first
    removals = subset_removals(samples, 1, 0.1, rng) + occurrence_removals(samples, 2, rng)
    clip = 1.0  # DeepSpeed's default gradient_clipping, which the run did not set
    base, kappas = _reference_loss(run, None, clip)
    assert base == pytest.approx(validated.summary["run_loss"], abs=2e-5)  # the same trajectory
    # the step records carry the clipping the run applied, folded into eta (ZeRO-0 path)
    records = run.step_records()
    assert min(kappas) < 0.9  # the test clips, else it would prove nothing
    np.testing.assert_allclose([r.clip for r in records], kappas, rtol=1e-4)
    np.testing.assert_allclose([r.eta for r in records], [k * 0.1 / 8 for k in kappas], rtol=1e-4)
    actual = {("subset", r["subset"]): r["actual"] for r in validated.tables["subset"].to_pylist()}
    actual.update({("occurrence", f"{r['sample_id']}@{r['step']}"): r["actual"]
                   for r in validated.tables["occurrence"].to_pylist() if r["eps"] == 1.0})  # weight 0
    assert len(actual) == len(removals) == 3
    for removal in removals:
        want = _reference_loss(run, removal, clip)[0] - base
        got = actual[(removal.kind, removal.name)]
        assert abs(want) > 1e-6, removal  # something measurable was removed
        assert got == pytest.approx(want, rel=0.02, abs=3e-6), removal
    # --window 6:18: a subset drawn from the window's occurrences, removed there only (its
    # occurrences in the other epoch stay), against the same leave-out by hand
    inside = windowed(samples, (6, 18))
    (sub,) = subset_removals(inside, 1, 0.1, np.random.default_rng(3))
    sub = replace(sub, window=(6, 18))
    result = validate_run(run, subsets=1, fraction=0.1, seed=3, window="6:18", progress=False)
    (row,) = result.tables["subset"].to_pylist()
    assert result.summary["window"] == [6, 18] and row["n_removed"] == len(sub.sample_ids)
    assert row["n_occurrences"] == inside.filter(pc.is_in(inside["sample_id"], pa.array(sub.sample_ids))).num_rows
    assert row["n_occurrences"] < samples.filter(pc.is_in(samples["sample_id"], pa.array(sub.sample_ids))).num_rows
    want = _reference_loss(run, sub, clip)[0] - base
    assert abs(want) > 1e-6 and row["actual"] == pytest.approx(want, rel=0.02, abs=3e-6)


# --------------------------------------------------------------------------- bad input


def test_bad_arguments_are_named(two_ranks, tmp_path):
    with pytest.raises(ValidationError, match="strictly between 0 and 1"):
        validate_run(two_ranks, subsets=2, fraction=1.0, progress=False)
    with pytest.raises(ValidationError, match=r"unknown source\(s\) \['nope'\]"):
        validate_run(two_ranks, sources=["nope"], progress=False)
    with pytest.raises(ValidationError, match="nothing to validate"):
        validate_run(two_ranks, progress=False)
    unfinished = Run.create(str(tmp_path), "busy", {"status": "training", "config": {}})
    with pytest.raises(ValidationError, match="not finished"):
        validate_run(unfinished, sources=True, progress=False)


@pytest.mark.parametrize("args, message", [
    (["--subsets", "2", "--fraction", "0"], "strictly between 0 and 1"),
    (["--subsets", "2", "--fraction", "1.5"], "strictly between 0 and 1"),
    (["--sources", "nope"], "unknown source"),
])
def test_cli_bad_arguments(two_ranks, args, message, capsys):
    from rayattr.cli import main

    try:
        code = main(["validate", two_ranks.uri, *args])
    except SystemExit as e:  # argparse's own refusals
        code = e.code
    assert code == 2
    assert message in capsys.readouterr().err


# --------------------------------------------------------------------------- pieces


def _samples() -> pa.Table:
    ids = np.array([1, 2, 3, 4, 1, 2, 3, 4])
    return pa.table({"sample_id": ids, "source": ["a", "a", "b", "b"] * 2,
                     "step": np.array([0, 0, 1, 1, 2, 2, 3, 3]), "value": np.arange(8, dtype=float)})


def test_removals_and_their_predictions():
    samples = _samples()
    a, b = source_removals(samples, None)
    assert (a.name, a.sample_ids, b.sample_ids) == ("a", (1, 2), (3, 4))
    assert predicted(samples, a) == (0 + 1 + 4 + 5, 4)
    one = Removal("occurrence", "3@1", (3,), 1)
    assert predicted(samples, one) == (2.0, 1)
    assert one.removes(1, np.array([3, 4])).tolist() == [True, False]
    assert not one.removes(3, np.array([3, 4])).any()  # the same sample at another step stays
    subs = subset_removals(samples, 3, 0.5, np.random.default_rng(0))
    assert all(len(s.sample_ids) == 2 for s in subs) and len({s.key for s in subs}) >= 2
    occ = occurrence_removals(samples, 20, np.random.default_rng(0))
    assert len(occ) == 8 and len({o.key for o in occ}) == 8
    assert Removal.from_dict(one.to_dict()) == one
    late = Removal("source", "a", (1, 2), window=(1, 4))  # steps [1, 4) of sample 1's and 2's occurrences
    assert Removal.from_dict(late.to_dict()) == late and late.key != replace(late, window=None).key
    assert late.removes(1, np.array([1, 3])).tolist() == [True, False] and not late.removes(0, np.array([1])).any()
    assert predicted(samples, late) == (4 + 5, 2)


def test_window_arguments():
    assert parse_window("144:", 192) == (144, 192) and parse_window(":48", 192) == (0, 48)
    assert parse_window("0:192", 192) is None and parse_window(None, 192) is None
    for bad in ("5", "a:b", "10:5", "0:193", "-1:4", "1:2:3"):
        with pytest.raises(ValidationError, match="--window"):
            parse_window(bad, 192)


def test_removals_read_the_stored_values_by_row_group_and_column(tmp_path):
    """From values/samples.parquet read a row group and a few columns at a time, the removals and
    predictions equal those from the whole table."""
    from rayattr.store import Run
    from rayattr.validate.counterfactuals import predicted_all, run_samples

    rng = np.random.default_rng(1)
    n = 3000
    table = pa.table({"sample_id": rng.integers(0, 400, n), "source": rng.choice(["a", "b", "c"], n),
                      "step": np.arange(n) // 16, "epoch": np.zeros(n, np.int64), "value": rng.normal(size=n)})
    run = Run.create(str(tmp_path / "store"), "r")
    with run.table_writer("values/samples.parquet") as w:
        for a in range(0, n, 256):  # row groups of 256 occurrences
            w.write(table.slice(a, 256))
    stored = run_samples(run)
    read = []
    assert [b.num_rows for b in stored(["step"])] == [256] * 11 + [n - 11 * 256]
    for columns in (["sample_id"], ["source", "sample_id"], ["sample_id", "step", "value"]):
        read += [b.schema.names for b in stored(columns)]
    assert all("epoch" not in names for names in read)
    for make in (lambda s: subset_removals(s, 3, 0.3, np.random.default_rng(5)), lambda s: source_removals(s, None),
                 lambda s: occurrence_removals(s, 40, np.random.default_rng(5))):
        assert make(stored) == make(table)
    removals = source_removals(table, None) + occurrence_removals(table, 10, np.random.default_rng(2))
    got, want = predicted_all(stored, removals), [predicted(table, r) for r in removals]
    assert [c for _, c in got] == [c for _, c in want]
    np.testing.assert_allclose([v for v, _ in got], [v for v, _ in want], rtol=1e-12)


def test_statistics():
    p = np.array([1.0, 2.0, 3.0, 4.0, 5.0])
    assert spearman(p, 2 * p) == pytest.approx(1.0) and spearman(p, -p) == pytest.approx(-1.0)
    assert spearman(p[:2], p[:2]) is None and spearman(p, np.ones(5)) is None
    assert slope(p, 0.5 * p) == pytest.approx(0.5)
    rng = np.random.default_rng(0)
    noisy = p + rng.normal(0, 1.5, 5)
    lo, hi = bootstrap_spearman_ci(p, noisy, rng)
    assert -1 <= lo <= spearman(p, noisy) <= hi <= 1 and hi - lo > 0


def test_summary_schema_is_documented(validated, validated_run):
    """Every key validate writes into summary.json is in docs/method.md's schema table (the
    schema is a promise to users: a new key must be documented): the keys of both validations,
    one with every kind of counterfactual but directions and one with ε pairs and smoothness."""
    row = next(line for line in (ROOT / "docs" / "method.md").read_text().splitlines()
               if line.startswith("| `validation/summary.json`"))
    for summary in (validated.summary, json.loads(Run.open_uri(validated_run.uri).read_bytes(SUMMARY))):
        assert [k for k in summary if k not in row] == []


def test_as_many_gangs_as_the_cluster_holds(monkeypatch):
    """A gang holds one CPU (one GPU with use_gpu) per rank of the run; never fewer than one."""
    from rayattr.validate import gangs

    cluster = {"CPU": 7.0, "GPU": 3.0}
    monkeypatch.setattr(gangs.ray, "cluster_resources", lambda: cluster)
    two = Config.from_dict({"train": {"ranks": 2}})
    assert gangs.default_gangs(two) == 3
    assert gangs.default_gangs(two.with_overrides(**{"train.use_gpu": True})) == 1  # 3 GPUs: one gang of 2
    cluster.update(CPU=1.0)
    assert gangs.default_gangs(two) == 1


def test_baseline_distance_to_the_final_weights():
    from rayattr.validate.retrain import _max_abs_diff

    module = torch.nn.Linear(2, 2)
    final = {k: v.detach().clone() for k, v in module.state_dict().items()}
    assert _max_abs_diff(module, final) == 0.0
    final["bias"][1] += 0.25
    assert _max_abs_diff(module, final) == pytest.approx(0.25)
    with pytest.raises(ValidationError, match="lacks weights.*'extra'"):
        _max_abs_diff(module, {**final, "extra": torch.zeros(1)})


def test_first_order_summary_pairs_occurrences_across_eps():
    """Δloss/ε at two ε: linearity and the values against the small-ε response, paired by
    occurrence whatever the row order, and only over occurrences retrained at both ε."""
    steps, ids = [3, 1, 2, 5], [30, 10, 20, 50]
    small = pa.table({"sample_id": ids, "step": steps, "eps": [0.01] * 4,
                      "predicted": [4.0, 1.0, 2.0, 9.0], "actual": [2.0, 0.5, 1.0, 4.0]})
    # the full removal, in another order and without occurrence 50@5: not paired, so left out
    large = pa.table({"sample_id": [20, 30, 10], "step": [2, 3, 1], "eps": [1.0] * 3,
                      "predicted": [2.0, 4.0, 1.0], "actual": [-1.0, 3.0, 0.4]})
    s = summarise({"occurrence": pa.concat_tables([small, large])}, np.random.default_rng(0))
    assert s["first_order_eps"] == 0.01 and s["first_order_n"] == 3 and s["linearity_eps"] == [1.0, 0.01]
    assert s["first_order_spearman"] == pytest.approx(1.0)
    assert s["first_order_rms_ratio"] == pytest.approx(2.0)  # the values are twice the response
    # paired by occurrence: 10@1 -> (0.4, 0.5), 20@2 -> (-1, 1), 30@3 -> (3, 2)
    assert s["linearity_spearman"] == pytest.approx(spearman(np.array([0.4, -1.0, 3.0]), np.array([0.5, 1.0, 2.0])))
    assert s["linearity_rms_ratio"] == pytest.approx(np.sqrt((0.16 + 1 + 9) / (0.25 + 1 + 4)))
    assert s["n_occurrences"] == 3 and s["occurrence_spearman"] is not None  # headline: the full removal
    one = summarise({"occurrence": large}, np.random.default_rng(0))
    assert one["first_order_eps"] == 1.0 and "linearity_eps" not in one


def test_partial_removals_are_retrained_per_eps(two_ranks, validated):
    """--weight 1 0.01: each occurrence retrained twice (weight 0 and 0.99); the ε = 1 rows are
    the full removal's, the small-ε rows a different, per-unit response."""
    occ = validated.tables["occurrence"].to_pylist()
    assert sorted(r["eps"] for r in occ) == [0.01, 0.01, 1.0, 1.0]
    weights = {two_ranks.read_json(f"validation/retrains/{n}")["removal"]["weight"]
               for n in two_ranks.list("validation/retrains")}
    assert {0.0, 0.99} <= {round(w, 6) for w in weights}
    full = {(r["sample_id"], r["step"]): r["actual"] for r in occ if r["eps"] == 1.0}
    part = {(r["sample_id"], r["step"]): r["actual"] for r in occ if r["eps"] == 0.01}
    assert full.keys() == part.keys() and all(part[k] != full[k] for k in full)
    assert validated.summary["first_order_eps"] == 0.01 and validated.summary["first_order_n"] == 2
    assert "linear response" in format_summary(validated.summary)
    with pytest.raises(ValidationError, match="ε must lie"):
        validate_run(two_ranks, occurrences=1, eps=(0.0,), progress=False)


def _summary(**kw):
    base = {"n_subsets": 0, "n_sources": 0, "n_occurrences": 0, "lds": None, "lds_ci": None,
            "subset_slope": None, "source_spearman": None, "source_slope": None, "occurrence_spearman": None,
            "occurrence_slope": None, "baseline_max_abs_diff": 0.0, "baseline_loss": 1.0, "run_loss": 1.0,
            "noise_floor": 0.0, "first_order_eps": None}
    return {**base, **kw}


@pytest.mark.parametrize("fields, says", [
    ({"linearity_eps": [1.0, 0.01], "linearity_spearman": 0.3, "first_order_eps": 0.01, "first_order_n": 8,
      "first_order_spearman": 0.95, "first_order_rms_ratio": 1.0}, "not a first-order event"),
    ({"linearity_eps": [1.0, 0.01], "linearity_spearman": 0.97, "first_order_eps": 0.01, "first_order_n": 8,
      "first_order_spearman": 0.95, "first_order_rms_ratio": 1.1}, "The values track"),
    ({"linearity_eps": [1.0, 0.01], "linearity_spearman": 0.97, "first_order_eps": 0.01, "first_order_n": 8,
      "first_order_spearman": 0.95, "first_order_rms_ratio": 5.5}, "miss the response"),
    ({"linearity_eps": [1.0, 0.01], "linearity_spearman": 0.97, "first_order_eps": 0.01, "first_order_n": 8,
      "first_order_spearman": -0.5, "first_order_rms_ratio": 1.0}, "miss the response"),
    ({"n_subsets": 16, "lds": 0.4, "lds_ci": [-0.3, 0.85], "subset_slope": 4.2}, "spans zero"),
    ({"n_subsets": 16, "lds": 0.6, "lds_ci": [0.2, 0.85], "subset_slope": 1.0}, "only roughly"),
    ({"n_subsets": 16, "lds": 0.93, "lds_ci": [0.85, 0.97], "subset_slope": 1.0}, "rankings can be acted on"),
    ({}, "Too few counterfactuals"),
])
def test_verdict_follows_the_measurements(fields, says):
    s = _summary(**fields)
    assert says in verdict(s)
    text = format_summary(s)
    assert text.splitlines()[-1].startswith("verdict: ") and says in text
    # only the sections that were measured are printed
    assert ("subsets:" in text) == bool(s["n_subsets"]) and "sources:" not in text and "occurrences:" not in text
    if s["lds_ci"] and s["lds_ci"][0] <= 0:
        assert "spans zero" in text.splitlines()[0] and "1 is the right size" in text


# --------------------------------------------------------------------------- attributability


def test_direction_weights_are_a_deterministic_rademacher_vector():
    """w is ±1, a function of (seed, sample_id, step) alone: the same whichever rank or order
    asks, balanced, different for another seed or step; pinned, so stored retrains stay valid."""
    from rayattr.validate.counterfactuals import rademacher

    ids = np.arange(20000)
    w = rademacher(7, ids, 3)
    assert w.dtype == np.float64 and w.shape == (20000,) and set(np.unique(w)) == {-1.0, 1.0}
    assert abs(w.mean()) < 0.03  # balanced: sd of the mean of 20000 signs is 0.007
    perm = np.random.default_rng(0).permutation(20000)
    np.testing.assert_array_equal(rademacher(7, ids[perm], 3), w[perm])  # order and split do not matter
    np.testing.assert_array_equal(rademacher(7, ids, np.full(20000, 3)), w)
    for other in (rademacher(8, ids, 3), rademacher(7, ids, 4)):
        assert abs((other * w).mean()) < 0.03  # another seed or step: an independent sign
    assert rademacher(0, np.arange(8), 0).tolist() == [1.0, 1.0, -1.0, 1.0, 1.0, 1.0, -1.0, 1.0]


def test_a_direction_is_a_counterfactual_with_a_stable_key():
    import hashlib

    from rayattr.validate.counterfactuals import rademacher
    from rayattr.validate.smoothness import direction_retrains

    d = Removal("direction", "0.2", direction=3, scale=0.2)
    ids = np.array([5, 9, 11, 40])
    got = d.loss_weights(6, ids)
    np.testing.assert_allclose(got, 1 + 0.2 * rademacher(3, ids, 6))
    assert set(np.round(got, 12)) <= {0.8, 1.2} and d.removes(6, ids).all()
    late = replace(d, window=(4, 8))
    assert late.loss_weights(3, ids).tolist() == [1.0] * 4 and not late.removes(8, ids).any()
    np.testing.assert_array_equal(late.loss_weights(7, ids), d.loss_weights(7, ids))
    # a removal's weights are what retraining applied before directions existed
    one = Removal("occurrence", "9@6", (9,), 6, weight=0.99)
    assert one.loss_weights(6, ids).tolist() == [1.0, 0.99, 1.0, 1.0] and one.loss_weights(5, ids).tolist() == [1.0] * 4
    # the key names seed, scale and window; a removal's key is what it always was (retrains reused)
    assert Removal.from_dict(json.loads(json.dumps(d.to_dict()))) == d
    keys = {d.key, replace(d, direction=4).key, replace(d, scale=0.1).key, late.key}
    assert len(keys) == 4 and d.key == Removal("direction", "other name", direction=3, scale=0.2).key
    text = json.dumps({"ids": [1, 2], "step": None})
    assert Removal("source", "a", (1, 2)).key == f"source-{hashlib.sha1(text.encode()).hexdigest()[:16]}"
    with pytest.raises(ValidationError, match="scale"):
        Removal("direction", "x", direction=0, scale=1.5)
    # h and 2h per step size: 4 retrains by default, a shared scale retrained once
    assert [r.scale for r in direction_retrains(0, (0.1, 0.01))] == [0.1, 0.2, 0.01, 0.02]
    assert [r.scale for r in direction_retrains(0, (0.1, 0.05))] == [0.1, 0.2, 0.05]


def test_the_values_predict_a_direction_as_minus_the_signed_sum():
    from rayattr.validate.counterfactuals import direction_predicted, rademacher

    samples = _samples()
    w = rademacher(2, samples["sample_id"].to_numpy(), samples["step"].to_numpy())
    assert direction_predicted(samples, 2) == (pytest.approx(-float(w @ samples["value"].to_numpy())), 8)
    assert direction_predicted(windowed(samples, (2, 4)), 2)[1] == 4


@pytest.mark.parametrize("bad", [[0.0, 0.1], [0.1, 0.6], [-0.1, 0.01], [0.1], [0.1, 0.1], ["x", 0.1]])
def test_smoothness_steps_are_checked(bad):
    from rayattr.validate.smoothness import check_steps

    with pytest.raises(ValidationError, match="--smoothness-steps"):
        check_steps(bad)


def test_smoothness_steps_named_on_the_command_line(capsys):
    from rayattr.cli import main
    from rayattr.validate.smoothness import check_steps, parse_steps

    assert parse_steps("0.01, 0.1") == (0.1, 0.01) and check_steps([0.5, 0.25]) == (0.5, 0.25)
    with pytest.raises(SystemExit) as e:
        main(["validate", "some-run", "--smoothness-steps", "0.1,0.7"])
    assert e.value.code == 2 and "h = 0.7 is out of range" in capsys.readouterr().err


def test_smoothness_score_from_the_losses():
    """A quadratic response is smooth at small h (ν = c·h / |a + 2c·h|, slopes a + c·h); a
    response that is noise is not; the threshold decides."""
    from rayattr.validate.smoothness import THRESHOLD, smoothness_of

    def quadratic(a, c, f0=3.0):
        return {h: (f0 + a * h + c * h * h, f0 + 2 * a * h + 4 * c * h * h) for h in (0.1, 0.01)}

    s = smoothness_of(3.0, quadratic(1.0, 0.5))
    nu = {p["h"]: p["nu"] for p in s["per_step"]}
    assert nu[0.1] == pytest.approx(0.05 / 1.1) and nu[0.01] == pytest.approx(0.005 / 1.01)
    assert [p["slope"] for p in s["per_step"]] == [pytest.approx(1.05), pytest.approx(1.005)]
    assert s["slope_agreement"] == pytest.approx(1 - 0.045 / 1.05)
    assert s["score"] == pytest.approx(min(1 - nu[0.1], s["slope_agreement"])) and s["attributable"]
    assert smoothness_of(3.0, quadratic(-2.0, 0.0))["score"] == pytest.approx(1.0)  # linear
    assert not smoothness_of(3.0, quadratic(1.0, 20.0))["attributable"]  # smooth, but curved at 1 % removals
    rng = np.random.default_rng(0)  # chaos: each retrain's loss a draw of its own, whatever h
    scores = [smoothness_of(3.0, {h: tuple(3.0 + rng.normal(0, 1e-3, 2)) for h in (0.1, 0.01)})["score"]
              for _ in range(200)]
    assert np.median(scores) < 0.2 and np.mean(np.array(scores) >= THRESHOLD) < 0.05
    s = smoothness_of(3.0, quadratic(1.0, 2.0))
    assert smoothness_of(3.0, quadratic(1.0, 2.0), threshold=s["score"] - 1e-9)["attributable"]
    assert not smoothness_of(3.0, quadratic(1.0, 2.0), threshold=s["score"] + 1e-9)["attributable"]


def _smooth_summary(attributable: bool, **kw) -> dict:
    score = 0.95 if attributable else 0.1
    per = [{"h": 0.1, "loss_h": 3.1, "loss_2h": 3.2, "slope": 1.0, "nu": 0.9 - score},
           {"h": 0.01, "loss_h": 3.01, "loss_2h": 3.02, "slope": 1.0, "nu": 0.01}]
    return _summary(smoothness={"score": score, "threshold": 0.7, "max_nu": 0.9 - score, "slope_agreement": score,
                                "steps": [0.1, 0.01], "per_step": per, "seed": 0, "predicted_slope": 0.5},
                    attributable=attributable, **kw)


def test_the_verdict_opens_with_attributability():
    for yes, says in ((True, "This run is attributable"), (False, "This run is not attributable")):
        s = _smooth_summary(yes, n_subsets=16, lds=0.6, lds_ci=[0.2, 0.85], subset_slope=1.0)
        v = verdict(s)
        assert v.startswith(says) and "smoothness" in v and "only roughly" in v
        text = format_summary(s)
        assert text.splitlines()[-1] == f"verdict: {v}" and "slope agreement" in text
    # single-occurrence linearity, where measured, is named beside it
    s = _smooth_summary(False, linearity_eps=[1.0, 0.01], linearity_spearman=0.97)
    assert verdict(s).startswith("This run is not attributable") and "Spearman 0.97" in verdict(s).split("), so")[0]
    assert "attributable" not in verdict(_summary())


def test_the_trust_box_opens_with_attributability(tmp_path):
    from rayattr.report.trust import trust_box

    run = Run.create(str(tmp_path), "r", {"status": "done"})
    s = _smooth_summary(False)
    s["verdict"] = verdict(s)
    run.write_json(SUMMARY, s)
    sources = pa.table({"source": ["a", "b"], "value": [1.0, 2.0]})
    (box,) = trust_box(run, sources, None)
    assert "<b>Verdict:</b> This run is not attributable" in box and "Smoothness 0.10" in box


def test_smoothness_end_to_end(two_ranks, validated):
    """`rayattr validate RUN --smoothness` (validated, seed 3): 4 retrains along one seeded
    direction (the nothing-removed retrain is f(0)); the summary carries the score and the
    verdict, the verdict opens with it, and a direction retrain's loss change equals the
    float64 replay with the same per-occurrence weights."""
    from rayattr.validate.smoothness import direction_retrains

    lines, summary = validated.lines, validated.summary
    sm = summary["smoothness"]
    assert sm["seed"] == 3 and sm["steps"] == [0.1, 0.01] and sm["threshold"] == 0.7
    assert [p["h"] for p in sm["per_step"]] == [0.1, 0.01] and 0 <= sm["score"] <= 1
    assert sm["n_occurrences"] == two_ranks.read_table("values/samples.parquet").num_rows
    assert summary["attributable"] == (sm["score"] >= 0.7)
    says = "This run is attributable" if summary["attributable"] else "This run is not attributable"
    assert summary["verdict"].startswith(says) and lines[-1] == f"verdict: {summary['verdict']}"
    assert any(line.startswith("smoothness (random ±1 direction, seed 3)") for line in lines)
    retrains = direction_retrains(3, (0.1, 0.01))
    assert sm["retrains"] == [r.key for r in retrains]
    records = {r.key: two_ranks.read_json(f"validation/retrains/{r.key}.json") for r in retrains}
    assert all(rec["removed"] == sm["n_occurrences"] for rec in records.values())  # every occurrence reweighted
    base, _ = _reference_loss(two_ranks, None, 1.0)
    assert base == pytest.approx(sm["baseline_loss"], abs=2e-5)
    for r in retrains[:2]:  # h = 0.1: the scales 0.1 and 0.2
        want = _reference_loss(two_ranks, r, 1.0)[0] - base
        got = records[r.key]["loss"] - sm["baseline_loss"]
        assert abs(want) > 1e-5 and got == pytest.approx(want, rel=0.02, abs=3e-6), r
    # a later validation that does not ask for it keeps the check in the summary (it asks for
    # validated's subset again: retrained already, so no gang starts)
    again = validate_run(two_ranks, subsets=1, fraction=0.1, seed=3, progress=False)
    assert again.summary["smoothness"] == sm and again.summary["verdict"].startswith(says)
