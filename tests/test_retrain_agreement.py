"""bench/retrain_agreement.py sums an estimate over each removal's occurrences as validate sums
the values (rayattr/validate/counterfactuals.predicted_all), so its columns are judged on the
same footing as the run's values."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pyarrow as pa

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

from retrain_agreement import agreement, predictions  # noqa: E402

from rayattr.validate.counterfactuals import Removal, predicted_all  # noqa: E402
from rayattr.validate.stats import spearman  # noqa: E402


def occurrences(rng, steps=12, batch=5, samples=20):
    ids = np.stack([rng.choice(samples, batch, replace=False) for _ in range(steps)])
    return ids, np.arange(steps)[:, None].repeat(batch, 1), rng.normal(size=(steps, batch))


def test_predictions_are_validates_sums():
    rng = np.random.default_rng(0)
    ids, steps, column = occurrences(rng)
    table = pa.table({"step": steps.ravel(), "sample_id": ids.ravel(), "value": column.ravel()})
    removals = [Removal("subset", "0", (1, 4, 7, 9)), Removal("subset", "1", (1, 4, 7, 9), window=(3, 9)),
                Removal("source", "a", tuple(range(10))), Removal("occurrence", "x", (int(ids[5, 2]),), step=5)]
    expected = [v for v, _ in predicted_all(table, removals)]
    np.testing.assert_allclose(predictions(ids, steps, column, removals), expected, rtol=1e-12)
    assert np.ptp(expected) > 0  # distinct removals, distinct sums: a mask ignored would show
    # an unvalued occurrence (NaN) counts nothing, as a missing row does for validate
    holes = column.copy()
    holes[:3] = np.nan
    cut = table.filter(pa.compute.greater_equal(table["step"], 3))
    np.testing.assert_allclose(predictions(ids, steps, holes, removals), [v for v, _ in predicted_all(cut, removals)],
                               rtol=1e-12)


def test_agreement_groups_removals_and_judges_each_column():
    rng = np.random.default_rng(1)
    ids, steps, column = occurrences(rng)
    subsets = [Removal("subset", str(i), tuple(int(x) for x in rng.choice(20, 4, replace=False)), window=(6, 12))
               for i in range(8)]
    sources = [Removal("source", str(i), tuple(range(5 * i, 5 * i + 5))) for i in range(4)]
    truth = predictions(ids, steps, column, subsets + sources)
    done = [(r, 2.0 + t) for r, t in zip(subsets + sources, truth)]
    rows = agreement(ids, steps, {"right": column, "reversed": -column}, 2.0, done)
    by = {(r["kind"], r["estimate"]): r for r in rows}
    assert len(rows) == 4 and by["subset", "right"]["n"] == 8 and by["source", "right"]["n"] == 4
    assert by["subset", "right"]["spearman"] == 1.0 and by["subset", "reversed"]["spearman"] == -1.0
    assert abs(by["source", "right"]["slope"] - 1.0) < 1e-12 and abs(by["source", "reversed"]["slope"] + 1.0) < 1e-12
    assert by["subset", "right"]["ci"] is not None and by["source", "right"]["ci"] is None
    assert by["subset", "right"]["window"] == (6, 12) and by["source", "right"]["window"] is None
    noisy = column + rng.normal(scale=2.0, size=column.shape)
    (row,) = [r for r in agreement(ids, steps, {"noisy": noisy}, 2.0, done) if r["kind"] == "subset"]
    assert row["spearman"] == spearman(predictions(ids, steps, noisy, subsets), truth[:8])
