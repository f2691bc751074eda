"""An AdamW run end to end: the distributed result against the single-process core, data
parallelism (ZeRO-1 and ZeRO-2) against one rank, and what the step records keep."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from rayattr.config import Config, ConfigError
from rayattr.math.dvemb import data_value_embeddings, influence
from rayattr.pipeline.stages import embed_and_reduce, run_pipeline
from rayattr.model.gradients import validation_gradient
from rayattr.store import GradientReader, Run
from test_pipeline import _embeddings, copy_trained, cut_again, small_config

SCHEDULE = {"type": "WarmupCosineLR", "params": {"total_num_steps": 24, "warmup_num_steps": 4,
                                                 "warmup_min_ratio": 0.0, "cos_min_ratio": 0.1}}


LR = 1e-3


def adamw_config(store: str, run_id: str, stage: int = 1, preconditioner: str = "lagged", **train) -> Config:
    """The small AdamW run; "lagged" re-reads v every 2 steps, "lookahead" reads each step's own
    v_t right after it. Peak lr 1e-3: the tests of the recursion's mechanics need a run it can
    embed. At 3e-3, on the Feistel batch plan, step 3 reaches η·λ_max(P H) = 6.4 and K explodes
    (the guard refuses the run, as it must); at 1e-3 the largest is 2.3 (step 6), and K stays
    bounded."""
    d = small_config(store, run_id, **{"lr": LR, **train}).to_dict(redact=False)
    d["train"]["optimizer"] = {"type": "adamw", "betas": [0.9, 0.99], "eps": 1e-8, "weight_decay": 0.1}
    d["train"]["deepspeed"] = {"zero_optimization": {"stage": stage}, "gradient_clipping": 1.0,
                               "scheduler": SCHEDULE}
    d["capture"]["preconditioner"] = preconditioner
    d["capture"]["precondition_every"] = 2 if preconditioner == "lagged" else 1
    return Config.from_dict(d).validate()


@pytest.fixture(scope="module")
def trained(local_ray, tmp_path_factory):
    cfg = adamw_config(str(tmp_path_factory.mktemp("store")), "adamw", states_every=4)  # states for rayattr exact
    result = run_pipeline(cfg, progress=False)
    return cfg, Run.open_uri(result.uri), result


def core_adamw(run: Run, **kw):
    """The core's DVEmb on the recorded rows, with docs/method.md §7's conventions: η_t = lr_t/|B|
    (κ_t taken out of the recorded η), rows κ_t·u, α_t = 1 − lr_t·λ, β₁ from the records; `kw`
    to data_value_embeddings."""
    batches = GradientReader(run, kind="train").read_steps(0, None, dtype=torch.float64)
    updates = GradientReader(run, kind="update").read_steps(0, None, dtype=torch.float64)
    recs = {r.step: r for r in run.step_records()}
    rs = [recs[b.step] for b in batches]
    assert [u.sample_ids.tolist() for u in updates] == [b.sample_ids.tolist() for b in batches]
    emb = data_value_embeddings(
        [b.grads for b in batches], [r.eta / r.clip for r in rs],
        updates=[{n: r.clip * g for n, g in u.grads.items()} for u, r in zip(updates, rs)],
        momentum=rs[0].beta1, decay=[r.decay for r in rs], **kw)
    return batches, emb


def assert_equals_core(run: Run, batches, emb) -> np.ndarray:
    """The run's final embeddings and values against the core's (local embeddings are stored as
    float32 and S·e + R_b·(carried rows) can cancel: rounding relative to the step's largest
    entry); returns the core's values."""
    final = _embeddings(run)
    for b, e in zip(batches, emb):
        for n in e:
            torch.testing.assert_close(final[b.step].grads[n], e[n], rtol=1e-5, atol=1e-6 * float(e[n].abs().max()))
    want = torch.cat(influence(emb, validation_gradient(run))).numpy()
    np.testing.assert_allclose(run.read_table("values/samples.parquet")["value"].to_numpy(), want, rtol=2e-5,
                               atol=1e-10)
    return want


def test_records_keep_schedule_clipping_and_adam_state(trained):
    _, run, result = trained
    recs = run.step_records()
    assert len(recs) == result.num_steps == 24
    assert {(r.optimizer, r.beta1, r.beta2, r.eps, r.weight_decay) for r in recs} == {("adamw", 0.9, 0.99, 1e-8, 0.1)}
    assert [r.adam_step for r in recs] == list(range(1, 25))
    assert [r.precondition_step for r in recs] == [t - t % 2 for t in range(24)]  # refreshed every 2 steps
    lrs = [r.lr for r in recs]
    assert lrs[0] < lrs[3] and max(lrs) == pytest.approx(LR, rel=0.05) and lrs[-1] < 0.5 * max(lrs)
    assert any(r.clip < 1 for r in recs)
    for r in recs:
        assert r.eta == pytest.approx(r.clip * r.lr / 16)
        assert r.decay == pytest.approx(1 - r.lr * 0.1)
    u = GradientReader(run, kind="update").read_steps(0, 3)
    g = GradientReader(run, kind="train").read_steps(0, 3)
    n = next(iter(g[0].grads))
    assert torch.equal(u[0].grads[n], g[0].grads[n])  # no v before the first update: u = g
    assert not torch.allclose(u[2].grads[n], g[2].grads[n])


@pytest.mark.parametrize("segments", [1, 2, 3])  # 5 (the scan in blocks on 2 CPUs): test_pipeline's SGD case
def test_adamw_segments_equal_the_core(trained, tmp_path, segments):
    run = cut_again(*trained, tmp_path, segments)
    batches, emb = core_adamw(run)
    final = _embeddings(run)
    assert sorted(final) == [b.step for b in batches]
    for b, e in zip(batches, emb):
        for n in e:  # local embeddings are stored as float32, and S·e + β₁^(b−t) R_b u can cancel:
            # rounding relative to the step's largest row entry
            torch.testing.assert_close(final[b.step].grads[n], e[n], rtol=1e-5, atol=1e-6 * float(e[n].abs().max()))
    want = torch.cat(influence(emb, validation_gradient(run))).numpy()
    samples = run.read_table("values/samples.parquet")
    np.testing.assert_allclose(samples["value"].to_numpy(), want, rtol=2e-5, atol=1e-10)
    # per-source and per-phase sums carry the momentum term too
    src = samples["source"].to_numpy(zero_copy_only=False)
    phases = run.read_table("values/phases.parquet").to_pylist()
    for row in run.read_table("values/sources.parquet").to_pylist():
        np.testing.assert_allclose(row["value"], want[src == row["source"]].sum(), rtol=1e-6)
        by_phase = sum(p["value"] for p in phases if p["source"] == row["source"])
        np.testing.assert_allclose(by_phase, row["value"], rtol=2e-5)


def test_adamw_joint_layers_equal_the_core_on_joined_rows(trained, tmp_path):
    """embed.joint_layers under AdamW (R beside K, momentum past the segments' ends): 2 segments
    equal the core on the recorded rows and update rows with the layers side by side."""
    cfg, base, result = trained
    run = copy_trained(base, tmp_path)
    embed_and_reduce(cfg.with_overrides(**{"embed.joint_layers": True}), run, result.num_steps, segments=2,
                     progress=False)
    batches, _ = core_adamw(run)  # its rows, joined below
    names = list(run.manifest["layer_dims"])
    updates = GradientReader(run, kind="update").read_steps(0, None, dtype=torch.float64)
    recs = {r.step: r for r in run.step_records()}
    rs = [recs[b.step] for b in batches]
    join = lambda d: {"joint": torch.cat([d[n] for n in names], -1)}  # noqa: E731
    emb = data_value_embeddings(
        [join(b.grads) for b in batches], [r.eta / r.clip for r in rs],
        updates=[join({n: r.clip * g for n, g in u.grads.items()}) for u, r in zip(updates, rs)],
        momentum=rs[0].beta1, decay=[r.decay for r in rs])
    final = _embeddings(run)
    for b, e in zip(batches, emb):
        torch.testing.assert_close(final[b.step].grads["joint"], e["joint"], rtol=1e-5,
                                   atol=1e-6 * float(e["joint"].abs().max()))
    vgrad = validation_gradient(run)
    want = torch.cat(influence(emb, join(vgrad))).numpy()
    np.testing.assert_allclose(run.read_table("values/samples.parquet")["value"].to_numpy(), want,
                               rtol=2e-5, atol=1e-10)


@pytest.fixture(scope="module")
def one_rank_one_epoch(local_ray, tmp_path_factory) -> Run:
    cfg = adamw_config(str(tmp_path_factory.mktemp("one")), "one", preconditioner="lookahead", ranks=1,
                       micro_batch=16, epochs=1)
    return Run.open_uri(run_pipeline(cfg, progress=False).uri)


@pytest.mark.parametrize("zero_stage", [2])  # ZeRO-1 partitions v as ZeRO-2 does (one DeepSpeed optimizer)
def test_adamw_two_ranks_equal_one_rank(one_rank_one_epoch, tmp_path, zero_stage):
    """With the step's own P (the default): under ZeRO the ranks' sums over their partitions of
    v are an all-reduce. (ZeRO-1 on 2 ranks: tests/test_step_preconditioner.py.)"""
    one = one_rank_one_epoch
    two = Run.open_uri(run_pipeline(adamw_config(str(tmp_path), "two", stage=zero_stage, preconditioner="lookahead",
                                                 epochs=1), progress=False).uri)
    assert [r.sample_ids for r in one.step_records()] == [r.sample_ids for r in two.step_records()]
    # every step's update rows use the v of that step's own update
    assert all(r.precondition_step == r.adam_step == r.step + 1 for r in two.step_records())
    np.testing.assert_allclose([r.clip for r in two.step_records()], [r.clip for r in one.step_records()], rtol=1e-5)
    for kind in ("update", "embeddings"):
        a = {b.step: b for b in GradientReader(one, kind=kind).read_steps(0, None, dtype=torch.float64)}
        b = {b.step: b for b in GradientReader(two, kind=kind).read_steps(0, None, dtype=torch.float64)}
        assert sorted(a) == sorted(b)
        for step in a:
            for n in a[step].grads:
                # a different summation order moves v, and P = 1/(√v̂ + ε) amplifies it in small
                # entries: rounding relative to the step's largest entry (measured 4e-6 for u)
                x = a[step].grads[n]
                torch.testing.assert_close(b[step].grads[n], x, rtol=2e-3, atol=1e-4 * float(x.abs().max()))
    v1 = one.read_table("values/samples.parquet")["value"].to_numpy()
    v2 = two.read_table("values/samples.parquet")["value"].to_numpy()
    np.testing.assert_allclose(v2, v1, rtol=2e-3, atol=1e-7)


def test_adamw_per_source_mode_equals_the_core(trained, tmp_path):
    """The forward scan of the sums carries the momentum past each segment's end (R^loc d):
    source embeddings equal the core's summed per source."""
    from tests.test_pipeline import assert_source_embeddings, source_sums

    cfg, base, result = trained
    run = copy_trained(base, tmp_path)
    embed_and_reduce(cfg.with_overrides(**{"embed.keep_sample_embeddings": False}), run, result.num_steps,
              segments=3, progress=False)
    batches, emb = core_adamw(run)
    assert_source_embeddings(run, source_sums(batches, emb), rtol=1e-4)


def test_momentum_curvature_segments_equal_the_core(trained, tmp_path):
    """embed.momentum_curvature: 3 segments (C, D and the carried rows on disk, full links in the
    scan, the vector chain, the kept embeddings' finalisation) equal the core's recursion on the
    recorded rows; the values are not the momentum-free K's; the run then refuses to be embedded
    with the other K. (The forward scan of the sums with these links: the sampled test below.)"""
    cfg, base, result = trained
    on = cfg.with_overrides(**{"embed.momentum_curvature": True})
    run = copy_trained(base, tmp_path / "kept")
    embed_and_reduce(on, run, result.num_steps, segments=3, progress=False)
    batches, emb = core_adamw(run, momentum_curvature=True)
    want = assert_equals_core(run, batches, emb)
    free = torch.cat(influence(core_adamw(run)[1], validation_gradient(run))).numpy()
    assert np.abs(want - free).max() > 1e-3 * np.abs(free).max()
    with pytest.raises(ConfigError, match="embed.momentum_curvature: true"):
        embed_and_reduce(cfg, run, result.num_steps, segments=3, progress=False)
    assert Run.open_uri(run.uri).manifest["momentum_curvature"] is True


def test_sampled_curvature_with_momentum_curvature_equals_the_core(local_ray, tmp_path):
    """capture.curvature "sampled" under AdamW (pseudo-gradient rows ĝ and their update rows P ĝ,
    two draws, two ranks) with embed.momentum_curvature, 3 segments: the segment actors' result
    equals the core's on the same recorded rows, K's term (|B|/m) R Σ κ P ĝ ĝᵀ: the final
    embeddings and values, then the per-source sums of the forward scan (full links, the
    carried rows summed past each segment's end) on a copy embedded without kept embeddings.
    The projection has its dense second stage (capture.mix, 16 → 8 numbers a layer), which every
    kind of row and the validation gradient pass through alike (its rows: test_capture.py)."""
    from tests.test_pipeline import assert_source_embeddings, source_sums

    cfg = adamw_config(str(tmp_path), "sampled", preconditioner="lookahead", epochs=1)
    d = cfg.to_dict(redact=False)
    d["capture"].update(curvature="sampled", curvature_fraction=0.5, curvature_draws=2, mix=8)
    d["embed"].update(segments=3, momentum_curvature=True, error_blocks=1)
    run = Run.open_uri(run_pipeline(Config.from_dict(d).validate(), progress=False).uri)
    curv = GradientReader(run, kind="curvature").read_steps(0, None, dtype=torch.float64)
    cu = GradientReader(run, kind="curvature_update").read_steps(0, None, dtype=torch.float64)
    assert [c.step for c in cu] == [c.step for c in curv] and all(len(c) == 16 for c in cu)
    assert run.manifest["projection"]["mix"] == 8 and set(run.manifest["layer_dims"].values()) == {8}
    name = next(iter(curv[0].grads))
    assert not torch.allclose(cu[-1].grads[name], curv[-1].grads[name])  # P ≠ I
    rs = [r for r in run.step_records()]
    batches, emb = core_adamw(run, curvature=[c.grads for c in curv],
                              curvature_updates=[{n: r.clip * x for n, x in c.grads.items()} for c, r in zip(cu, rs)],
                              batch_sizes=[len(r.sample_ids) for r in rs], momentum_curvature=True)
    assert_equals_core(run, batches, emb)
    sums = copy_trained(run, tmp_path / "sums")
    on = Config.from_dict(d).validate().with_overrides(**{"embed.keep_sample_embeddings": False})
    embed_and_reduce(on, sums, len(rs), segments=3, progress=False)
    assert_source_embeddings(sums, source_sums(batches, emb), rtol=1e-4)


def test_guard_measures_the_preconditioned_curvature(trained):
    """The run's largest η·λ_max(P H) is K's curvature term η_t (κ_t U)ᵀ G (docs/method.md §7),
    recomputed here in float64 by a dense eigendecomposition of every step and layer, and is
    judged against Adam's momentum-aware edge 2(1 + β₁)/(1 − β₁), not SGD's 2."""
    _, run, _ = trained
    recs = {r.step: r for r in run.step_records()}
    grads = GradientReader(run, kind="train").read_steps(0, None, dtype=torch.float64)
    updates = {u.step: u for u in GradientReader(run, kind="update").read_steps(0, None, dtype=torch.float64)}
    worst = (0.0, -1)
    for b in grads:
        r = recs[b.step]
        for n, g in b.grads.items():
            pu = r.clip * updates[b.step].grads[n]  # κ u, the rows K sees
            lam = float(torch.linalg.eigvals(g @ pu.T).real.max())  # spectrum of Uᵀ G, on the B×B side
            worst = max(worst, (r.eta / r.clip * lam, b.step))
    m = run.manifest
    assert m["max_eta_lambda_step"] == worst[1]
    assert m["max_eta_lambda"] == pytest.approx(worst[0], rel=1e-3)
    assert m["eta_lambda_preconditioned"] is True and m["stability_edge"] == pytest.approx(38.0)
    # the steps clipping acted at, which the values hold κ fixed for (the report says so)
    assert m["clipped_steps"] == sum(r.clip < 1.0 for r in recs.values()) > 0


def test_a_diverging_adamw_run_is_refused(local_ray, tmp_path):
    """lr 0.3, three hundred times the small run's: the sweep stops at a named step, with the
    step's preconditioned η·λ_max(P H) and the bound it passed, and writes no values. Its
    segment actors are gone: their CPUs are free for the next run (they once held them, and
    the next pipeline in this Ray waited for ever)."""
    import time

    import ray

    from rayattr.embed.guard import DivergenceError

    with pytest.raises(DivergenceError, match=r"is exploding at step \d+: .*η·λ_max\(P H\) = [\d.e+]+ at this step, "
                                              r"(above 2: the step can amplify K|past the run's own stability edge)"):
        run_pipeline(adamw_config(str(tmp_path), "diverging", lr=0.3, ranks=1, micro_batch=16, epochs=1),
                     progress=False)
    run = Run.open_uri(f"{tmp_path}/diverging")
    assert not run.exists("values/samples.parquet")
    deadline = time.time() + 30  # ray.kill returns before the actor's resources are back
    while ray.available_resources().get("CPU", 0) < ray.cluster_resources()["CPU"] and time.time() < deadline:
        time.sleep(0.2)
    assert ray.available_resources().get("CPU", 0) == ray.cluster_resources()["CPU"]


def test_exact_values_through_momentum_clipping_and_checkpoints(trained):
    """`rayattr exact` on this AdamW run (β₁ 0.9, clipping at 1.0, warm-up and cosine decay):
    the checkpointed reverse pass carries m's and v's adjoints across every checkpoint, so it
    equals one unrolled segment, and it equals float64 retrains (tests/test_exact.py)."""
    from rayattr.exact.replay import Replay
    from test_exact import check_exact

    torch.set_num_threads(1)
    rp = Replay(trained[1])
    assert rp.beta1 > 0 and any(r.clip < 1 for r in rp.records), "momentum and clipping must be exercised"
    check_exact(rp, [(1, 0), (rp.num_steps // 2, 2)], spacings=(1, 5))


def test_kept_states_are_the_runs_own_and_re_seat_the_exact_replay(trained):
    """train.states_every = 4 on 2 ranks under ZeRO-1: the states gathered from the partitions
    are the replay's θ, m and v at those steps (float32 against float64), and re-seating the
    replay on them leaves the exact values of this stable run as they were."""
    from rayattr.exact.metagradient import exact_values
    from rayattr.exact.replay import Replay

    torch.set_num_threads(1)
    rp = Replay(trained[1])
    T = rp.num_steps
    assert rp.anchor_steps() == list(range(4, T, 4))
    state, ones = rp.initial_state(), torch.ones(rp.batch_size(), dtype=torch.float64)
    for t in range(8):
        state, _, _ = rp.step(state, t, ones, differentiable=False)
    kept = rp.recorded_state(8)
    for mine, theirs in ((state.params, kept.params), (state.m, kept.m), (state.v, kept.v)):
        num = sum(float(((mine[n] - theirs[n]) ** 2).sum()) for n in mine)
        den = sum(float((theirs[n] ** 2).sum()) for n in mine)
        assert den > 0 and (num / den) ** 0.5 < 1e-5
    anchored = exact_values(rp)
    assert anchored.summary["anchors"] == len(rp.anchor_steps()) and anchored.summary["checkpoint_every"] == 4
    assert 0 < anchored.summary["anchor_max_relative_distance"] < 1e-5
    free = exact_values(rp, every=4, anchor=False)
    a, b = anchored.samples["value"].to_numpy(), free.samples["value"].to_numpy()
    np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-4 * np.abs(b).max())


@pytest.mark.parametrize("segments", [3])  # the sweep, the scan, and the finalize's own read of the raw rows
def test_clip_response_segments_equal_the_core(trained, tmp_path, segments):
    """embed.clip_response: at every clipped step the segments' rows are the clipped step's own
    (tests/test_clip_response.py's explicit ũ = u − ū⟨g, ḡ⟩/‖ḡ‖², here built by hand from
    the stored rows), through the sweep, the chain and the momentum term the finalize reads."""
    from test_clip_response import explicit

    cfg, base, result = trained
    run = copy_trained(base, tmp_path)
    embed_and_reduce(cfg.with_overrides(**{"embed.clip_response": True}), run, result.num_steps, segments=segments,
                     progress=False)
    batches = GradientReader(run, kind="train").read_steps(0, None, dtype=torch.float64)
    updates = GradientReader(run, kind="update").read_steps(0, None, dtype=torch.float64)
    rs = [{r.step: r for r in run.step_records()}[b.step] for b in batches]
    assert sum(r.clip < 1 for r in rs) >= 3
    rows = [explicit(b.grads, u.grads) if r.clip < 1 else u.grads for b, u, r in zip(batches, updates, rs)]
    emb = data_value_embeddings([b.grads for b in batches], [r.eta / r.clip for r in rs],
                                updates=[{n: r.clip * x for n, x in u.items()} for u, r in zip(rows, rs)],
                                momentum=rs[0].beta1, decay=[r.decay for r in rs])
    want = torch.cat(influence(emb, validation_gradient(run))).numpy()
    np.testing.assert_allclose(run.read_table("values/samples.parquet")["value"].to_numpy(), want, rtol=2e-5,
                               atol=1e-10)
    final = _embeddings(run)
    for b, e in zip(batches, emb):
        for n in e:
            torch.testing.assert_close(final[b.step].grads[n], e[n], rtol=1e-5, atol=1e-6 * float(e[n].abs().max()))
    # the report says the values take the clipped steps' own response, not that they hold κ
    from rayattr.report.trust import clipping_sentence

    run.reload_manifest()
    assert run.manifest["clip_response"] is True and "with embed.clip_response" in clipping_sentence(run)
    assert "hold its factor" in clipping_sentence(base)
    # and it is not the run's own embedding: the clipped steps' values moved
    held = torch.cat(influence(core_adamw(base)[1], validation_gradient(run))).numpy()
    assert np.abs(want - held).max() > 0.1 * np.abs(held).max()
