"""rayattr.plan.estimate: predicted sizes against the real objects, and how the estimates scale."""

from __future__ import annotations

import json
import os
import re

import numpy as np
import pytest
import torch

from rayattr.capture import GradientCapture, ProjectionSpec
from rayattr.config import Config, load_config
from rayattr.math.dvemb import segment_bounds, suffix_scan
from rayattr.embed.blocks import ProjectionBlocks
from rayattr.embed.segment import SegmentSpec, SegmentWorker
from rayattr.plan.estimate import (VALIDATION_PHASE, Throughput, captured_count, estimate, format_plan, ipc_bytes, parse_count,
                                   plan_main)
from rayattr.report.units import human_bytes
from rayattr.store import GradientWriter, Run, StepRecord
from rayattr.model.build import build_model
from rayattr.train.worker import projection_spec

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT = os.path.join(ROOT, "jobs", "configs", "default.yaml")
BYTE_VOCAB = 259


def small(**over) -> Config:
    """The default config with plain SGD (no update rows), shortened so a real store round trip
    takes a second; test_adamw_counts_update_rows adds AdamW's rows."""
    return load_config(DEFAULT, **{"train.steps": 24, "embed.segments": 2, "train.optimizer.type": "sgd", **over})


def tree_bytes(path: str) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs)


@pytest.mark.parametrize("over", [{}, {"model.family": "llama"}, {"capture.rank": 4},
                                  {"capture.layers": ["*mlp*"]}, {"capture.mix": 64, "embed.error_blocks": 1}])
def test_layer_dims_equal_the_capture_on_the_real_model(over):
    cfg = small(**over)
    plan = estimate(cfg)
    model = build_model(cfg.model, BYTE_VOCAB, cfg.data.seq_len, seed=0)
    cap = GradientCapture(model, projection=projection_spec(cfg), layers=cfg.capture.layers)
    assert {lay.name: lay.p for lay in plan.layers} == cap.layer_dims()
    assert plan.n_params == sum(p.numel() for p in model.parameters())
    assert plan.total_dim == sum(cap.layer_dims().values())
    assert plan.grad_bytes_per_sample == plan.total_dim * 4


def test_default_run_shape():
    plan = estimate(load_config(DEFAULT))
    # 1536 samples / (8 x 2 ranks) = 96 steps per epoch, 2 epochs; gpt2 2 blocks x 4 + lm_head, p = 16 x 16
    assert (plan.steps, plan.global_batch, len(plan.layers), plan.total_dim) == (192, 16, 9, 9 * 16 * 16)
    assert plan.occurrences == 192 * 16


@pytest.mark.parametrize("L,p,rows,steps,dtype", [(9, 64, 8, 8, "float32"), (225, 64, 4, 3, "bfloat16"),
                                                   (2, 1024, 16, 5, "float16")])
def test_ipc_bytes_match_encoded_shards(L, p, rows, steps, dtype):
    from rayattr.store.shard import encode_shard, shard_schema, step_batch

    layers = {f"model.layers.{i}.mlp.up_proj": p for i in range(L)}
    schema = shard_schema(layers, dtype, "train")
    batches = [step_batch(schema, s, 0, list(range(rows)), ["numeric"] * rows, list(range(rows)),
                          {k: torch.randn(rows, p) for k in layers}, dtype) for s in range(steps)]
    buf = encode_shard(schema, batches, list(range(steps)))[0]
    predicted = ipc_bytes(rows * steps, steps, 1, dtype, n_layers=L, total_dim=L * p, source_chars=7)
    assert predicted == pytest.approx(buf.size, rel=0.01)


def test_sizes_match_a_real_store_run(tmp_path):
    """Write what the rank actors write for the planned steps, run both segments for real,
    and compare the bytes on disk with the plan."""
    cfg = small()
    plan = estimate(cfg)
    t = cfg.train
    dims = {lay.name: lay.p for lay in plan.layers}
    run = Run.create(str(tmp_path), "r", {"layer_dims": dims,
                                          "projection": ProjectionSpec(rank=cfg.capture.rank).to_dict()}, options=None)
    ProjectionBlocks.register(run, cfg.embed.error_blocks)  # as the pipeline does before embedding
    gen = torch.Generator().manual_seed(0)
    share = t.micro_batch * t.grad_accum
    records = []
    writers = [GradientWriter(run, r, dims, dtype=cfg.capture.dtype, steps_per_shard=cfg.store.steps_per_shard)
               for r in range(t.ranks)]
    for step in range(plan.steps):
        ids = np.arange(step * plan.global_batch, (step + 1) * plan.global_batch)
        sources = ["numeric"] * plan.global_batch  # 7 characters, the built-in mean
        for r, w in enumerate(writers):
            rows = slice(r * share, (r + 1) * share)
            w.write_step(step, ids[rows].tolist(), sources[rows],
                         {n: torch.randn(share, p, generator=gen) * 1e-2 for n, p in dims.items()},
                         positions=list(range(share)))
        records.append(StepRecord(step, 0, 0.1, 0.1 / plan.global_batch, ids.tolist(), sources,
                                  (np.arange(plan.global_batch) // share).tolist()))
    for w in writers:
        w.close()
    run.write_step_records(records)
    edges = segment_bounds(plan.steps, cfg.embed.phases)
    bounds = segment_bounds(plan.steps, plan.segments)
    workers = [SegmentWorker(run.uri, None, SegmentSpec(i, a, b), edges)
               for i, (a, b) in enumerate(zip(bounds[:-1], bounds[1:]))]
    for w in workers:
        w.compute()
    # the reduce's chains, run through the workers as the pipeline does
    vectors = [None] * len(workers)
    vectors[-1] = workers[-1].value_vectors({n: torch.ones(p) for n, p in dims.items()})
    for ell in range(len(workers) - 1, 0, -1):
        vectors[ell - 1] = workers[ell].chain_vectors(vectors[ell])
    links = suffix_scan([w.scan_link() for w in workers[1:]],
                        lambda i, later, own: workers[i + 1].compose_links(later, own)) + [None]
    for w, v, link in zip(workers, vectors, links):
        w.finalize(v, link)

    root = os.path.join(str(tmp_path), "r")
    assert tree_bytes(os.path.join(root, "grads", "train")) == pytest.approx(plan.storage["train gradients"], rel=0.01)
    assert tree_bytes(os.path.join(root, "grads", "local")) == pytest.approx(plan.storage["local embeddings"], rel=0.01)
    assert tree_bytes(os.path.join(root, "grads", "embeddings")) == pytest.approx(plan.storage["final embeddings"], rel=0.01)
    assert tree_bytes(os.path.join(root, "embed", "K")) == pytest.approx(plan.storage["K matrices"], rel=0.02)
    shards = [f for _, _, fs in os.walk(os.path.join(root, "grads", "train")) for f in fs]
    assert len(shards) == plan.objects


def test_per_source_mode_drops_only_the_final_embeddings():
    a, b = estimate(small()), estimate(small(), per_source=True)
    assert b.per_source and not a.per_source
    assert b.storage["final embeddings"] == 0 < a.storage["final embeddings"]
    assert a.storage_per_sample - a.storage_per_source == a.storage["final embeddings"]
    assert b.storage_total == pytest.approx(a.storage_per_source)
    assert estimate(small(**{"embed.keep_sample_embeddings": False})).per_source


def test_scaling_laws():
    base = estimate(small(**{"train.steps": 40}))
    twice = estimate(small(**{"train.steps": 80}))
    for kind in ("train gradients", "local embeddings", "final embeddings", "values tables"):
        assert twice.storage[kind] == pytest.approx(2 * base.storage[kind], rel=0.02), kind
    # a segment actor streams its steps: K and the chain do not grow with them, the write
    # chunk stops growing at its cap, only the step records grow (16 rows a step)
    half = estimate(small(**{"train.steps": 20}))
    key = "segment actor: K, R and the chain"
    assert half.memory[key] == base.memory[key] == twice.memory[key] > 0
    rec = "segment actor: step records and index"
    more_steps = -(-twice.steps // twice.segments) - -(-base.steps // base.segments)
    assert twice.memory[rec] - base.memory[rec] >= more_steps * 16 * 140 > 0
    long, longer = (estimate(small(**{"train.steps": n})) for n in (4000, 16000))
    chunk = "segment actor: one write chunk"
    assert long.memory[chunk] == longer.memory[chunk] > base.memory[chunk]
    bounded = [k for k in long.memory if k.startswith("segment actor") and k != rec]
    assert all(long.memory[k] == longer.memory[k] for k in bounded)
    assert twice.time["train"] - twice.throughput.actor_start_s == pytest.approx(
        2 * (base.time["train"] - base.throughput.actor_start_s))

    # p = r^2: rank 32 stores ~4x the gradients of rank 16; K matrices grow with p^2 = r^4
    assert base.total_dim == 9 * 16 * 16  # the default rank, 16
    wide = estimate(small(**{"train.steps": 40, "capture.rank": 32}))
    assert wide.total_dim == 4 * base.total_dim
    # the payload grows by the extra 3P numbers per row; framing is per column, not per number
    assert wide.storage["train gradients"] - base.storage["train gradients"] == 40 * 16 * 3 * base.total_dim * 4
    assert wide.storage["K matrices"] == 16 * base.storage["K matrices"]

    # more segments: K grows, per-actor memory shrinks, gradients stay
    four = estimate(small(**{"train.steps": 40}), segments=4)
    assert four.storage["K matrices"] == 2 * base.storage["K matrices"]
    assert four.process_memory["segment actor"] < base.process_memory["segment actor"]
    assert four.storage["train gradients"] == base.storage["train gradients"]

    # bfloat16 gradients halve the gradient payload, not the embeddings (always float32)
    bf = estimate(small(**{"train.steps": 40, "capture.dtype": "bfloat16"}))
    assert bf.storage["train gradients"] == pytest.approx(base.storage["train gradients"] / 2, rel=0.1)
    assert bf.storage["local embeddings"] == base.storage["local embeddings"]

    # sampled curvature adds pseudo-gradient rows: micro_batch * fraction per rank and micro-step
    samp = estimate(small(**{"train.steps": 40, "capture.curvature": "sampled"}))
    assert samp.curvature_rows_per_step == 4 * 2
    assert samp.storage["curvature rows"] > 0.4 * base.storage["train gradients"]
    # and each label draw adds as many again
    drawn = estimate(small(**{"train.steps": 40, "capture.curvature": "sampled", "capture.curvature_draws": 3}))
    assert drawn.curvature_rows_per_step == 3 * samp.curvature_rows_per_step
    assert drawn.storage["curvature rows"] == pytest.approx(3 * samp.storage["curvature rows"], rel=0.05)


def test_joint_layers_size_k_at_the_square_of_the_captured_width():
    """embed.joint_layers: one (Σ p)² K per segment instead of Σ p² (blocks included), and the
    plan says so."""
    per = estimate(small(**{"train.steps": 40}))
    joint = estimate(small(**{"train.steps": 40, "embed.joint_layers": True}))
    widths = [lay.p for lay in per.layers]
    assert len(widths) > 1
    ratio = sum(widths) ** 2 / sum(w * w for w in widths)
    assert joint.storage["K matrices"] == pytest.approx(ratio * per.storage["K matrices"])
    key = "segment actor: K, R and the chain"
    assert joint.memory[key] > per.memory[key]
    assert joint.time["embed"] > per.time["embed"]
    assert any("embed.joint_layers" in n and f"{sum(widths):,} x {sum(widths):,}" in n for n in joint.notes)
    assert not any("joint_layers" in n for n in per.notes)


def test_members_multiply_rows_and_keep_one_joint_k_per_member():
    """capture.members k: k times the captured width (rows, storage), and with joint layers k
    K's of one member's width, not one K of k times it; the label draws cost k times."""
    over = {"train.steps": 40, "embed.joint_layers": True, "embed.error_blocks": 1}
    one = estimate(small(**over))
    three = estimate(small(**over, **{"capture.members": 3}))
    assert three.total_dim == 3 * one.total_dim and len(three.layers) == 3 * len(one.layers)
    assert captured_count(three.layers) == f"{len(one.layers)} layers x 3 members"
    assert captured_count(one.layers) == f"{len(one.layers)} layers"
    assert three.storage["train gradients"] == pytest.approx(3 * one.storage["train gradients"], rel=0.05)
    assert three.storage["K matrices"] == pytest.approx(3 * one.storage["K matrices"])
    width = one.total_dim
    assert any(f"one K of {width:,} x {width:,} per member (3 members)" in n for n in three.notes)
    drawn = {k: estimate(small(**over, **{"capture.curvature": "sampled", "capture.members": k})) for k in (1, 3)}
    assert drawn[3].time["train"] > drawn[1].time["train"]
    assert drawn[3].curvature_rows_per_step == drawn[1].curvature_rows_per_step  # rows of each member's layers


def test_adamw_counts_update_rows():
    """AdamW stores an update row next to every raw row and an R next to every K."""
    sgd = estimate(small(**{"train.steps": 40}))
    adamw = estimate(small(**{"train.steps": 40, "train.optimizer": {"type": "adamw"}}))
    assert adamw.update_rows and not sgd.update_rows
    assert adamw.storage["update rows"] == sgd.storage["train gradients"] == adamw.storage["train gradients"]
    assert not sgd.storage["update rows"]
    assert adamw.storage["K matrices"] == 2 * sgd.storage["K matrices"]
    assert adamw.objects == 2 * sgd.objects
    for key in ("rank: capture + writer", "segment actor: K, R and the chain", "segment actor: read windows",
                "rank: model + optimizer (no activations)"):
        assert adamw.memory[key] > sgd.memory[key], key
    # R beside K, and the chain carries R_b beside S
    assert adamw.memory["segment actor: K, R and the chain"] == 2 * sgd.memory["segment actor: K, R and the chain"]
    assert "update row per sample (AdamW)" in format_plan(adamw)


def test_momentum_curvature_counts_c_d_and_the_carried_rows():
    """embed.momentum_curvature: C and D beside K and R (twice the matrices, kept and in every
    link), a carried row beside every local embedding; nothing on an SGD-shaped count."""
    adamw = {"train.steps": 40, "train.optimizer": {"type": "adamw"}}
    free = estimate(small(**adamw))
    full = estimate(small(**adamw, **{"embed.momentum_curvature": True}))
    assert full.storage["K matrices"] == 2 * free.storage["K matrices"]
    assert not free.storage["carried rows (embed.momentum_curvature)"]
    assert full.storage["carried rows (embed.momentum_curvature)"] == full.storage["local embeddings"]
    key = "segment actor: K, R and the chain"
    assert full.memory[key] == 2 * free.memory[key]
    assert full.memory["segment actor: one write chunk"] == 2 * free.memory["segment actor: one write chunk"]
    assert full.time["embed"] > free.time["embed"]


def test_adamw_sampled_curvature_counts_its_update_rows_and_factors():
    """Under AdamW the pseudo-gradients get update rows P ĝ (as many as the curvature rows), and
    their factors wait for the step's P on the rank."""
    adamw = {"train.steps": 40, "train.optimizer": {"type": "adamw"}}
    emp = estimate(small(**adamw))
    samp = estimate(small(**adamw, **{"capture.curvature": "sampled"}))
    sgd = estimate(small(**{"train.steps": 40, "capture.curvature": "sampled"}))
    assert samp.storage["curvature update rows"] == samp.storage["curvature rows"] > 0
    assert not sgd.storage["curvature update rows"] and not emp.storage["curvature update rows"]
    key = "rank: AdamW update-row factors (to the step's end)"
    assert samp.memory[key] > emp.memory[key]
    assert samp.objects == emp.objects + 2 * (sgd.objects - estimate(small(**{"train.steps": 40})).objects)


def test_v_response_counts_its_rows_and_q():
    """capture.v_response stores a response row next to every update row and a Q next to every
    K and R; the rank holds the captured layers' m and v whole."""
    adamw = estimate(small(**{"train.steps": 40, "train.optimizer": {"type": "adamw"}}))
    resp = estimate(small(**{"train.steps": 40, "train.optimizer": {"type": "adamw"}, "capture.v_response": True}))
    assert resp.response_rows and not adamw.response_rows
    assert resp.storage["v-response rows"] == adamw.storage["update rows"] > 0
    assert not adamw.storage["v-response rows"]
    assert resp.storage["K matrices"] == 1.5 * adamw.storage["K matrices"]
    assert resp.objects == 1.5 * adamw.objects
    assert resp.memory["segment actor: K, R and the chain"] == 1.5 * adamw.memory["segment actor: K, R and the chain"]
    assert resp.memory["rank: v's response (m, v gathered whole)"] > 0
    assert "rank: v's response (m, v gathered whole)" not in adamw.memory
    assert "v-response row per sample" in format_plan(resp)
    # ZeRO partitions m and v: the rank gathers the captured layers' whole m and v every step
    gathered = "v's response: m and v gathered"
    assert resp.traffic[gathered] == 2 * 4 * sum(lay.d_out * (lay.d_in + lay.has_bias) for lay in resp.layers)
    assert gathered not in adamw.traffic


FACTORS = "rank: AdamW update-row factors (to the step's end)"


@pytest.mark.parametrize("accum", [1, 2])
def test_adamw_capture_memory_and_traffic_are_what_the_capture_holds(accum):
    """The factors AdamW's update rows keep until the step's end are what a real capture holds
    after the rank's forwards and backwards of a step; the P statistics' all-reduce carries
    d_out + d_in_aug float64 numbers per layer; SGD and the lagged P keep no factors."""
    over = {"train.optimizer": {"type": "adamw"}, "train.grad_accum": accum, "train.micro_batch": 4}
    cfg = small(**over)
    plan = estimate(cfg)
    model = build_model(cfg.model, BYTE_VOCAB, cfg.data.seq_len, seed=0)
    cap = GradientCapture(model, projection=projection_spec(cfg), defer_updates=True)
    with cap:
        for _ in range(accum):
            ids = torch.randint(0, BYTE_VOCAB, (cfg.train.micro_batch, cfg.data.seq_len))
            model(input_ids=ids).logits.sum().backward()
    assert plan.memory[FACTORS] == cap.deferred_bytes() > 0
    numbers = sum(i.d_out + i.d_in_aug for i in cap.layer_info().values())
    assert plan.traffic["AdamW P statistics"] == 4 * numbers
    assert plan.traffic["gradient reduction"] == 4 * plan.n_params
    for other in (small(), small(**over, **{"capture.preconditioner": "lagged"})):
        assert FACTORS not in estimate(other).memory


def test_the_gpu_note_says_whether_adamw_capture_fits():
    cfg = load_config(os.path.join(ROOT, "jobs", "configs", "llama7b_1t.yaml"))
    notes = " ".join(estimate(cfg, tokens=1e12, vocab_size=32000, device_memory_gb=80).notes)
    assert "more than 80 GiB" in notes and "capture.preconditioner: lagged" in notes
    notes = " ".join(estimate(cfg, tokens=1e12, vocab_size=32000, device_memory_gb=141).notes)
    assert "fits 141 GiB" in notes


def test_tokens_nodes_and_memory_budget():
    cfg = load_config(DEFAULT, **{"data.train": "s3://b/train", "data.validation": "s3://b/val",
                                  "train.use_gpu": True, "train.ranks": 16, "train.optimizer.type": "sgd"})
    plan = estimate(cfg, tokens=1e7, actor_memory_gb=1)
    assert plan.n_samples == int(1e7 // 64)
    assert plan.nodes == 2 and plan.devices == 16 and plan.segments == 16  # 8 GPUs per node
    # a streaming segment actor's memory does not depend on its steps: it fits a budget or not
    need = plan.process_memory["segment actor"]
    assert need < 1 << 30 and any(n.startswith(f"segment actors need {human_bytes(need)} each") and
                                  n.endswith("fits 1 GiB") for n in plan.notes)
    tiny = estimate(cfg, tokens=1e7, actor_memory_gb=0.001)
    assert any("more than 0.001 GiB" in n for n in tiny.notes)
    with pytest.raises(Exception, match="--samples or --tokens"):
        estimate(cfg)
    assert parse_count("1T") == 1e12 and parse_count("2.5M") == 2.5e6 and parse_count("300") == 300


def test_node_memory_warns_for_every_term_and_process_above_it():
    """jobs/configs/gpu_cluster.yaml at 100 B tokens: every term above a node's memory is
    warned about; rank 0 holds no step records (it resumes from the index's object names), so
    ranks need the same whatever the steps; the streaming data path does not grow with the
    corpus on a rank, and only by an id and a slot per row on the driver."""
    cfg = load_config(os.path.join(ROOT, "jobs", "configs", "gpu_cluster.yaml"))
    plan = estimate(cfg, tokens=1e11, node_memory_gb=4)
    warned = [n for n in plan.notes if n.startswith("warning:")]
    over = {k for k, v in plan.memory.items() if v > 4 * 2 ** 30}
    assert over and all(any(n.startswith(f"warning: {k} needs") for n in warned) for k in over)
    assert not any(k.startswith("rank 0") for k in plan.memory) and "rank 0" not in plan.process_memory
    small = estimate(cfg, tokens=1e10, node_memory_gb=16)
    assert small.memory["rank: token rows of its steps"] == plan.memory["rank: token rows of its steps"] < 2 ** 26
    # the data stage: a read task holds one block whatever the corpus, the driver nothing per row
    assert plan.n_samples >= 10 * small.n_samples
    assert plan.memory["data task: one block"] == small.memory["data task: one block"] < 2 ** 26
    assert not any(k.startswith("driver") and "data" in k for k in plan.memory)
    assert plan.data_stage["read tasks"] >= 9 * small.data_stage["read tasks"]
    assert plan.data_stage["bytes read"] == plan.n_samples * cfg.data.seq_len * 4
    assert small.process_memory["segment actor"] < 8 * 2 ** 30
    assert not any(n.startswith("warning: segment actor") for n in small.notes)  # each one fits
    assert plan.process_memory["rank"] == small.process_memory["rank"]
    # the node's share: 8 ranks of a node together, each under the node's memory alone
    roomy = estimate(cfg, tokens=1e8, node_memory_gb=6)
    per_rank = roomy.process_memory["rank"]
    assert 6 * 2 ** 30 / 8 < per_rank < 6 * 2 ** 30
    assert any(n.startswith("warning: 8 ranks per node need") for n in roomy.notes)
    assert not [n for n in estimate(cfg, tokens=1e8).notes if n.startswith("warning:")]  # no node given: silent
    assert "segment actor, validation shard" in format_plan(plan)


def test_throughput_defaults_follow_the_config():
    assert Throughput.for_config(small()) == Throughput.cpu(s3=False)
    gpu = small(**{"train.use_gpu": True, "store.uri": "s3://bucket/runs"})
    assert Throughput.for_config(gpu) == Throughput.h100(s3=True)
    assert Throughput.h100().capture_overhead == pytest.approx(0.155)


def test_plan_main_prints_text_and_json(capsys):
    assert plan_main([DEFAULT, "--segments", "3", "--per-source"]) == 0
    out = capsys.readouterr().out
    assert "192 steps" in out and "3 segment actors" in out and "per-source" in out
    assert plan_main([DEFAULT, "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["steps"] == 192 and d["total_dim"] == 9 * 16 * 16
    assert format_plan(estimate(small())).count("\n") > 20


def test_plan_main_reports_config_errors(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("trian: {}\n")
    assert plan_main([str(bad)]) == 2
    assert "did you mean" in capsys.readouterr().err


def test_docs_scale_shows_what_plan_prints(capsys):
    """docs/scale.md quotes `rayattr plan` verbatim: rerun each command and compare."""
    import shlex

    text = open(os.path.join(ROOT, "docs", "scale.md")).read()
    blocks = re.findall(r"```\n\$ rayattr plan (.*?)\n(.*?)\n```", text, re.S)
    assert len(blocks) >= 3
    for args, shown in blocks:
        argv = [os.path.join(ROOT, a) if a.endswith(".yaml") else a for a in shlex.split(args)]
        assert plan_main(argv) == 0
        assert capsys.readouterr().out.rstrip("\n") == shown, f"docs/scale.md is stale for: rayattr plan {args}"


def test_docs_scale_prose_quotes_the_plan():
    """The numbers docs/scale.md's text quotes (rounded) are the plan's, not hand-typed."""
    from rayattr.report.units import human_bytes

    text = " ".join(open(os.path.join(ROOT, "docs", "scale.md")).read().split())
    cfg = load_config(os.path.join(ROOT, "jobs", "configs", "llama7b_1t.yaml"))
    p = estimate(cfg, tokens=1e12, vocab_size=32000, per_source=True)
    per_sample = estimate(cfg, tokens=1e12, vocab_size=32000, per_source=False)
    full_grad = p.n_params * 2  # bf16 gradient of every parameter
    steps_per_segment = p.steps // p.segments

    def tb(x):
        return f"{x / 1e12:.1f} TB"

    quoted = [
        f"P = {len(p.layers)} × {p.layers[0].p} = {p.total_dim:,} numbers".replace(",", " "),
        f"{p.grad_bytes_per_sample / 1e3:.1f} kB in bfloat16",
        f"{full_grad / 1e9:.1f} GB for its full bf16 gradient",
        f"a reduction of {round(full_grad / p.grad_bytes_per_sample, -4):,.0f}×".replace(",", " "),
        f"Over {p.n_samples / 1e6:.0f} M samples that is {tb(p.storage['train gradients'])} of training gradients",
        f"(float32, {tb(p.storage['local embeddings'])})",
        f"another {tb(per_sample.storage['final embeddings'])}, {tb(per_sample.storage_total)} in all",
        f"sums, {human_bytes(p.storage['source x phase sums'])}",
        f"{p.layers[0].p} × {p.layers[0].p} per layer: {human_bytes(p.storage['K matrices'])}",
        f"{p.throughput.capture_overhead * 100:.1f} % used",
        f"{human_bytes(p.memory['rank: capture + writer'])} of buffers per rank",
        f"{p.throughput.store_write_mbps} MB/s per writer",
        f"{p.time['train'] / 86400:.1f} days at the assumed",
        f"With one segment per GPU ({p.segments})",
        f"{human_bytes(p.process_memory['segment actor'])} whatever its steps ({steps_per_segment} here)",
        f"index ({human_bytes(p.memory['driver: index compaction'])})",
        f"its own rows of one token file ({human_bytes(p.memory['rank: token rows of its steps'])})",
        "Rank 0 resumes from the last committed step record without reading any",
        f"per-sample gradients ({human_bytes(p.memory[VALIDATION_PHASE + ': model and gradients'])} "
        "with 1 % of the corpus held out",
        f"total: {human_bytes(p.memory['report: per-sample totals (distinct samples)'])} for {p.n_samples / 1e6:.0f} M samples",
        f"{p.ranks} rank actors, one GPU each",
        f"checkpoints every {cfg.train.checkpoint_every} steps",
        f"{p.segments} × {len(p.layers)} matrix-vector products",
        f"({human_bytes(p.memory['driver: reduce'])} of memory for {p.occurrences / 1e6:.0f} M occurrence rows)",
        f"{human_bytes(p.memory[FACTORS])} for 4 × 4096 tokens",
        f"carries {human_bytes(p.traffic['AdamW P statistics'])} per step, "
        f"{100 * p.traffic['AdamW P statistics'] / p.traffic['gradient reduction']:.2f} % of the "
        f"{human_bytes(p.traffic['gradient reduction'])} of gradients",
    ]
    for q in quoted:
        assert q in text, f"docs/scale.md does not say {q!r}"
    # embedding and reduce take about half an hour each
    assert 20 * 60 < p.time["embed"] < 40 * 60 and 20 * 60 < p.time["reduce"] < 40 * 60
    assert "embedding and reduce stages take about half an hour each" in text


def test_kept_training_states_and_the_exact_replay_are_counted():
    """train.states_every stores weights, m and v (float32) at every kept step; `rayattr exact`
    holds θ, m and v (float64) at ⌈√T⌉ checkpoints in one process."""
    from rayattr.exact.limits import checkpoint_bytes, default_every, segment_graph_bytes

    d = load_config(None).to_dict(redact=False)
    sizes = {}
    for every in (0, 4, 8):
        d["train"]["states_every"] = every
        plan = estimate(Config.from_dict(d).validate())
        sizes[every] = plan.storage["training states (train.states_every)"]
    assert sizes[0] == 0
    assert sizes[4] == (plan.steps - 1) // 4 * 3 * 4 * plan.n_params
    assert sizes[8] == (plan.steps - 1) // 8 * 3 * 4 * plan.n_params
    assert plan.memory["exact (optional): state checkpoints (grow as √steps)"] == \
        checkpoint_bytes(plan.n_params, plan.steps, default_every(plan.steps), adamw=True)
    # and one segment's float64 graph: every step of it keeps its tokens' activations
    graph = "exact (optional): one segment's graph (√steps × global batch)"
    m = load_config(None).model
    assert plan.memory[graph] == segment_graph_bytes(
        plan.global_batch * plan.seq_len, default_every(plan.steps), m.n_layer, m.n_embd, m.n_head, plan.seq_len,
        plan.vocab_size)
    d["train"]["grad_accum"] = 2  # twice the global batch, half the steps
    wider = estimate(Config.from_dict(d).validate())
    assert wider.memory[graph] / plan.memory[graph] == pytest.approx(
        2 * default_every(wider.steps) / default_every(plan.steps), rel=1e-6)
