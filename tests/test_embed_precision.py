"""Precision as configured: with embed.dtype float64 the local and final embeddings are stored
in float64 (not rounded to float32), and scores sum their layers in float64."""

from __future__ import annotations

import json

import pytest
import torch

from rayattr.embed.blocks import ProjectionBlocks
from rayattr.embed.segment import SegmentSpec, SegmentWorker
from rayattr.store.layout import FINAL_KIND, LOCAL_KIND
from rayattr.store import GradientReader
from tests.test_segment_stream import DIMS, STEPS, make_run


def registered_dtypes(run, kind):
    return {json.loads(run._storage.get_bytes(r))["dtype"] for r in run._storage.find(f"writers/{kind}")}


def test_float64_embeddings_are_stored_in_float64(tmp_path):
    run = make_run(tmp_path)
    w = SegmentWorker(run.uri, None, SegmentSpec(0, 0, STEPS), [0, STEPS], dtype="float64", write_chunk=8)
    w.compute()
    w.finalize(w.value_vectors({n: torch.ones(p) for n, p in DIMS.items()}), None, embeddings=True)
    for kind in (LOCAL_KIND, FINAL_KIND):
        assert registered_dtypes(run, kind) == {"float64"}, kind
        rows = torch.cat([b.grads["a"] for b in GradientReader(run, kind=kind).read_steps(0, None, dtype=torch.float64)])
        assert not torch.equal(rows, rows.float().double()), f"{kind} rows were rounded to float32"


def test_float32_embeddings_stay_float32(tmp_path):
    run = make_run(tmp_path)
    SegmentWorker(run.uri, None, SegmentSpec(0, 0, STEPS), [0, STEPS], dtype="float32").compute()
    assert registered_dtypes(run, LOCAL_KIND) == {"float32"}


def test_layers_are_summed_in_float64():
    big, small = torch.tensor([1e8], dtype=torch.float32), torch.tensor([1.0], dtype=torch.float32)
    value, se = ProjectionBlocks({"a": 4, "b": 4}, 1, 1, 1).combine({"a": big, "b": small})
    assert value.dtype == torch.float64 and value.item() == 1e8 + 1  # float32 would round it to 1e8


def test_joint_layout_concatenates_layers_and_their_blocks():
    """embed.joint_layers: the recorded layers side by side in one layer `joint`, and block (a, b)
    of every layer side by side in `joint@ab`, scaled by q as per layer; the value of a joint row
    is the sum of the per-layer values, and the blocks' estimates are those of the per-layer blocks."""
    dims = {"a": 4, "b": 4}
    per, joint = ProjectionBlocks(dims, 2, 2, 2), ProjectionBlocks(dims, 2, 2, 2, joint=True)
    assert joint.layers == {"joint": 8} and joint.recorded == dims and set(per.layers) == {"a", "b"}
    assert joint.dims == {"joint": 8, **{f"joint@{a}{b}": 2 for a in range(2) for b in range(2)}}
    g = {"a": torch.arange(4.0)[None], "b": 10 + torch.arange(4.0)[None]}
    rows = joint.augment(g)
    torch.testing.assert_close(rows["joint"], torch.cat([g["a"], g["b"]], -1))
    pr = per.augment(g)
    torch.testing.assert_close(rows["joint@01"], torch.cat([pr["a@01"], pr["b@01"]], -1))
    # a diagonal recursion (K = I) gives the same values and standard errors either way
    test = {"a": torch.randn(4, dtype=torch.float64), "b": torch.randn(4, dtype=torch.float64)}
    emb = {"a": torch.randn(3, 4, dtype=torch.float64), "b": torch.randn(3, 4, dtype=torch.float64)}
    v_per, se_per = per.values(per.augment(emb), per.augment(test))
    v_joint, se_joint = joint.values(joint.augment(emb), joint.augment(test))
    torch.testing.assert_close(v_joint, v_per)
    torch.testing.assert_close(se_joint, se_per)
    assert joint.join(g).keys() == {"joint"} and per.join(g).keys() == {"a", "b"}


def test_members_are_recursions_of_their_own_whose_mean_is_the_value():
    """capture.members: member j's layers (`<layer>~j`) are joined among themselves only, and a
    value is the members' mean with their spread over √k as its standard error; sums over
    layers count each member's part 1/k."""
    dims = {"a": 4, "b": 4, "a~1": 4, "b~1": 4, "a~2": 4, "b~2": 4}
    per, joint = ProjectionBlocks(dims, 2, 2, 1, members=3), ProjectionBlocks(dims, 2, 2, 1, joint=True, members=3)
    assert joint.layers == {"joint": 8, "joint~1": 8, "joint~2": 8} and per.layers == dims
    assert per.enabled and per.weight == 1 / 3
    g = {n: torch.randn(3, 4, dtype=torch.float64) for n in dims}
    rows = joint.join(g)
    torch.testing.assert_close(rows["joint~2"], torch.cat([g["a~2"], g["b~2"]], -1))
    test = {n: torch.randn(4, dtype=torch.float64) for n in dims}
    est = torch.stack([g[a] @ test[a] + g[b] @ test[b] for a, b in (("a", "b"), ("a~1", "b~1"), ("a~2", "b~2"))])
    for layout in (per, joint):
        value, se = layout.values(layout.augment(g), layout.augment(test))
        torch.testing.assert_close(value, est.mean(0))
        torch.testing.assert_close(se, est.std(0) / 3 ** 0.5)
    with pytest.raises(ValueError, match="same layers"):
        ProjectionBlocks({"a": 4, "b": 4, "a~1": 4}, 2, 2, 1, members=2)
    with pytest.raises(ValueError, match="members"):
        ProjectionBlocks(dims, 2, 2, 2, members=3)
