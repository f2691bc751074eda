"""v's response in the pipeline (docs/method.md §7, "v's response"): the segment actors carry Q
next to R, the reduce chains it, and the values equal the core's
`data_value_embeddings(..., v_rows=, beta2=)` on the recorded rows for 1, 2 and 3 segments.

The rows y here are written into a copy of a recorded AdamW run (kind `V_RESPONSE_KIND`) and
the copy is embedded with capture.v_response on: this checks the embedding and the reduce,
whatever rows they are given; the rows are arbitrary but fixed, of the update rows' size, so
Q's term is not small."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from rayattr.math.dvemb import data_value_embeddings, influence
from rayattr.model.gradients import validation_gradient
from rayattr.pipeline.stages import embed_and_reduce, run_pipeline
from rayattr.store import GradientReader, GradientWriter, Run
from rayattr.store.layout import V_RESPONSE_KIND
from test_pipeline import _embeddings, assert_source_embeddings, copy_trained, source_sums
from test_pipeline_adamw import adamw_config

SCALE = 3.0  # y = SCALE · u ⊙ r: Q's term moves the values by a large fraction (checked below)


@pytest.fixture(scope="module")
def recorded(local_ray, tmp_path_factory):
    cfg = adamw_config(str(tmp_path_factory.mktemp("store")), "vresp", preconditioner="lookahead", epochs=1)
    result = run_pipeline(cfg, progress=False)
    return cfg.with_overrides(**{"capture.v_response": True}).validate(), Run.open_uri(result.uri), result


def response_rows(u: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Fixed rows y of the update rows' shape: SCALE · u ⊙ r, r a seeded normal vector per layer."""
    out = {}
    for i, (n, x) in enumerate(sorted(u.items())):
        r = torch.randn(x.shape[1], generator=torch.Generator().manual_seed(i), dtype=torch.float64)
        out[n] = SCALE * x.to(torch.float64) * r
    return out


def with_response_rows(base: Run, dest) -> Run:
    """A copy of the recorded run with rows y written by each rank, as a recorder would."""
    run = copy_trained(base, dest)
    updates = GradientReader(run, kind="update").read_steps(0, None, dtype=torch.float64)
    dims = {n: x.shape[1] for n, x in updates[0].grads.items()}
    spr = run.manifest["config"]["store"]["steps_per_shard"]
    for rank in sorted({int(r) for u in updates for r in u.ranks.tolist()}):
        with GradientWriter(run, rank, dims, kind=V_RESPONSE_KIND, steps_per_shard=spr) as w:
            for u in updates:
                rows = torch.from_numpy(np.flatnonzero(u.ranks.numpy() == rank))
                y = response_rows({n: x[rows] for n, x in u.grads.items()})
                w.write_step(u.step, u.sample_ids[rows].tolist(), [u.sources[i] for i in rows.tolist()],
                             {n: x.float() for n, x in y.items()}, positions=u.positions[rows].tolist())
    return run


def core(run: Run, response: bool = True):
    """The core's DVEmb on the recorded rows (test_pipeline_adamw.core_adamw's conventions),
    with the rows κ_t·y and Adam's β₂ when ``response``."""
    batches = GradientReader(run, kind="train").read_steps(0, None, dtype=torch.float64)
    updates = GradientReader(run, kind="update").read_steps(0, None, dtype=torch.float64)
    ys = GradientReader(run, kind=V_RESPONSE_KIND).read_steps(0, None, dtype=torch.float64) if response else None
    recs = {r.step: r for r in run.step_records()}
    rs = [recs[b.step] for b in batches]
    if ys is not None:
        assert [y.sample_ids.tolist() for y in ys] == [b.sample_ids.tolist() for b in batches]
    emb = data_value_embeddings(
        [b.grads for b in batches], [r.eta / r.clip for r in rs],
        updates=[{n: r.clip * g for n, g in u.grads.items()} for u, r in zip(updates, rs)],
        momentum=rs[0].beta1, decay=[r.decay for r in rs],
        v_rows=[{n: r.clip * g for n, g in y.grads.items()} for y, r in zip(ys, rs)] if ys is not None else None,
        beta2=rs[0].beta2 if ys is not None else None)
    return batches, emb


@pytest.fixture(scope="module")
def responding(recorded, tmp_path_factory):
    return with_response_rows(recorded[1], tmp_path_factory.mktemp("copy"))


@pytest.mark.parametrize("segments", [1, 2, 3])
def test_segments_carry_q_as_the_core(recorded, responding, tmp_path, segments):
    cfg, _, result = recorded
    run = copy_trained(responding, tmp_path)
    embed_and_reduce(cfg, run, result.num_steps, segments=segments, progress=False)
    assert run.exists("embed/Q/seg0000.safetensors")
    batches, emb = core(run)
    final = _embeddings(run)
    assert sorted(final) == [b.step for b in batches]
    for b, e in zip(batches, emb):
        for n in e:  # local embeddings are stored as float32: rounding relative to the step's largest entry
            torch.testing.assert_close(final[b.step].grads[n], e[n], rtol=1e-5, atol=1e-6 * float(e[n].abs().max()))
    vgrad = validation_gradient(run)
    want = torch.cat(influence(emb, vgrad)).numpy()
    samples = run.read_table("values/samples.parquet")
    np.testing.assert_allclose(samples["value"].to_numpy(), want, rtol=2e-5, atol=1e-10)
    # the response is not a rounding: without Q the values move by a large fraction
    frozen = torch.cat(influence(core(run, response=False)[1], vgrad)).numpy()
    assert np.linalg.norm(want - frozen) > 0.2 * np.linalg.norm(frozen)
    src = samples["source"].to_numpy(zero_copy_only=False)
    phases = run.read_table("values/phases.parquet").to_pylist()
    for row in run.read_table("values/sources.parquet").to_pylist():
        np.testing.assert_allclose(row["value"], want[src == row["source"]].sum(), rtol=1e-6)
        by_phase = sum(p["value"] for p in phases if p["source"] == row["source"])
        np.testing.assert_allclose(by_phase, row["value"], rtol=2e-5)


def test_clip_response_turns_y_as_it_turns_u(recorded, responding, tmp_path):
    """embed.clip_response with v's response: at a clipped step both the update rows and the
    rows y are the clipped step's own (y is linear in the sample's gradient, so the same
    ũ = u − ū⟨g, ḡ⟩/‖ḡ‖² applies), through the sweep, the chain and the finalize's own read of
    the raw rows (3 segments). Fails if y is left as it was."""
    from test_clip_response import explicit

    cfg, _, result = recorded
    run = copy_trained(responding, tmp_path)
    embed_and_reduce(cfg.with_overrides(**{"embed.clip_response": True}), run, result.num_steps, segments=3,
                     progress=False)
    batches = GradientReader(run, kind="train").read_steps(0, None, dtype=torch.float64)
    updates = GradientReader(run, kind="update").read_steps(0, None, dtype=torch.float64)
    ys = GradientReader(run, kind=V_RESPONSE_KIND).read_steps(0, None, dtype=torch.float64)
    rs = [{r.step: r for r in run.step_records()}[b.step] for b in batches]
    assert sum(r.clip < 1 for r in rs) >= 3

    def values(turn_y: bool) -> np.ndarray:
        u = [explicit(b.grads, x.grads) if r.clip < 1 else x.grads for b, x, r in zip(batches, updates, rs)]
        y = [explicit(b.grads, x.grads) if r.clip < 1 and turn_y else x.grads for b, x, r in zip(batches, ys, rs)]
        emb = data_value_embeddings(
            [b.grads for b in batches], [r.eta / r.clip for r in rs],
            updates=[{n: r.clip * g for n, g in x.items()} for x, r in zip(u, rs)], momentum=rs[0].beta1,
            decay=[r.decay for r in rs], v_rows=[{n: r.clip * g for n, g in x.items()} for x, r in zip(y, rs)],
            beta2=rs[0].beta2)
        return torch.cat(influence(emb, validation_gradient(run))).numpy()

    got = run.read_table("values/samples.parquet")["value"].to_numpy()
    want = values(turn_y=True)
    np.testing.assert_allclose(got, want, rtol=2e-5, atol=1e-10)
    held = values(turn_y=False)
    assert np.abs(want - held).max() > 1e-3 * np.abs(held).max()


def test_per_source_mode_carries_q(recorded, responding, tmp_path):
    """The forward scan of the sums subtracts Q^loc q past each segment's end."""
    cfg, _, result = recorded
    run = copy_trained(responding, tmp_path)
    embed_and_reduce(cfg.with_overrides(**{"embed.keep_sample_embeddings": False}), run, result.num_steps,
                     segments=3, progress=False)
    batches, emb = core(run)
    assert_source_embeddings(run, source_sums(batches, emb), rtol=1e-4)


def test_a_run_without_the_rows_is_refused(recorded, tmp_path):
    """capture.v_response on a run that stored no rows: the segment names the missing kind."""
    cfg, base, result = recorded
    run = copy_trained(base, tmp_path)
    with pytest.raises(Exception, match=V_RESPONSE_KIND):
        embed_and_reduce(cfg, run, result.num_steps, segments=1, progress=False)


@pytest.fixture(scope="module")
def recorded_with_response(local_ray, tmp_path_factory):
    """capture.v_response on: the ranks record the rows (two ranks, ZeRO-1: m and v gathered)."""
    cfg = adamw_config(str(tmp_path_factory.mktemp("resp")), "resp", preconditioner="lookahead", epochs=1)
    cfg = cfg.with_overrides(**{"capture.v_response": True}).validate()
    result = run_pipeline(cfg, progress=False)
    return cfg, Run.open_uri(result.uri), result


def test_a_recorded_run_with_v_response_equals_the_core(recorded_with_response):
    """The recorded rows end to end: every step's occurrences have response rows (not zero),
    and the values are the core's on the recorded rows."""
    _, run, result = recorded_with_response
    ys = GradientReader(run, kind=V_RESPONSE_KIND).read_steps(0, None, dtype=torch.float64)
    batches, emb = core(run)
    assert [y.sample_ids.tolist() for y in ys] == [b.sample_ids.tolist() for b in batches]
    assert len(ys) == result.num_steps and all(float(y.grads[n].abs().max()) > 0 for y in ys for n in y.grads)
    want = torch.cat(influence(emb, validation_gradient(run))).numpy()
    np.testing.assert_allclose(run.read_table("values/samples.parquet")["value"].to_numpy(), want,
                               rtol=2e-5, atol=1e-10)
