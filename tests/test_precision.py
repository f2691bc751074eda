"""Precision and versions: per-(source, phase) sums in float64, dvemb returning the dtype it
promises, and a torch lower bound that covers the torch APIs the package calls."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pyarrow as pa
import pytest
import torch

import rayattr
from rayattr.math.dvemb import data_value_embeddings
from rayattr.embed.segment import SegmentSpec, SegmentWorker
from rayattr.store.layout import segment_sums_path
from rayattr.embed.sums import SourcePhaseSums
from rayattr.reduce.aggregate import source_values
from rayattr.store import GradientWriter, Run, StepRecord

ROOT = Path(__file__).resolve().parent.parent


def test_segment_sums_accumulate_in_float64(tmp_path):
    """A segment in embed.dtype float32 whose source sum is 1e8 - 64: one occurrence of 1e8
    and 64 of -1, one per step. Step sizes and gradients are chosen so that K stays ±1
    (eta·g² = 2 for the large row, ~0 for the small ones): the embeddings are exactly those
    numbers. A float32 accumulator (spacing 8 at 1e8) loses every -1."""
    eta, big, small, n = 5e15, 2e-8, 2e-16, 64
    dims = {"l": 1}
    run = Run.create(str(tmp_path), "r", {"layer_dims": dims})
    with GradientWriter(run, 0, dims, steps_per_shard=n + 1) as w:
        for step in range(n + 1):
            g = big if step == n else small  # the sweep runs backwards: the large row first
            w.write_step(step, [step], ["s"], {"l": torch.tensor([[g]])}, positions=[0])
    run.write_step_records([StepRecord(s, 0, 1.0, eta, [s], ["s"], [0]) for s in range(n + 1)])
    SegmentWorker(run.uri, None, SegmentSpec(0, 0, n + 1), [0, n + 1], dtype="float32").compute()
    sums = SourcePhaseSums.from_table(run.read_table(segment_sums_path(0)), dims)
    total = sums.sum[("s", 0)]["l"]
    assert total.dtype == torch.float64
    assert abs(float(total) - (1e8 - n)) < 1.0, float(total)  # float64 keeps every -1 that float32 would round away at 1e8


def test_source_values_are_float64():
    samples = pa.table({"sample_id": [1, 2, 3], "source": ["a"] * 3,
                        "value": pa.array([1e8, -1.0, -1.0], pa.float32())})
    out = source_values(samples)
    assert out.schema.field("value").type == pa.float64()
    assert out["value"].to_pylist() == [1e8 - 2]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.float64])
def test_dvemb_returns_the_input_dtype(dtype):
    gen = torch.Generator().manual_seed(0)
    grads = [torch.randn(4, 3, generator=gen).to(dtype) for _ in range(5)]
    out = data_value_embeddings([{"a": g} for g in grads], [0.01] * 5, segments=2)
    assert all(e["a"].dtype == dtype for e in out)  # half precision stays half: no silent upcast to float32
    layered = [{"a": g, "b": g.double()} for g in grads]
    out = data_value_embeddings(layered, [0.01] * 5, segments=2)
    assert all(e["a"].dtype == dtype and e["b"].dtype == torch.float64 for e in out)
    # the rounding of the returned dtype, not more: computed in float32 at least
    ref = data_value_embeddings([{"a": g.double()} for g in grads], [0.01] * 5)
    torch.testing.assert_close(out[0]["a"].double(), ref[0]["a"], rtol=1e-2, atol=1e-3)


# torch API (as spelled in a call) -> first torch version that has it
TORCH_APIS = {"out_dtype=": (2, 8)}


def test_torch_lower_bound_covers_the_apis_used():
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    spec = next(d for d in deps if re.match(r"torch\b", d))
    lower = tuple(int(x) for x in re.search(r">=\s*(\d+)\.(\d+)", spec).groups())
    package = Path(rayattr.__file__).parent
    for api, since in TORCH_APIS.items():
        users = [p.name for p in package.rglob("*.py") if re.search(rf"torch\.\w+\([^)]*{api}", p.read_text())]
        if users:
            assert lower >= since, f"{api} (in {users}) needs torch>={since}, pyproject says {spec}"
