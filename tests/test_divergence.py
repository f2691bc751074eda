"""Divergence guard: the segment sweep stops at the first step whose K or embeddings are
non-finite or exploding, naming the step and why, with nothing written for the segment;
η·λ_max(H) above 2 is reported; no NaN ever reaches a values table."""

from __future__ import annotations

import logging
import math

import pyarrow as pa
import pytest
import torch

from rayattr.embed.guard import DivergenceError, describe, eta_lambda_max, stability_edge
from rayattr.embed.segment import SegmentSpec, SegmentWorker
from rayattr.store.layout import segment_k_path, segment_sums_path, segment_values_path
from rayattr.reduce.aggregate import write_outputs
from rayattr.store import GradientWriter, Run, StepRecord

DIMS = {"l": 2}


def make_run(tmp_path, rows: list[list[float]], eta: float | list[float]) -> Run:
    """One sample per step with gradient rows[step] (width 2), step size eta."""
    etas = eta if isinstance(eta, list) else [eta] * len(rows)
    run = Run.create(str(tmp_path), "r", {"layer_dims": DIMS})
    with GradientWriter(run, 0, DIMS, steps_per_shard=len(rows)) as w:
        for step, g in enumerate(rows):
            w.write_step(step, [step], ["s"], {"l": torch.tensor([g])}, positions=[0])
    run.write_step_records([StepRecord(s, 0, 1.0, etas[s], [s], ["s"], [0]) for s in range(len(rows))])
    return run


def segment(run: Run, n: int) -> SegmentWorker:
    return SegmentWorker(run.uri, None, SegmentSpec(0, 0, n), [0, n])


def assert_nothing_written(run: Run) -> None:
    assert not run.exists(segment_k_path(0)) and not run.exists(segment_sums_path(0))
    assert not run.exists("grads/local")


def test_exploding_K_stops_at_the_step(tmp_path):
    """η·g² = 5 at every step: each step multiplies K's first direction by -4; the sweep
    (backwards from step 15) passes the bound at its 11th step, step 5."""
    run = make_run(tmp_path, [[math.sqrt(5.0), 0.0]] * 16, 1.0)
    with pytest.raises(DivergenceError, match=r"segment 0: K of layer 'l' is exploding at step 5: .*"
                                              r"\(η·λ_max\(H\) = 5 at this step, above 2: the step can amplify K\)"):
        segment(run, 16).compute()
    assert_nothing_written(run)


def test_non_finite_gradient_stops_at_the_step(tmp_path):
    rows = [[0.1, 0.2]] * 6
    rows[3] = [float("nan"), 0.0]
    run = make_run(tmp_path, rows, 0.5)
    with pytest.raises(DivergenceError, match=r"embeddings of layer 'l' are not finite at step 3"):
        segment(run, 6).compute()
    assert_nothing_written(run)


def test_large_step_is_reported(tmp_path, caplog):
    """One step with η·λ_max = 2.5 flips and stretches K once: no divergence, but reported to
    the driver, which warns once for the run (the segment itself logs nothing)."""
    rows = [[0.1, 0.0]] * 6
    rows[2] = [math.sqrt(2.5), 0.0]
    run = make_run(tmp_path, rows, 1.0)
    with caplog.at_level(logging.WARNING):
        out = segment(run, 6).compute()
    assert out["max_eta_lambda"] == pytest.approx(2.5) and out["max_eta_lambda_step"] == 2
    assert "η·λ_max" not in caplog.text
    assert run.exists(segment_k_path(0))


def test_eta_lambda_max_matches_the_spectrum():
    gen = torch.Generator().manual_seed(1)
    g = torch.randn(8, 5, generator=gen)
    exact = float(torch.linalg.eigvalsh(g.T.double() @ g.double())[-1])
    assert eta_lambda_max({"a": g}, 0.1) == pytest.approx(0.1 * exact, rel=1e-3)
    c = torch.randn(3, 5, generator=gen)  # sampled-label rows: H = (B / m) Σ ĝ ĝᵀ
    exact_c = float(torch.linalg.eigvalsh(c.T.double() @ c.double())[-1]) * 8 / 3
    assert eta_lambda_max({"a": g}, 0.1, {"a": c}, batch_size=8) == pytest.approx(0.1 * exact_c, rel=1e-3)


def test_preconditioned_eta_lambda_matches_the_spectrum():
    """Under AdamW K's curvature term is η Σ u gᵀ = η P H with u = P g: its top eigenvalue is
    that of P^½ H P^½, in float64."""
    gen = torch.Generator().manual_seed(2)
    g = torch.randn(6, 5, generator=gen, dtype=torch.float64)
    p = torch.rand(5, generator=gen, dtype=torch.float64) * 10 + 0.1  # a diagonal preconditioner
    root = torch.diag(p.sqrt())
    exact = float(torch.linalg.eigvalsh(root @ g.T @ g @ root)[-1])
    assert eta_lambda_max({"a": g}, 0.3, updates={"a": g * p}) == pytest.approx(0.3 * exact, rel=1e-6)
    assert eta_lambda_max({"a": g}, 0.3) != pytest.approx(0.3 * exact, rel=1e-2)  # P matters


@pytest.mark.parametrize("beta1", [0.0, 0.9])
def test_stability_edge_is_torch_adams(beta1):
    """torch's Adam with v held (β₂ → 1, past its bias correction) on ½ xᵀAx: stable just below
    2(1 + β₁)/(1 − β₁) / λ_max(P A), divergent just above it."""
    a = torch.tensor([3.0, 0.5], dtype=torch.float64)
    v = torch.tensor([4.0, 0.25], dtype=torch.float64)  # P = 1/√v: P A = diag(1.5, 1.0)
    lam = float((a / v.sqrt()).max())
    norms = {}
    for factor in (0.9, 1.1):
        x = torch.tensor([1.0, 1.0], dtype=torch.float64, requires_grad=True)
        lr = factor * stability_edge(beta1) / lam
        opt = torch.optim.Adam([x], lr=lr, betas=(beta1, 1 - 1e-15), eps=0.0, foreach=False)
        opt.state[x] = {"step": torch.tensor(1e18, dtype=torch.float64), "exp_avg": torch.zeros_like(x),
                        "exp_avg_sq": v.clone()}
        for _ in range(3000):
            opt.zero_grad()
            (0.5 * (a * x * x).sum()).backward()
            opt.step()
            if float(x.detach().norm()) > 1e4:
                break  # diverged (before g² could reach v and hold it back)
        norms[factor] = float(x.detach().norm())
    assert norms[0.9] < 1e-3 and norms[1.1] > 1e4, norms


def test_describe_names_the_bound_that_applies():
    assert stability_edge(0.0) == 2.0 and stability_edge(0.9) == pytest.approx(38.0)
    assert "contracts" in describe(1.5, 0.9)
    assert "stays below its stability edge 38" in describe(10.0, 0.9)
    assert "past the run's own stability edge" in describe(40.0, 0.9)
    assert "amplify K" in describe(3.0) and "stability edge" not in describe(3.0)


def test_non_finite_values_are_never_written(tmp_path):
    run = make_run(tmp_path, [[0.1, 0.2]] * 4, 0.5)
    worker = segment(run, 4)
    worker.compute()
    with pytest.raises(DivergenceError, match=r"segment 0: 1 value\(s\) are not finite, the first at step 0"):
        worker.finalize(worker.value_vectors({"l": torch.tensor([float("nan"), 0.0])}))
    assert not run.exists(segment_values_path(0))


def test_values_tables_refuse_nan(tmp_path):
    """The reducer's last check, for values that reached a segment table some other way."""
    run = Run.create(str(tmp_path), "r", {"layer_dims": DIMS})
    run.write_table(segment_values_path(0), pa.table({
        "sample_id": pa.array([0, 1, 2], pa.int64()), "source": ["s"] * 3, "step": pa.array([5, 6, 7], pa.int64()),
        "epoch": pa.array([0, 0, 0], pa.int64()), "position": pa.array([0, 0, 0], pa.int64()),
        "value": pa.array([0.5, float("nan"), float("inf")], pa.float64())}))
    with pytest.raises(DivergenceError, match=r"values/samples.parquet: 2 value\(s\) are not finite, the first at step 6"):
        write_outputs(run, 1, [0, 8])
    assert not run.exists("values/samples.parquet") and not run.exists("values/sources.parquet")


def cutting(run: Run, n: int) -> SegmentWorker:
    return SegmentWorker(run.uri, None, SegmentSpec(0, 0, n), [0, n], cut_unstable=True)


def finalized_values(run: Run, worker: SegmentWorker, first: int) -> dict[int, float]:
    """finalize's value per step, for the test vector v = (1, 0)."""
    v = {"l": torch.tensor([1.0, 0.0], dtype=torch.float64)}
    worker.finalize(worker.value_vectors(v), None, True, first)
    t = run.read_table(segment_values_path(0)).to_pydict()
    return dict(zip(t["step"], t["value"]))


def brute_force_1d(rows, eta, t: int) -> float:
    """SGD's DVEmb of step t's row on direction (1, 0): η Π_{k>t} (I − η g_k g_kᵀ) g_t, in 2-D."""
    e = eta * torch.tensor(rows[t], dtype=torch.float64)
    for k in range(t + 1, len(rows)):
        g = torch.tensor(rows[k], dtype=torch.float64)
        e = e - eta * g * (g @ e)
    return float(e[0])


def test_cut_stops_at_the_latest_step_past_the_edge_and_values_the_later_ones(tmp_path):
    """embed.unstable "cut": a step past the stability edge (η·λ 5 > 2 under SGD) stops the
    sweep there; the later steps are valued exactly, the cut step and earlier ones get none."""
    rows = [[0.3, 0.1 * (t % 3)] for t in range(12)]
    rows[2] = rows[6] = [math.sqrt(5.0), 0.0]  # two unstable steps: the later one cuts
    run = make_run(tmp_path, rows, 1.0)
    worker = cutting(run, 12)
    out = worker.compute()
    assert (out["unstable_step"], out["eta_lambda"]) == (6, pytest.approx(5.0))
    assert run.read_json("embed/cut/seg0000.json")["unstable_step"] == 6
    values = finalized_values(run, worker, first=7)
    assert sorted(values) == list(range(7, 12))
    for t, v in values.items():
        assert v == pytest.approx(brute_force_1d(rows, 1.0, t), rel=1e-5, abs=1e-9)
    # a restarted actor reads the cut back instead of sweeping again
    assert cutting(run, 12).compute()["unstable_step"] == 6
    # and by default the same run is refused
    with pytest.raises(DivergenceError, match="exploding"):
        segment(make_run(tmp_path / "again", [[math.sqrt(5.0), 0.0]] * 16, 1.0), 16).compute()


def test_cut_at_a_non_finite_step_and_a_segment_wholly_before_the_cut_is_empty(tmp_path):
    rows = [[0.1, 0.2]] * 6
    rows[3] = [float("nan"), 0.0]
    run = make_run(tmp_path, rows, 0.5)
    worker = cutting(run, 6)
    assert worker.compute()["unstable_step"] == 3
    assert sorted(finalized_values(run, worker, first=4)) == [4, 5]
    # first past this segment's end (a later segment cut): nothing of it is valued
    assert finalized_values(run, worker, first=6) == {}
    assert run.read_table("embed/scores/seg0000.parquet").num_rows == 0
