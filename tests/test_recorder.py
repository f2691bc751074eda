"""rayattr.Recorder in one process around a plain torch model and optimizer: its rows against
one-sample-at-a-time capture, its step records against the step's own numbers, resumption and
the errors it names. (The built-in job trains through the same class: tests/test_pipeline.py,
tests/test_faults.py.)"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import rayattr
from rayattr.pipeline.attribution import open_recorded
from rayattr.capture import GradientCapture
from rayattr.config import Config, ConfigError
from rayattr.data import TokenizedDataset, load_tokenizer
from rayattr.query.runs import RunNotFinished, require_finished
from rayattr.record import Recorder, projection_spec
from rayattr.store import GradientReader, Run
from rayattr.model.loss import micro_batch_loss
from rayattr.model.build import build_model
from rayattr.model.loss import SAMPLE_LOSS_REDUCTION, logits_of
from rayattr.capture import per_sample_loss

LR, CLIP, B = 0.5, 0.05, 4


def small_config(store: str) -> Config:
    return Config.from_dict({
        "run_id": "rec", "store": {"uri": store, "steps_per_shard": 2},
        "model": {"n_layer": 1, "n_embd": 16, "n_head": 2},
        "data": {"seq_len": 16, "builtin": {"n_train": 32, "n_validation": 8, "max_chars": 64}},
        "train": {"ranks": 1, "micro_batch": B, "lr": LR, "optimizer": {"type": "sgd"}}, "capture": {"rank": 2},
    }).validate()


@pytest.fixture
def setup(tmp_path):
    cfg = small_config(str(tmp_path))
    run = rayattr.new_run(cfg)
    tok = load_tokenizer(cfg.data.tokenizer)
    data = TokenizedDataset(run.read_table("data/train.parquet"), tok, cfg.data.seq_len)
    model = build_model(cfg.model, tok.vocab_size, cfg.data.seq_len, seed=0).double()
    return cfg, run, data, model


def one_sample_rows(model, data, cfg, idx) -> dict[str, torch.Tensor]:
    """Each sample's projected gradient of its own loss, one forward/backward per sample."""
    cap = GradientCapture(model, projection=projection_spec(cfg), layers=cfg.capture.layers)
    params = [p for p in model.parameters() if p.requires_grad]
    out: dict[str, list] = {}
    for i in idx:
        b = data.batch([i])
        with cap:
            cap.set_mask(b["attention_mask"])
            logits = logits_of(model, b["input_ids"], b["attention_mask"])
            loss = per_sample_loss(logits[:, :-1], b["labels"][:, 1:], reduction=SAMPLE_LOSS_REDUCTION).sum()
            torch.autograd.grad(loss, params, allow_unused=True)
        for n, g in cap.gradients().items():
            out.setdefault(n, []).append(g)
    return {n: torch.cat(v) for n, v in out.items()}


def grad_norm(model) -> float:
    return math.sqrt(sum(float(p.grad.double().pow(2).sum()) for p in model.parameters() if p.grad is not None))


def test_rows_and_step_records(setup):
    cfg, run, data, model = setup
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    rec = Recorder(model, run, cfg, optimizer=opt)
    steps = [np.arange(0, B), np.arange(B, 2 * B) + 3]
    want_rows, norms, losses = [], [], []
    for step, idx in enumerate(steps):
        want_rows.append(one_sample_rows(model, data, cfg, idx))  # at the step's weights
        b = data.batch(idx)
        ids = b["ids"].tolist()
        # step 0 gives the ids up front, step 1 only inside the block (as the HF callback does)
        with rec.step(ids if step == 0 else None, step=step, epoch=0):
            if step == 1:
                rec.add_samples(ids)
            loss = micro_batch_loss(model, b["input_ids"], b["attention_mask"], b["labels"])
            losses.append(rec.add_loss(loss))
            loss.backward()
            norms.append(grad_norm(model))
            rec.training.clip_gradients(CLIP)
            opt.step()
            opt.zero_grad()
    rec.finish()

    records = run.step_records()
    assert [r.step for r in records] == [0, 1]
    table = run.read_table("data/train.parquet").to_pydict()
    source_of = dict(zip(table["id"], table["source"]))
    for r, idx, norm, loss in zip(records, steps, norms, losses):
        ids = [int(data.ids[i]) for i in idx]
        assert r.sample_ids == ids and r.sources == [source_of[i] for i in ids] and r.ranks == [0] * B
        kappa = min(1.0, CLIP / (norm + 1e-6))
        assert kappa < 1.0  # the test clips: κ is exercised
        assert r.clip == pytest.approx(kappa, rel=1e-9)
        assert r.eta == pytest.approx(kappa * LR / B, rel=1e-9)
        assert r.lr == LR and r.loss == pytest.approx(loss)
    got = GradientReader(run, kind="train").read_steps(0, None, dtype=torch.float64)
    assert [g.step for g in got] == [0, 1]
    for g, want in zip(got, want_rows):
        assert g.sample_ids.tolist() == [int(data.ids[i]) for i in steps[g.step]]
        for n in want:  # stored as float32
            torch.testing.assert_close(g.grads[n], want[n], rtol=2e-5, atol=1e-7)

    m = run.reload_manifest()
    assert (m["status"], m["num_steps"], m["global_batch"]) == ("recorded", 2, B)
    assert m["layer_dims"] == rec.layer_dims() and run.exists("weights/final.safetensors")
    with pytest.raises(RunNotFinished, match="rayattr attribute"):
        require_finished(run)
    assert open_recorded(run) is run


def test_resumed_recorder_writes_no_step_twice(setup):
    cfg, run, data, model = setup
    opt = torch.optim.SGD(model.parameters(), lr=LR)

    def record(rec, steps):
        record_steps(rec, model, opt, data, steps)

    first = Recorder(model, run, cfg, optimizer=opt)
    record(first, range(3))
    first.flush()
    first.close()
    again = Recorder(model, run, cfg, optimizer=opt)
    assert again.stored_through == {"train": 2, "curvature": -1, "update": -1, "v_response": -1,
                                    "curvature_update": -1, "records": 2}
    record(again, range(5))  # steps 0-2 again (a restart from step 0), then two new ones
    again.finish()
    assert [r.step for r in run.step_records()] == [0, 1, 2, 3, 4]
    assert [b.step for b in GradientReader(run, kind="train").read_steps(0, None)] == [0, 1, 2, 3, 4]


def test_bad_input_is_named(setup):
    cfg, run, data, model = setup
    with pytest.raises(ConfigError, match="adamw"):
        Recorder(model, run, cfg.with_overrides(**{"train.optimizer.type": "adamw"}),
                 optimizer=torch.optim.SGD(model.parameters(), lr=LR))
    with pytest.raises(ConfigError, match="momentum"):
        Recorder(model, run, cfg, optimizer=torch.optim.SGD(model.parameters(), lr=LR, momentum=0.9))
    with pytest.raises(ValueError, match="optimizer="):
        Recorder(model, run, cfg)
    rec = Recorder(model, run, cfg, optimizer=torch.optim.SGD(model.parameters(), lr=LR))
    b = data.batch(np.arange(B))
    with pytest.raises(ValueError, match=f"{B - 1} sample ids but {B} captured rows"):
        with rec.step(b["ids"].tolist()[:-1]):
            micro_batch_loss(model, b["input_ids"], b["attention_mask"], b["labels"]).backward()
    with pytest.raises(ValueError, match="not in the run's data/train.parquet"):
        with rec.step([10**9]):
            pass
    rec.close()
    with pytest.raises(ConfigError, match="weights/final.safetensors"):
        open_recorded(Run.open_uri(run.uri, mode="record"))


@pytest.mark.parametrize("preconditioner", ["lookahead", "lagged"])
def test_adamw_pseudo_gradients_get_the_update_rows_of_the_steps_own_p(tmp_path, monkeypatch, preconditioner):
    """capture.curvature "sampled" under AdamW: each pseudo-gradient row ĝ gets its update row
    P ĝ with the P the step's own update rows use. With the sampled pseudo-loss swapped for the
    true per-sample loss, the pseudo-gradients are the batch's own rows, so their update rows
    must be the batch's update rows, step by step: the step's P (lookahead: v_t after the step;
    lagged: the refresh's), formed at the step's end over two sample_curvature calls a step."""
    import rayattr.record.recorder as recorder_module

    d = small_config(str(tmp_path)).to_dict(redact=False)
    d["train"]["optimizer"] = {"type": "adamw", "betas": [0.9, 0.99], "weight_decay": 0.1}
    d["train"]["lr"] = 0.05
    d["capture"].update(curvature="sampled", curvature_fraction=1.0, preconditioner=preconditioner,
                        precondition_every=1 if preconditioner == "lookahead" else 2)
    cfg = Config.from_dict(d).validate()
    run = rayattr.new_run(cfg)
    tok = load_tokenizer(cfg.data.tokenizer)
    data = TokenizedDataset(run.read_table("data/train.parquet"), tok, cfg.data.seq_len)
    model = build_model(cfg.model, tok.vocab_size, cfg.data.seq_len, seed=0).double()
    opt = torch.optim.AdamW(model.parameters(), lr=0.05, betas=(0.9, 0.99), weight_decay=0.1)
    rec = Recorder(model, run, cfg, optimizer=opt)
    labels = {}

    def true_losses(logits, generator, mask, reduction):  # the pseudo-loss with the real labels
        return per_sample_loss(logits, labels["now"][:, 1:], reduction=reduction)

    monkeypatch.setattr(recorder_module, "sampled_label_losses", true_losses)
    steps = 4
    for step in range(steps):
        b = data.batch(np.arange(step * B, (step + 1) * B))
        for half in (slice(0, B // 2), slice(B // 2, B)):  # two calls a step, as two micro-batches make
            labels["now"] = b["labels"][half]
            rec.sample_curvature(b["input_ids"][half], b["attention_mask"][half], seed=step)
        with rec.step(b["ids"].tolist(), step=step):
            loss = micro_batch_loss(model, b["input_ids"], b["attention_mask"], b["labels"])
            rec.add_loss(loss)
            loss.backward()
            rec.training.clip_gradients(CLIP)
            opt.step()
            opt.zero_grad()
    rec.finish()
    read = {k: GradientReader(run, kind=k).read_steps(0, None, dtype=torch.float64)
            for k in ("train", "update", "curvature", "curvature_update")}
    assert [len(v) for v in read.values()] == [steps] * 4
    for t in range(steps):
        train, update, curv, curv_update = (read[k][t] for k in read)
        assert curv.sample_ids.tolist() == [-1] * B
        for n in train.grads:  # stored as float32
            torch.testing.assert_close(curv.grads[n], train.grads[n], rtol=1e-4, atol=1e-6)
            torch.testing.assert_close(curv_update.grads[n], update.grads[n], rtol=1e-4, atol=1e-6)
    n = next(iter(read["train"][0].grads))
    assert not torch.allclose(read["update"][3].grads[n], read["train"][3].grads[n], rtol=1e-2)  # P ≠ I there


def record_steps(rec, model, opt, data, steps):
    """Train and record `steps` of B samples each, one micro-batch a step (shared with
    tests/test_end_of_recording.py)."""
    for step in steps:
        b = data.batch(np.arange(step * B, (step + 1) * B))
        with rec.step(b["ids"].tolist(), step=step):
            micro_batch_loss(model, b["input_ids"], b["attention_mask"], b["labels"]).backward()
            opt.step()
            opt.zero_grad()


def test_members_draw_labels_of_their_own(setup):
    """capture.members with sampled curvature: member j's pseudo-gradients come from its own
    capture.curvature_draws draws, taken after member j−1's from the step's generator, so the
    members' curvature estimates are independent (member 0's are the one-member run's)."""
    cfg, run, data, model = setup
    d = cfg.to_dict(redact=False)
    d["capture"].update(curvature="sampled", curvature_fraction=1.0, curvature_draws=2, members=2)
    d["embed"]["error_blocks"] = 1  # the members' spread is the standard error
    cfg = Config.from_dict(d).validate()
    rec = Recorder(model, run, cfg, optimizer=torch.optim.SGD(model.parameters(), lr=LR))
    b = data.batch(np.arange(B))
    rec.sample_curvature(b["input_ids"], b["attention_mask"], seed=5)
    stored = rec.curvature.gradients()

    def draws(member: int, skip: int) -> dict[str, torch.Tensor]:
        """Member `member`'s rows of the draws after the first `skip` of the generator."""
        cap = GradientCapture(model, projection=projection_spec(cfg), layers=cfg.capture.layers)
        gen = torch.Generator().manual_seed(5)
        params = [p for p in model.parameters() if p.requires_grad]
        with cap, cap.only(member):
            cap.set_mask(b["attention_mask"])
            for i in range(skip + 2):
                logits = logits_of(model, b["input_ids"], b["attention_mask"])[:, :-1]
                losses = rayattr.capture.sampled_label_losses(logits.float(), generator=gen,
                                                              mask=b["attention_mask"][:, 1:],
                                                              reduction=SAMPLE_LOSS_REDUCTION)
                if i < skip:
                    continue
                torch.autograd.grad(losses.sum(), params, allow_unused=True)
        return {n: g for n, g in cap.gradients().items() if g.shape[0]}

    own = {**draws(0, 0), **draws(1, 2)}
    assert sorted(own) == sorted(stored) and len(stored) == 2 * len(rec.capture.module_names())
    for n, g in own.items():
        assert g.shape[0] == 2 * B
        torch.testing.assert_close(stored[n], g, rtol=1e-10, atol=1e-12)
    shared = draws(1, 0)  # member 1 on member 0's draws: not what it stored
    assert any(not torch.allclose(stored[n], g) for n, g in shared.items())
