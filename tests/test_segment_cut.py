"""Segments cannot be mixed: a run whose embedding started keeps its cut of the steps, and a
driver asking for another (`rayattr attribute RUN --segments N`) is refused before Ray
starts, naming the recorded cut (rayattr/embed/cut.py)."""

from __future__ import annotations

import pytest

from rayattr.pipeline import attribution
from rayattr.config import Config, ConfigError
from rayattr.math.dvemb import segment_bounds
from rayattr.embed.cut import choose_segments
from rayattr.store.layout import segment_k_path
from rayattr.store import Run

STEPS = 12


def partly_embedded(root, segments: int = 3, count_only: bool = False) -> Run:
    """A recorded run whose embedding stopped after its first segment's K."""
    cut = {} if count_only else {"segment_bounds": segment_bounds(STEPS, segments)}
    run = Run.create(str(root), "r", {"config": Config().to_dict(), "layer_dims": {"a": 4}, "num_steps": STEPS,
                                      "status": "embedding", "segments": segments, **cut})
    run.write_bytes("weights/final.safetensors", b"w")
    run.write_bytes("data/validation.parquet", b"v")
    run.write_bytes(segment_k_path(0), b"K of steps 0-3")
    return run


@pytest.mark.parametrize("count_only", [False, True])
def test_attribute_with_another_cut_is_refused(tmp_path, count_only):
    run = partly_embedded(tmp_path, 3, count_only)
    with pytest.raises(ConfigError, match=r"started with 3 segments \(step bounds \[0, 4, 8, 12\]\).*--segments 3"):
        attribution.attribute(run.uri, segments=2, progress=False)
    assert run.reload_manifest()["status"] == "embedding"  # nothing was changed


def test_choose_segments(tmp_path):
    run = partly_embedded(tmp_path, 3)
    assert choose_segments(run, STEPS, None, lambda: 7) == (3, [0, 4, 8, 12])  # the recorded cut
    assert choose_segments(run, STEPS, 3) == (3, [0, 4, 8, 12])
    with pytest.raises(ConfigError, match="3 segments"):
        choose_segments(run, STEPS, 4)
    run._storage.remove(run._storage.find("embed"))  # no artefact of the cut left: a new cut is free
    assert choose_segments(run, STEPS, 2) == (2, [0, 6, 12])
    assert choose_segments(run, STEPS, 50) == (STEPS, list(range(STEPS + 1)))
