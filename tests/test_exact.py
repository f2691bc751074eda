"""`rayattr exact`: the exact first-order response of a finished run, against what it must equal.

- its checkpointed reverse pass equals the unrolled one (one segment for the whole run) and
  does not depend on where the checkpoints fall;
- it equals the central difference of two float64 retrains with loss weights 1 ∓ ε;
- the command writes exact/ in the values' schema, says how the run's values agree by phase,
  and refuses a run it cannot replay;
- a replay that leaves the run's trajectory later is recorded as where the run amplifies rounding.
(The same on an AdamW run with momentum and clipping: tests/test_pipeline_adamw.py.)
"""

from __future__ import annotations

import shutil
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from rayattr.exact.metagradient import exact_values
from rayattr.exact.replay import ExactError, Replay
from rayattr.exact.metagradient import DEPARTURE, Reproduction
from rayattr.store import Run


def removal_response(rp: Replay, step: int, sample_id: int, eps: float) -> float:
    """(ℓ_val(w = 1 − ε) − ℓ_val(w = 1 + ε)) / 2ε for occurrence `sample_id`@`step`, by two
    float64 retrains: the central difference of −∂ℓ_val/∂w."""
    ones = torch.ones(rp.batch_size(), dtype=torch.float64)
    col = int(np.flatnonzero(rp.batch(step)[1] == sample_id)[0])

    def final_loss(weight: float) -> float:
        state = rp.initial_state()
        for t in range(rp.num_steps):
            w = ones.clone()
            if t == step:
                w[col] = weight
            state, _, _ = rp.step(state, t, w, differentiable=False)
        return float(rp.val_loss(state.params))

    return (final_loss(1 - eps) - final_loss(1 + eps)) / (2 * eps)


def check_exact(rp: Replay, checks: list[tuple[int, int]], spacings: tuple[int, ...]) -> None:
    """The reverse pass at several checkpoint spacings against one segment and against retrains."""
    whole = exact_values(rp, every=rp.num_steps).samples
    value = {(s, z): v for s, z, v in zip(*(whole[c].to_pylist() for c in ("step", "sample_id", "value")))}
    assert np.abs(whole["value"].to_numpy()).max() > 0
    for every in spacings:
        got = exact_values(rp, every=every).samples
        assert got["sample_id"].to_pylist() == whole["sample_id"].to_pylist()
        np.testing.assert_allclose(got["value"].to_numpy(), whole["value"].to_numpy(), rtol=1e-9,
                                   atol=1e-12 * np.abs(whole["value"].to_numpy()).max())
    for t, col in checks:
        sid = int(rp.batch(t)[1][col])
        assert removal_response(rp, t, sid, 1e-4) == pytest.approx(value[(t, sid)], rel=1e-4, abs=1e-10)


@pytest.fixture(scope="module")
def replay(finished_run):
    torch.set_num_threads(1)
    return Replay(Run.open_uri(finished_run[1]))


def test_sgd_exact_values_equal_retrains_wherever_the_checkpoints_fall(replay):
    T = replay.num_steps
    check_exact(replay, [(0, 1), (T // 2, 3), (T - 1, 0)], spacings=(1, 3))


def test_the_command_writes_exact_values_and_the_agreement(finished_run, tmp_path, capsys):
    from rayattr.cli import main
    from rayattr.store.layout import EXACT_SAMPLES, EXACT_SOURCES, EXACT_SUMMARY, SAMPLE_VALUES

    copy = tmp_path / "copy"
    shutil.copytree(finished_run[1], copy)
    assert main(["exact", str(copy), "--every", "4", "--no-progress"]) == 0
    out = capsys.readouterr().out
    run = Run.open_uri(str(copy))
    samples, values = run.read_table(EXACT_SAMPLES), run.read_table(SAMPLE_VALUES)
    assert samples.schema.names == ["sample_id", "source", "step", "epoch", "value"]
    assert sorted(zip(samples["step"].to_pylist(), samples["sample_id"].to_pylist())) == \
        sorted(zip(values["step"].to_pylist(), values["sample_id"].to_pylist()))
    sources = run.read_table(EXACT_SOURCES).to_pylist()
    by_source = {}
    for s, v in zip(samples["source"].to_pylist(), samples["value"].to_pylist()):
        by_source[s] = by_source.get(s, 0.0) + v
    assert {r["source"]: r["value"] for r in sources} == pytest.approx(by_source, rel=1e-12)
    summary = run.read_json(EXACT_SUMMARY)
    assert summary["checkpoint_every"] == 4 and summary["occurrences"] == samples.num_rows
    assert summary["replay_departs_at"] is None  # this SGD run follows its recorded trajectory
    assert summary["final_weights_relative_distance"] < 1e-5
    for band, a in summary["agreement"].items():
        assert a["occurrences"] > 0 and f"{band:<13} steps {a['steps'][0]}–{a['steps'][1]}" in out
    # the agreement is the values' against the exact ones: recompute one band's Spearman
    from scipy.stats import spearmanr

    a, b = summary["agreement"]["last quarter"]["steps"]
    ex = {(s, z): v for s, z, v in zip(samples["step"].to_pylist(), samples["sample_id"].to_pylist(),
                                       samples["value"].to_pylist()) if a <= s < b}
    pairs = [(v, ex[(s, z)]) for s, z, v in zip(values["step"].to_pylist(), values["sample_id"].to_pylist(),
                                                values["value"].to_pylist()) if a <= s < b]
    rho = spearmanr(*zip(*pairs)).statistic
    assert summary["agreement"]["last quarter"]["spearman"] == pytest.approx(rho)
    assert "the float64 replay follows the run to the end" in out
    assert summary["sharpness"]["step"] == summary["num_steps"] - 1 and "along the validation gradient" in out
    # `rayattr values --exact` lists the exact per-source table
    assert main(["values", str(copy), "--exact", "--format", "json"]) == 0
    import json

    listed = json.loads(capsys.readouterr().out)
    assert {r["source"]: r["value"] for r in listed} == pytest.approx(by_source, rel=1e-12)
    # the report's trust box says it, band by band
    from rayattr.report.trust import trust_box
    from rayattr.store.layout import SOURCE_VALUES

    box = trust_box(run, run.read_table(SOURCE_VALUES), None)[0]
    for band, a in summary["agreement"].items():
        assert f"{band} (steps {a['steps'][0]}–{a['steps'][1]}): Spearman {a['spearman']:+.2f}" in box


def test_values_exact_before_rayattr_exact_says_what_to_run(finished_run, capsys):
    from rayattr.cli import main

    assert main(["values", finished_run[1], "--exact"]) == 2
    assert "rayattr exact" in capsys.readouterr().err


def test_a_run_it_cannot_replay_is_refused(finished_run, tmp_path):
    """Initial weights that are not the ones trained from: the first step's loss misses."""
    from safetensors.torch import load, save

    copy = tmp_path / "tampered"
    shutil.copytree(finished_run[1], copy)
    path = copy / "weights" / "initial.safetensors"
    weights = load(path.read_bytes())
    path.write_bytes(save({n: w * 1.5 for n, w in weights.items()}))
    with pytest.raises(ExactError, match="does not reproduce the first step"):
        exact_values(Replay(Run.open_uri(str(copy))), every=4)
    with pytest.raises(ExactError, match="checkpoint spacing"):
        exact_values(Replay(Run.open_uri(finished_run[1])), every=0)
    with pytest.raises(ExactError, match="cannot freeze"):
        exact_values(Replay(Run.open_uri(finished_run[1])), freeze=frozenset({"m"}))


def test_an_unfinished_run_is_refused(tmp_path):
    run = Run.create(str(tmp_path), "busy", {"status": "training", "config": {}})
    with pytest.raises(ExactError, match="not finished"):
        Replay(run)


def test_where_the_replay_leaves_the_run_is_recorded():
    """Misses below DEPARTURE are rounding; the first step above it is where the run amplifies
    rounding; a first step that misses at all is a replay of other arithmetic."""
    recs = [SimpleNamespace(loss=3.0, clip=0.5) for _ in range(4)]
    seen = Reproduction(SimpleNamespace(records=recs, run=SimpleNamespace(uri="mem://r")))
    seen.check(0, 3.0 * (1 + 1e-7), 0.5)
    seen.check(1, 3.0, 0.5 * (1 + DEPARTURE / 2))
    assert seen.summary()["replay_departs_at"] is None
    seen.check(2, 3.0, 0.5 * (1 + 3 * DEPARTURE))
    seen.check(3, 3.0 * (1 + 5 * DEPARTURE), 0.5)
    assert seen.summary() == {"replay_max_relative_miss": pytest.approx(5 * DEPARTURE), "replay_departs_at": 2,
                              "anchor_max_relative_distance": 0.0}
    with pytest.raises(ExactError, match="first step"):
        Reproduction(SimpleNamespace(records=recs, run=SimpleNamespace(uri="mem://r"))).check(0, 3.1, 0.5)


def test_validate_sets_the_exact_values_against_the_retrains():
    """`rayattr validate` puts the exact values beside the retrained Δloss/ε at the smallest ε,
    on the occurrences retrained at every ε."""
    import pyarrow as pa

    from rayattr.validate.validation import _by_eps, exact_against_retrains

    occ = pa.table({"sample_id": [1, 2, 3, 4, 1, 2, 3, 4], "step": [5, 6, 7, 8] * 2,
                    "eps": [1.0] * 4 + [0.01] * 4, "predicted": [0.0] * 8,
                    "actual": [1.0, 2.0, 3.0, 4.0, 0.1, 0.4, 0.2, 0.3]})
    exact = pa.table({"sample_id": [1, 2, 3, 4, 9], "step": [5, 6, 7, 8, 9],
                      "value": [0.2, 0.8, 0.4, 0.6, 5.0]})
    got = exact_against_retrains(exact, _by_eps(occ))
    assert got["exact_first_order_n"] == 4
    assert got["exact_first_order_spearman"] == pytest.approx(1.0)  # ranked as at ε = 0.01, not ε = 1
    assert got["exact_first_order_rms_ratio"] == pytest.approx(2.0)
    assert exact_against_retrains(exact, {}) == {}


def test_validate_figures_the_exact_values_lds_on_the_same_retrains():
    import pyarrow as pa

    from rayattr.validate.counterfactuals import Removal
    from rayattr.validate.validation import exact_counterfactuals

    exact = pa.table({"sample_id": [1, 2, 3, 1, 2, 3], "step": [0, 0, 0, 1, 1, 1],
                      "value": [1.0, 2.0, 3.0, 0.5, 0.5, 0.5]})
    removals = [Removal("subset", "0", (1,)), Removal("subset", "1", (2,)), Removal("subset", "2", (3,)),
                Removal("source", "a", (1, 2)), Removal("source", "b", (3,)), Removal("source", "c", (2,))]
    actual = [3.0, 2.0, 1.0, 10.0, 30.0, 20.0]  # against the exact sums 1.5, 2.5, 3.5 and 4.0, 3.5, 2.5
    got = exact_counterfactuals(exact, removals, actual, np.random.default_rng(0))
    assert got["exact_lds"] == pytest.approx(-1.0)
    assert got["exact_lds_ci"] == pytest.approx([-1.0, -1.0])  # every resample keeps the order
    assert got["exact_source_spearman"] == pytest.approx(-0.5)
    assert exact_counterfactuals(exact, [], []) == {}


def test_top_eigenvalue_is_the_dense_matrix_s_largest_in_magnitude():
    """Power iteration against numpy's float64 eigendecomposition, a positive and a negative
    dominant eigenvalue, the operator split over two tensors as parameters are."""
    from rayattr.exact.sharpness import top_eigenvalue

    rng = np.random.default_rng(0)
    q, _ = np.linalg.qr(rng.standard_normal((30, 30)))
    for top in (5.0, -5.0):
        eig = np.concatenate([[top], rng.uniform(-2.0, 2.0, 29)])
        m = torch.from_numpy(q @ np.diag(eig) @ q.T)

        def hvp(v):
            x = torch.cat([v[0].reshape(-1), v[1].reshape(-1)])
            y = m @ x
            return [y[:12].reshape(3, 4), y[12:]]

        like = [torch.zeros(3, 4, dtype=torch.float64), torch.zeros(18, dtype=torch.float64)]
        want = eig[np.argmax(np.abs(eig))]
        assert top_eigenvalue(hvp, like, iterations=200) == pytest.approx(want, rel=1e-8)
        assert abs(top_eigenvalue(hvp, like, iterations=3) - want) > 1e-6  # it is iterating, not exact


def test_the_end_sharpness_along_the_validation_gradient_is_a_finite_difference(replay):
    """η·⟨w, H w⟩/‖w‖² from Hessian-vector products against a central difference of the
    training gradient along w, at the final weights on the last step's batch; the report says
    it when it exceeds 1 (one step back turns w past zero)."""
    from rayattr.exact.sharpness import end_sharpness, sharpness_sentence
    from rayattr.store.layout import FINAL_WEIGHTS
    from safetensors.torch import load

    final = load(replay.run.read_bytes(FINAL_WEIGHTS))
    params = {n: final[n].double() for n in replay.initial}
    leaves = list(params)
    w = list(torch.autograd.grad(replay.val_loss({n: x.requires_grad_(True) for n, x in params.items()}),
                                 [params[n] for n in leaves]))
    s = end_sharpness(replay, {n: x.detach() for n, x in params.items()}, [x.detach() for x in w], iterations=30)
    t = replay.num_steps - 1
    batch, _ = replay.batch(t)

    def train_grad(shift: float) -> list[torch.Tensor]:
        moved = {n: (params[n].detach() + shift * d).requires_grad_(True) for n, d in zip(leaves, w)}
        return torch.autograd.grad(replay.per_sample(moved, batch).mean(), [moved[n] for n in leaves])

    h = 1e-4
    hw = [(a - b) / (2 * h) for a, b in zip(train_grad(h), train_grad(-h))]
    ww = sum(float((x * x).sum()) for x in w)
    along = s["eta"] * sum(float((x * y).sum()) for x, y in zip(w, hw)) / ww
    assert s["eta_along_validation"] == pytest.approx(along, rel=1e-5)
    assert s["eta"] == pytest.approx(replay.records[t].eta * replay.batch_size())
    assert abs(s["eta_lambda_max"]) >= abs(s["eta_along_validation"]) - 1e-9  # no direction beats the top one
    assert s["turns"] is (s["eta_along_validation"] > 1.0)
    assert "along the validation gradient" in sharpness_sentence(s)
    turned = {**s, "turns": True, "eta_along_validation": 1.33}
    assert "trust the exact values" in sharpness_sentence(turned)
    from rayattr.report.trust import exact_sentence

    class Summary:  # a run whose exact/summary.json holds `summary`
        def __init__(self, summary, manifest=None):
            self.summary, self.manifest = summary, manifest or {}

        def exists(self, rel):
            return True

        def read_json(self, rel):
            return self.summary

    band = {"middle": {"steps": [1, 2], "spearman": 0.1, "rms_ratio": 3.0}}
    per_layer = exact_sentence(Summary({"agreement": band, "sharpness": turned}))
    assert "edge of stability along the validation gradient" in per_layer
    assert "an empirical Fisher layer by layer (embed.joint_layers" in per_layer
    joint = exact_sentence(Summary({"agreement": band, "sharpness": turned},
                                   {"joint_layers": True, "config": {"capture": {"curvature": "sampled"}}}))
    assert "a sampled-label Fisher across all layers" in joint and "embed.joint_layers" not in joint
    calm = {**s, "turns": False}
    assert "edge of stability" not in exact_sentence(Summary({"agreement": band, "sharpness": calm}))
