"""Which occurrences a counterfactual retrain removes, and what the values predict for it.

A removal is a set of training samples, optionally restricted to one step or to a window of
steps [A, B): every occurrence of those samples (at that step, in that window) gets loss
weight 0 in its batch; nothing else changes. A window asks what the data of one stretch of
training did (the late-only weighting of docs/method.md §6, continued pretraining's question).

A direction (kind "direction") changes every occurrence at once: occurrence i gets loss weight
1 + scale·w_i, w a Rademacher (±1) vector over the run's occurrences that is a function of
(seed, sample_id, step) alone (`rademacher`), so a retraining rank derives its rows' weights
and nothing per occurrence is shipped around. Retrains along one direction at two scales
are the attributability check (rayattr/validate/smoothness.py, docs/method.md §6).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from rayattr.validate.errors import ValidationError
from rayattr.store.layout import SAMPLE_VALUES


@dataclass(frozen=True)
class Removal:
    """One counterfactual: the occurrences it removes and its name in the results."""

    kind: str
    """"baseline" (nothing removed), "subset", "source" or "occurrence"."""
    name: str
    """Subset number, source name or "<sample_id>@<step>"."""
    sample_ids: tuple[int, ...] = field(default_factory=tuple)
    """Samples whose occurrences are removed."""
    step: int | None = None
    """Only the occurrence at this step (None: every epoch's occurrence)."""
    weight: float = 0.0
    """Loss weight the chosen occurrences keep (0 = removed; 1 - ε probes the linear response)."""
    window: tuple[int, int] | None = None
    """Only occurrences at steps in [A, B) (None: the whole run)."""
    direction: int | None = None
    """Seed of a Rademacher direction w (kind "direction"): every occurrence, not a chosen set,
    gets loss weight 1 + scale·w_i; `sample_ids` and `weight` are unused."""
    scale: float = 0.0
    """With `direction`: how far along it (h or 2h of the smoothness check)."""

    def __post_init__(self):
        if self.direction is not None and not 0 < self.scale <= 1:
            raise ValidationError(f"a direction's scale must change the loss weights and keep 1 - scale >= 0: "
                                  f"0 < scale <= 1, got {self.scale}")

    @property
    def key(self) -> str:
        """Stable id of the removal: a retrain already in the run is not run again."""
        text = json.dumps({"ids": sorted(self.sample_ids), "step": self.step}
                          | ({"weight": self.weight} if self.weight else {})
                          | ({"window": list(self.window)} if self.window else {})
                          | ({"direction": self.direction, "scale": self.scale} if self.direction is not None else {}))
        return f"{self.kind}-{hashlib.sha1(text.encode()).hexdigest()[:16]}"

    def removes(self, step: int, sample_ids: np.ndarray) -> np.ndarray:
        """Boolean mask over `sample_ids` (the rows of `step`) of the occurrences whose loss
        weight the counterfactual changes (a direction changes every one in its window)."""
        if (self.step is not None and step != self.step) or not in_window(step, self.window):
            return np.zeros(len(sample_ids), dtype=bool)
        if self.direction is not None:
            return np.ones(len(sample_ids), dtype=bool)
        return np.isin(sample_ids, np.asarray(self.sample_ids, dtype=np.int64))

    def loss_weights(self, step: int, sample_ids: np.ndarray) -> np.ndarray:
        """Loss weight (float64) of each of `sample_ids`, the rows of `step`: 1 where the
        counterfactual leaves the occurrence alone, `weight` where it removes it, 1 + scale·w
        along a direction."""
        ids = np.asarray(sample_ids, dtype=np.int64)
        changed = self.removes(step, ids)
        if self.direction is None:
            return np.where(changed, self.weight, 1.0)
        return np.where(changed, 1.0 + self.scale * rademacher(self.direction, ids, step), 1.0)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "Removal":
        window = d.get("window")
        return cls(kind=d["kind"], name=d["name"], sample_ids=tuple(d["sample_ids"]), step=d["step"],
                   weight=float(d.get("weight", 0.0)), window=tuple(window) if window else None,
                   direction=None if d.get("direction") is None else int(d["direction"]),
                   scale=float(d.get("scale", 0.0)))


_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser: a bijection of uint64 whose output bits are all well mixed."""
    x = x + _GOLDEN
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def rademacher(seed: int, sample_ids, step) -> np.ndarray:
    """w of the occurrences (sample_ids[k], step[k]) (`step` may be one number): ±1 (float64),
    each sign a hash of (seed, sample_id, step), independent of the others and of where or in
    which order a rank asks for it."""
    ids = np.asarray(sample_ids, dtype=np.int64)
    steps = np.broadcast_to(np.asarray(step, dtype=np.int64), ids.shape)
    with np.errstate(over="ignore"):  # uint64 arithmetic wraps by design
        x = _mix(np.full(ids.shape, int(seed) % 2**64, dtype=np.uint64))
        x = _mix(_mix(x ^ ids.astype(np.uint64)) ^ steps.astype(np.uint64))
    return np.where((x >> np.uint64(63)).astype(bool), -1.0, 1.0)


def in_window(step: int, window: tuple[int, int] | None) -> bool:
    return window is None or window[0] <= step < window[1]


def parse_window(text: str | None, num_steps: int) -> tuple[int, int] | None:
    """"A:B" (either side may be empty) as the step window [A, B) of a run of `num_steps`
    steps, or a ValidationError saying what is wrong; None for no window."""
    if text is None:
        return None
    parts = str(text).split(":")
    try:
        if len(parts) != 2:
            raise ValueError
        a = int(parts[0]) if parts[0].strip() else 0
        b = int(parts[1]) if parts[1].strip() else num_steps
    except ValueError:
        raise ValidationError(f"--window must be A:B (steps [A, B), either side may be empty), got {text!r}") from None
    if not 0 <= a < b <= num_steps:
        raise ValidationError(f"--window {text}: need 0 <= A < B <= {num_steps} (the run's steps)")
    return (a, b) if (a, b) != (0, num_steps) else None


Samples = Callable[[list[str]], Iterator[pa.RecordBatch]]
"""values/samples.parquet as record batches of the given columns (`run_samples`), or a table."""


def _in_window(b, window: tuple[int, int]):
    return pc.and_(pc.greater_equal(b["step"], window[0]), pc.less(b["step"], window[1]))


def windowed(samples: Samples | pa.Table, window: tuple[int, int] | None) -> Samples | pa.Table:
    """The occurrences (values/samples.parquet rows) inside the window, as what was given."""
    if window is None:
        return samples
    if isinstance(samples, pa.Table):
        return samples.filter(_in_window(samples, window))

    def batches(columns: list[str]) -> Iterator[pa.RecordBatch]:
        wanted = list(dict.fromkeys([*columns, "step"]))
        for b in _batches(samples, wanted):
            yield b.filter(_in_window(b, window)).select(columns)
    return batches


def run_samples(run) -> Samples:
    """The run's values/samples.parquet read row group by row group, only the columns asked for:
    what validate holds is one row group of a few columns, plus what it collects."""
    def batches(columns: list[str]) -> Iterator[pa.RecordBatch]:
        with run.open_read(SAMPLE_VALUES) as f:
            pf = pq.ParquetFile(f)
            for g in range(pf.num_row_groups):
                yield from pf.read_row_group(g, columns=columns, use_threads=False).combine_chunks().to_batches()
    return batches


def _batches(samples: Samples | pa.Table, columns: list[str]) -> Iterator[pa.RecordBatch]:
    return samples.select(columns).to_batches() if isinstance(samples, pa.Table) else samples(columns)


def predicted_all(samples: Samples | pa.Table, removals: list[Removal]) -> list[tuple[float, int]]:
    """Σ value of each removal's occurrences and how many there are, in one pass over the values."""
    sums, counts = np.zeros(len(removals)), np.zeros(len(removals), dtype=np.int64)
    wanted = [pa.array(r.sample_ids, pa.int64()) for r in removals]
    for b in _batches(samples, ["sample_id", "step", "value"]):
        for i, r in enumerate(removals):
            mask = pc.is_in(b["sample_id"], wanted[i])
            if r.step is not None:
                mask = pc.and_(mask, pc.equal(b["step"], r.step))
            if r.window is not None:
                mask = pc.and_(mask, _in_window(b, r.window))
            chosen = b.filter(mask)
            sums[i] += float(pc.sum(chosen["value"]).as_py() or 0.0)
            counts[i] += chosen.num_rows
    return [(float(v), int(c)) for v, c in zip(sums, counts)]


def direction_predicted(samples: Samples | pa.Table, seed: int) -> tuple[float, int]:
    """−Σ w_i·value_i over the occurrences (already restricted to a window, if any), and how
    many there are: the values' prediction of the final loss's slope d loss / d t along
    loss weights 1 + t·w (a value predicts the change when weight 1 drops to 0)."""
    total, n = 0.0, 0
    for b in _batches(samples, ["sample_id", "step", "value"]):
        w = rademacher(seed, b["sample_id"].to_numpy(), b["step"].to_numpy())
        total -= float(w @ b["value"].to_numpy(zero_copy_only=False).astype(np.float64))
        n += b.num_rows
    return total, n


def predicted(samples: Samples | pa.Table, removal: Removal) -> tuple[float, int]:
    """Σ value of the removed occurrences (values/samples.parquet) and how many there are."""
    return predicted_all(samples, [removal])[0]


def subset_removals(samples: Samples | pa.Table, n: int, fraction: float, rng: np.random.Generator) -> list[Removal]:
    """`n` random subsets of `fraction` of the training samples, all their occurrences."""
    if not 0 < fraction < 1:
        raise ValidationError(f"--fraction must lie strictly between 0 and 1, got {fraction}")
    ids = np.unique(np.concatenate([np.unique(b["sample_id"].to_numpy()) for b in _batches(samples, ["sample_id"])]
                                   or [np.zeros(0, np.int64)]))
    k = max(1, round(fraction * len(ids)))
    return [Removal("subset", str(i), tuple(int(x) for x in np.sort(rng.choice(ids, k, replace=False))))
            for i in range(n)]


def source_removals(samples: Samples | pa.Table, names: list[str] | None) -> list[Removal]:
    """Leave one source out, for every source (names=None) or the given ones."""
    by_source: dict[str, set[int]] = {}
    for b in _batches(samples, ["source", "sample_id"]):
        for name, ids in zip(*_grouped(b)):
            by_source.setdefault(name, set()).update(ids)
    known = sorted(by_source)
    unknown = sorted(set(names or []) - set(known))
    if unknown:
        raise ValidationError(f"unknown source(s) {unknown}; the run's sources are {known}")
    return [Removal("source", name, tuple(sorted(by_source[name]))) for name in names or known]


def _grouped(b: pa.RecordBatch) -> tuple[list[str], list[list[int]]]:
    t = pa.Table.from_batches([b]).group_by("source").aggregate([("sample_id", "distinct")])
    return t["source"].to_pylist(), t["sample_id_distinct"].to_pylist()


def occurrence_removals(samples: Samples | pa.Table, n: int, rng: np.random.Generator) -> list[Removal]:
    """`n` single occurrences (one sample at one step) drawn at random."""
    total = sum(b.num_rows for b in _batches(samples, ["step"]))
    rows = np.sort(rng.choice(total, min(n, total), replace=False))
    out, start = [], 0
    for b in _batches(samples, ["sample_id", "step"]):
        mine = rows[(rows >= start) & (rows < start + b.num_rows)] - start
        sid, step = b["sample_id"].to_numpy(), b["step"].to_numpy()
        out += [Removal("occurrence", f"{int(sid[r])}@{int(step[r])}", (int(sid[r]),), int(step[r])) for r in mine]
        start += b.num_rows
    return out
