"""The distributed pipeline against the single-process core, and data parallelism against one rank."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pyarrow.compute as pc
import pytest
import torch

from rayattr.config import Config, ConfigError
from rayattr.math.dvemb import data_value_embeddings, influence
from rayattr.pipeline.stages import embed_and_reduce, run_pipeline
from rayattr.model.gradients import validation_gradient
from rayattr.query.scoring import score_occurrences
from rayattr.store import GradientReader, Run


# the SGD runs of these tests (plain SGD, constant lr; the built-in default is AdamW)
SGD = {"optimizer": {"type": "sgd"}, "deepspeed": {"zero_optimization": {"stage": 1}}}


def small_config(store: str, run_id: str, **train) -> Config:
    cfg = Config.from_dict({
        "run_id": run_id,
        "data": {"seq_len": 32, "builtin": {"n_train": 192, "n_validation": 32, "max_chars": 96}},
        "train": {"ranks": 2, "micro_batch": 8, "epochs": 2, "lr": 0.3, **SGD, **train},
        "capture": {"rank": 4},
        "embed": {"dtype": "float64", "phases": 4, "segments": 2},
        "store": {"uri": store, "steps_per_shard": 4},
    })
    return cfg.validate()


@pytest.fixture(scope="module")
def trained(local_ray, tmp_path_factory):
    store = str(tmp_path_factory.mktemp("store"))
    cfg = small_config(store, "base")
    result = run_pipeline(cfg, progress=False)
    return cfg, Run.open_uri(result.uri), result


def core_embeddings(run: Run, curvature: list | None = None):
    """Single-process DVEmb from the same recorded gradients (and pseudo-gradient batches), in float64."""
    batches = GradientReader(run, kind="train").read_steps(0, None, dtype=torch.float64)
    etas = {r.step: r.eta for r in run.step_records()}
    curv = [b.grads for b in curvature] if curvature is not None else None
    emb = data_value_embeddings([b.grads for b in batches], [etas[b.step] for b in batches], curvature=curv)
    return batches, emb


def _embeddings(run: Run) -> dict[int, dict]:
    """The run's final embeddings by step."""
    return {b.step: b for b in GradientReader(run, kind="embeddings").read_steps(0, None, dtype=torch.float64)}


def copy_trained(run: Run, dest: Path) -> Run:
    """A copy of a trained local run without any embedding-stage output."""
    src = Path(run.uri)
    skip = {"embed", "values", "embeddings", "local", "local_carried"}
    shutil.copytree(src, dest / run.run_id, ignore=lambda d, names: [n for n in names if n in skip])
    return Run.open(str(dest), run.run_id, mode="record")


def cut_again(cfg: Config, base: Run, result, dest: Path, segments: int) -> Run:
    """The trained run embedded in `segments` segments: the run itself for its own cut, else a
    copy with the embedding stage run again."""
    if segments == base.manifest["segments"]:
        return base
    run = copy_trained(base, dest)
    out = embed_and_reduce(cfg, run, result.num_steps, segments=segments, progress=False)
    assert out.segments == segments and run.reload_manifest()["segments"] == segments
    return run


@pytest.mark.parametrize("segments", [1, 2, 3, 5])
def test_segments_equal_single_process_core(trained, tmp_path, segments):
    run = cut_again(*trained, tmp_path, segments)

    batches, emb = core_embeddings(run)
    final = _embeddings(run)
    assert sorted(final) == [b.step for b in batches]
    for b, e in zip(batches, emb):
        f = final[b.step]
        assert f.sample_ids.tolist() == b.sample_ids.tolist()
        for n in e:  # stored as float32
            torch.testing.assert_close(f.grads[n], e[n], rtol=1e-5, atol=1e-9)

    # values: local embeddings are stored as float32 between the sweep and finalize
    vgrad = validation_gradient(run)
    want = torch.cat(influence(emb, vgrad)).numpy()
    samples = run.read_table("values/samples.parquet")
    np.testing.assert_allclose(samples["value"].to_numpy(), want, rtol=2e-5, atol=1e-10)
    assert samples["sample_id"].to_pylist() == torch.cat([b.sample_ids for b in batches]).tolist()

    # aggregates are sums of the per-occurrence values
    sources = run.read_table("values/sources.parquet").to_pylist()
    phases = run.read_table("values/phases.parquet")
    for row in sources:
        mask = pc.equal(samples["source"], row["source"])
        assert row["n_occurrences"] == pc.sum(mask).as_py()
        np.testing.assert_allclose(row["value"], pc.sum(pc.filter(samples["value"], mask)).as_py(), rtol=1e-9)
        src_phases = phases.filter(pc.equal(phases["source"], row["source"]))
        np.testing.assert_allclose(pc.sum(src_phases["value"]).as_py(), row["value"], rtol=2e-5)


def test_sampled_label_curvature_in_two_members_equals_the_core(local_ray, tmp_path):
    """curvature: sampled end to end, two label draws per sample, in two members of the
    projection (capture.members 2) with joint layers: each member's layers (`<layer>~1` for the
    second) form a recursion of their own on their own rows and curvature rows, equal to the
    core's on them, whose count sets the estimate's scale (|B|/m; the pseudo-loss's scale is
    tested where it is made, test_capture.py). A value is the members' mean, its value_se their
    spread over √2; a query of the kept embeddings scores the same, and the per-source and
    per-phase sums add the values up, each source with its members' standard error.
    At lr 0.3 the correctly scaled estimate reaches η·λ_max 9–49 here (16 or 8 rows a step) and K
    explodes, which the guard refuses; at lr 0.1 it peaks at 8.7 and the 12 steps stay finite."""
    d = small_config(str(tmp_path), "sampled", epochs=1, lr=0.1).to_dict(redact=False)
    d["capture"].update(curvature="sampled", curvature_fraction=0.5, curvature_draws=2, members=2)
    d["embed"].update(segments=2, joint_layers=True, error_blocks=1)
    run = Run.open_uri(run_pipeline(Config.from_dict(d).validate(), progress=False).uri)
    names = list(run.manifest["layer_dims"])
    of = [[n for n in names if n.endswith("~1") == bool(j)] for j in (0, 1)]
    assert len(of[0]) == len(of[1]) > 0 and of[1] == [n + "~1" for n in of[0]]
    batches = GradientReader(run, kind="train").read_steps(0, None, dtype=torch.float64)
    curv = GradientReader(run, kind="curvature").read_steps(0, None, dtype=torch.float64)
    # 2 ranks × 4 sampled rows × 2 draws; a rank's second draw redraws its first's samples' labels
    assert [b.step for b in curv] == [b.step for b in batches] and all(len(b) == 16 for b in curv)
    assert all(torch.isfinite(b.grads[n]).all() and b.grads[n].abs().max() > 0 for b in curv for n in b.grads)
    for b in curv:
        for rank in (0, 1):
            rows = b.grads[names[0]][b.ranks == rank]
            assert rows.shape[0] == 8 and not torch.allclose(rows[:4], rows[4:])
    etas = {r.step: r.eta for r in run.step_records()}
    vgrad = validation_gradient(run)
    final = _embeddings(run)
    per_member = []
    for j, layers in enumerate(of):
        join = lambda rows: {"joint": torch.cat([rows[n] for n in layers], -1)}  # noqa: E731
        emb = data_value_embeddings([join(b.grads) for b in batches], [etas[b.step] for b in batches],
                                    curvature=[join(c.grads) for c in curv])
        for b, e in zip(batches, emb):
            torch.testing.assert_close(final[b.step].grads["joint~1" if j else "joint"], e["joint"], rtol=1e-5,
                                       atol=1e-9)
        per_member.append(torch.cat(influence(emb, join(vgrad))).numpy())
    assert not np.allclose(per_member[0], per_member[1], rtol=0.1)  # independent estimates
    samples = run.read_table("values/samples.parquet")
    values = samples["value"].to_numpy()
    assert np.isfinite(values).all() and np.abs(values).max() > 0
    np.testing.assert_allclose(values, (per_member[0] + per_member[1]) / 2, rtol=2e-5, atol=1e-10)
    np.testing.assert_allclose(samples["value_se"].to_numpy(), np.abs(per_member[0] - per_member[1]) / 2,
                               rtol=2e-5, atol=1e-10)
    # a query scores the kept final embeddings the same way: the validation gradient as the query
    scored = score_occurrences(run, vgrad)
    want = {(t, i): (v, e) for t, i, v, e in zip(samples["step"].to_pylist(), samples["sample_id"].to_pylist(), values,
                                                 samples["value_se"].to_numpy())}
    got = np.array([want[(int(t), int(i))] for t, i in zip(scored.steps, scored.sample_ids)])
    np.testing.assert_allclose(np.stack([scored.scores[:, 0], scored.se[:, 0]], 1), got, rtol=1e-4, atol=1e-9)
    src = samples["source"].to_numpy(zero_copy_only=False)
    phases = run.read_table("values/phases.parquet").to_pylist()
    for row in run.read_table("values/sources.parquet").to_pylist():
        np.testing.assert_allclose(row["value"], values[src == row["source"]].sum(), rtol=1e-6)
        np.testing.assert_allclose(sum(p["value"] for p in phases if p["source"] == row["source"]), row["value"],
                                   rtol=2e-5, atol=1e-12)
        # the source's total by member: its standard error, and an interval at least its t half-width
        totals = [x[src == row["source"]].sum() for x in per_member]
        np.testing.assert_allclose(row["value_se"], abs(totals[0] - totals[1]) / 2, rtol=1e-4)
        assert row["value_high"] - row["value"] >= 12.7 * row["value_se"] * 0.999  # t(0.975, 1 dof) = 12.7


def test_unstable_cut_values_the_steps_after_it_as_the_core_does(trained, tmp_path):
    """embed.unstable "cut" through the driver's embedding stage: the small run at lr 0.3 has
    steps past SGD's edge (η·λ_max(H) > 2) mid-run, so the latest of them cuts; the embedding
    finishes, says from which step the run is attributable, and every later occurrence's value,
    final embedding and per-source sum (kept, and by the forward scan) equals the core's on the
    same rows; earlier ones have none."""
    base_cfg, base, result = trained
    cfg = base_cfg.with_overrides(**{"embed.unstable": "cut"})
    run = copy_trained(base, tmp_path / "kept")
    embed_and_reduce(cfg, run, result.num_steps, segments=3, progress=False)
    m = run.reload_manifest()
    first = m["attributable_from"]
    assert 0 < first < result.num_steps and m["unstable_step"] == first - 1 and m["unstable_eta_lambda"] > 2, m
    batches, emb = core_embeddings(run)
    later = [(b, e) for b, e in zip(batches, emb) if b.step >= first]
    final = _embeddings(run)
    assert sorted(final) == [b.step for b, _ in later]
    for b, e in later:
        for n in e:
            torch.testing.assert_close(final[b.step].grads[n], e[n], rtol=1e-5, atol=1e-9)
    samples = run.read_table("values/samples.parquet")
    assert samples["step"].to_numpy().min() == first
    want = torch.cat(influence([e for _, e in later], validation_gradient(run))).numpy()
    np.testing.assert_allclose(samples["value"].to_numpy(), want, rtol=2e-5, atol=1e-10)
    assert_source_embeddings(run, source_sums([b for b, _ in later], [e for _, e in later]), rtol=1e-4)
    sums = copy_trained(run, tmp_path / "sums")
    embed_and_reduce(cfg.with_overrides(**{"embed.keep_sample_embeddings": False}), sums, result.num_steps,
                     segments=3, progress=False)
    assert sums.reload_manifest()["attributable_from"] == first
    from rayattr.report.trust import attributable_sentence

    assert f"Only occurrences from step {first} on have values" in attributable_sentence(run)
    assert_source_embeddings(sums, source_sums([b for b, _ in later], [e for _, e in later]), rtol=1e-4)


def test_joint_layers_equal_the_core_on_joined_rows(trained, tmp_path):
    """embed.joint_layers: one K across all captured layers, across 3 segments, equals the
    single-process core run on the layers' rows side by side; its values are a different answer
    from the per-layer K's, and a query with per-layer gradients scores them as the values."""
    from rayattr.query.scoring import score_occurrences

    cfg, base, result = trained
    run = copy_trained(base, tmp_path)
    embed_and_reduce(cfg.with_overrides(**{"embed.joint_layers": True}), run, result.num_steps, segments=3,
                     progress=False)
    names = list(run.manifest["layer_dims"])
    batches = GradientReader(run, kind="train").read_steps(0, None, dtype=torch.float64)
    etas = {r.step: r.eta for r in run.step_records()}
    joined = [{"joint": torch.cat([b.grads[n] for n in names], -1)} for b in batches]
    emb = data_value_embeddings(joined, [etas[b.step] for b in batches])
    final = _embeddings(run)
    for b, e in zip(batches, emb):
        assert set(final[b.step].grads) == {"joint", "joint@00", "joint@01", "joint@10", "joint@11"}
        torch.testing.assert_close(final[b.step].grads["joint"], e["joint"], rtol=1e-5, atol=1e-9)
    vgrad = validation_gradient(run)
    want = torch.cat(influence(emb, {"joint": torch.cat([vgrad[n] for n in names])})).numpy()
    samples = run.read_table("values/samples.parquet")
    values = samples["value"].to_numpy()
    np.testing.assert_allclose(values, want, rtol=2e-5, atol=1e-10)
    per_layer = base.read_table("values/samples.parquet")["value"].to_numpy()
    assert np.abs(values - per_layer).max() > 1e-3 * np.abs(per_layer).max()
    assert np.isfinite(samples["value_se"].to_numpy()).all()
    layers = run.read_table("values/layers.parquet")
    assert set(layers["layer"].to_pylist()) == {"joint"}
    occ = score_occurrences(run, vgrad)
    scored = {(int(t), int(i)): float(v) for t, i, v in zip(occ.steps, occ.sample_ids, occ.scores[:, 0])}
    got = [scored[(t, i)] for t, i in zip(samples["step"].to_pylist(), samples["sample_id"].to_pylist())]
    np.testing.assert_allclose(got, values, rtol=1e-5, atol=1e-10)
    # embedding it again per layer would mix the layouts' K's and embeddings: refused, nothing touched
    with pytest.raises(ConfigError, match="embed.joint_layers: true"):
        embed_and_reduce(cfg, run, result.num_steps, segments=3, progress=False)
    assert run.reload_manifest()["joint_layers"] is True and run.reload_manifest()["status"] == "done"


def test_outputs_and_manifest(trained):
    cfg, run, result = trained
    m = run.reload_manifest()
    assert m["status"] == "done" and m["num_steps"] == result.num_steps == 24
    assert set(m["timings"]) == {"data", "train", "embed", "reduce"}
    assert Config.from_dict(m["config"]).to_dict() == cfg.to_dict()  # replayable
    samples = run.read_table("values/samples.parquet")
    assert samples.column_names == ["sample_id", "source", "step", "epoch", "value", "value_se"]
    assert samples.num_rows == 24 * 16
    assert set(samples["epoch"].to_pylist()) == {0, 1}
    # every training sample occurs once per epoch (192 samples, 12 full batches per epoch)
    counts = samples.group_by("sample_id").aggregate([("step", "count")])
    assert set(counts["step_count"].to_pylist()) == {2}
    src = run.read_table("values/sources.parquet")
    assert src.column_names == ["source", "n_samples", "n_occurrences", "value", "value_low", "value_high", "value_per_sample",
                                "value_se"]
    assert src["value_se"].null_count == len(src)  # one member: no estimate of its spread
    assert "corrupted" in src["source"].to_pylist()
    assert run.read_table("embeddings/sources.parquet").num_rows == src.num_rows
    for rel in ("data/train.parquet", "data/validation.parquet", "weights/initial.safetensors",
                "weights/final.safetensors"):
        assert run.exists(rel), rel


@pytest.fixture(scope="module")
def one_rank(trained, tmp_path_factory) -> Run:
    """The trained run's global batch on 1 rank (micro-batch 16)."""
    cfg = small_config(str(tmp_path_factory.mktemp("one")), "one", ranks=1, micro_batch=16)
    return Run.open_uri(run_pipeline(cfg, progress=False).uri)


def test_two_ranks_equal_one_rank(trained, one_rank):
    """Same global batch on 1 rank (micro-batch 16) and 2 ranks (8 each, ZeRO-1): same
    trajectory. (ZeRO-2's partitioned gradients: the AdamW two-rank test.)"""
    one, two = one_rank, trained[1]
    assert two.manifest["config"]["train"]["deepspeed"]["zero_optimization"]["stage"] == 1
    assert [r.sample_ids for r in one.step_records()] == [r.sample_ids for r in two.step_records()]
    e1, e2 = _embeddings(one), _embeddings(two)
    assert sorted(e1) == sorted(e2)
    for step in e1:
        assert e1[step].sample_ids.tolist() == e2[step].sample_ids.tolist()
        for n in e1[step].grads:
            torch.testing.assert_close(e2[step].grads[n], e1[step].grads[n], rtol=2e-3, atol=1e-6)
    v1 = one.read_table("values/samples.parquet")["value"].to_numpy()
    v2 = two.read_table("values/samples.parquet")["value"].to_numpy()
    np.testing.assert_allclose(v2, v1, rtol=2e-3, atol=1e-7)


def test_llama_bf16_accumulation_scheduler_on_user_jsonl(local_ray, tmp_path):
    """DeepSpeed pass-through on a Llama-shaped model: ZeRO-2, bf16, gradient accumulation and
    a warm-up LR schedule, trained on the user's JSONL files (text, source; no id column).
    AdamW reads its partitioned bf16-run state (fp32 master copies) for the step's own P.
    (Under SGD the warm-up's lr-0 steps would carry no influence: tests/test_dvemb.py.)"""
    import json

    from rayattr.data import builtin_corpus

    peak = 0.004
    train, val = builtin_corpus(n_train=96, n_validation=16, corrupted_fraction=0.1, seed=1, max_chars=80)
    for name, table in (("train", train), ("val", val)):
        with open(tmp_path / f"{name}.jsonl", "w") as f:
            for row in table.select(["text", "source"]).to_pylist():
                f.write(json.dumps(row) + "\n")
    cfg = Config.from_dict({
        "run_id": "llama",
        "model": {"family": "llama", "n_layer": 1, "n_embd": 32, "n_head": 2},
        # the data stage in this process: Ray Data's start-up would be most of it (the engines
        # agree: tests/test_data_stream.py)
        "data": {"train": str(tmp_path / "train.jsonl"), "validation": str(tmp_path / "val.jsonl"), "seq_len": 32,
                 "stage": "driver"},
        "train": {"ranks": 2, "micro_batch": 4, "grad_accum": 2, "epochs": 1, "optimizer": {"type": "adamw"},
                  "deepspeed": {
            "zero_optimization": {"stage": 2}, "bf16": {"enabled": True},
            "scheduler": {"type": "WarmupLR", "params": {"warmup_min_lr": 0.0, "warmup_max_lr": peak,
                                                         "warmup_num_steps": 4, "warmup_type": "linear"}}}},
        "capture": {"rank": 4},
        "embed": {"segments": 2, "phases": 3},
        "store": {"uri": str(tmp_path / "store")},
    }).validate()
    run = Run.open_uri(run_pipeline(cfg, progress=False).uri)
    records = run.step_records()
    assert len(records) == 96 // 16
    lrs = [r.lr for r in records]
    # the lr each update used: DeepSpeed's WarmupLR starts at warmup_min_lr and moves after a step
    assert lrs == pytest.approx([0.0, 0.0, 0.25 * peak, 0.5 * peak, 0.75 * peak, peak])
    for r in records:  # per-sample step size: lr / global batch, times the clip factor κ ≤ 1
        assert 0 < r.clip <= 1 and r.eta == pytest.approx(r.clip * r.lr / 16)
    assert min(r.clip for r in records) < 1  # DeepSpeed clips at 1.0 unless told otherwise
    samples = run.read_table("values/samples.parquet")
    steps = samples["step"].to_numpy()
    # Adam's momentum carries steps 0-1's gradients into the later, non-zero-lr updates
    assert {r.optimizer for r in records} == {"adamw"}
    assert all(r.precondition_step == r.adam_step for r in records)
    assert (samples["value"].to_numpy()[steps < 2] != 0).all()
    assert (samples["value"].to_numpy()[steps >= 2] != 0).all()
    assert sorted(set(samples["sample_id"].to_pylist())) == list(range(96))  # ids = row order
    assert set(samples["source"].to_pylist()) == set(train["source"].to_pylist())
    assert np.isfinite(samples["value"].to_numpy()).all()
    assert any("self_attn" in n for n in run.manifest["layer_dims"])  # Llama layers were captured


def test_phase_and_layer_breakdowns_sum_to_the_source_values(trained):
    """values/phases.parquet and values/layers.parquet split each source's value; the parts add
    up to values/sources.parquet (the per-occurrence sum). The sums are taken in float64 inside
    the sweep, the occurrence values from local embeddings stored in float32: 1e-6 apart."""
    _, run, _ = trained
    total = {r["source"]: r["value"] for r in run.read_table("values/sources.parquet").to_pylist()}
    for name, n_parts in (("phases", 4), ("layers", len(run.manifest["layer_dims"]))):
        parts = run.read_table(f"values/{name}.parquet").group_by("source").aggregate([("value", "sum"),
                                                                                         ("value", "count")])
        got = {r["source"]: r["value_sum"] for r in parts.to_pylist()}
        assert got.keys() == total.keys()
        for s in total:
            assert got[s] == pytest.approx(total[s], rel=1e-6, abs=1e-12), (name, s)
        assert max(r["value_count"] for r in parts.to_pylist()) == n_parts


@pytest.mark.parametrize("shards", [1, 3])
def test_validation_gradient_from_segment_shards_equals_the_whole_set(trained, shards):
    """Each segment actor sums its shard of the validation set (SegmentWorker.validation_sum,
    one per segment), and the last turns the shards into w = v: the mean gradient of the whole
    set, in float64 (per-sample rows are float32, batched differently)."""
    from rayattr.embed.segment import SegmentSpec, SegmentWorker
    from rayattr.math.dvemb import segment_bounds
    from rayattr.model.gradients import validation_gradient_sum

    _, run, _ = trained
    whole = validation_gradient(run)
    n = run.manifest["num_steps"]
    bounds = segment_bounds(n, shards)
    workers = [SegmentWorker(run.uri, None, SegmentSpec(i, a, b), [0, n])
               for i, (a, b) in enumerate(zip(bounds[:-1], bounds[1:]))]
    parts = [w.validation_sum(shards) for w in workers]
    table = run.read_table("data/validation.parquet")
    assert sum(p[1] for p in parts) == table.num_rows and all(p[1] > 0 for p in parts)
    w, z = workers[-1].shard_vectors(*parts)
    assert z is None  # SGD: no momentum carried
    for name in whole:
        assert w[name].dtype == torch.float64
        torch.testing.assert_close(w[name], whole[name], rtol=1e-5, atol=1e-7)
        assert float(whole[name].abs().max()) > 0
    if shards == 1:  # each shard reads only its row groups: the sums of the whole-table read, bit for bit
        from rayattr.model.gradients import VALIDATION_ROWS, final_model, shard_rows, text_gradients

        model = final_model(run)
        for i in range(5):
            sums, rows = validation_gradient_sum(run, i, 5)
            a, b = shard_rows(table.num_rows, i, 5)
            want: dict[str, torch.Tensor] = {}
            for start in range(a, b, VALIDATION_ROWS):
                g = text_gradients(run, table.slice(start, min(b, start + VALIDATION_ROWS) - start), model=model)
                want = {n: want[n] + x.double().sum(0) if n in want else x.double().sum(0) for n, x in g.items()}
            assert rows == b - a and all(torch.equal(sums[n], want[n]) for n in want)


def source_sums(batches, emb) -> dict[str, dict[str, np.ndarray]]:
    """Per source, the sum of its occurrences' embeddings (real layers), in float64."""
    out: dict[str, dict[str, np.ndarray]] = {}
    for b, e in zip(batches, emb):
        for i, src in enumerate(b.sources):
            acc = out.setdefault(src, {n: np.zeros(e[n].shape[1]) for n in e})
            for n in e:
                acc[n] += e[n][i].double().numpy()
    return out


def assert_source_embeddings(run, want, rtol=1e-5):
    table = run.read_table("embeddings/sources.parquet").to_pylist()
    assert sorted(r["source"] for r in table) == sorted(want)
    for row in table:
        for n, vec in want[row["source"]].items():
            np.testing.assert_allclose(row[n], vec, rtol=rtol, atol=1e-9 * np.abs(vec).max())


def test_per_source_mode_forms_no_suffix_and_equals_the_core(trained, tmp_path):
    """Without per-sample embeddings the sums are finalised by the forward scan (matrix times
    vectors only): the source embeddings and values equal the core's, in float64."""
    cfg, base, result = trained
    run = copy_trained(base, tmp_path)
    per_source = cfg.with_overrides(**{"embed.keep_sample_embeddings": False})
    embed_and_reduce(per_source, run, result.num_steps, segments=3, progress=False)
    assert not run.exists("grads/embeddings") and not run.exists("embed/final_sums/seg0000.parquet")
    batches, emb = core_embeddings(run)
    assert_source_embeddings(run, source_sums(batches, emb))
    want = torch.cat(influence(emb, validation_gradient(run))).numpy()
    np.testing.assert_allclose(run.read_table("values/samples.parquet")["value"].to_numpy(), want, rtol=2e-5, atol=1e-10)
