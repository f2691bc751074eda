"""train.optimizer and DeepSpeed's optimizer block: the same AdamW either way, and what is refused."""

from __future__ import annotations

import pytest
import torch

from rayattr.config import Config, ConfigError
from rayattr.optim.spec import OptimizerSpec, check_param_groups, resolve_optimizer
from rayattr.train.backend import deepspeed_config


def cfg_of(train: dict, capture: dict | None = None) -> Config:
    return Config.from_dict({"train": train, "capture": capture or {}})


def test_adamw_with_warmup_cosine_and_clipping_is_the_default():
    cfg = Config().validate()
    assert resolve_optimizer(cfg) == OptimizerSpec("adamw", 0.002, 0.9, 0.95, 1e-8, 0.1)
    ds = deepspeed_config(cfg, num_steps=192)
    assert ds["gradient_clipping"] == 1.0 and ds["scheduler"]["type"] == "WarmupCosineLR"
    assert ds["scheduler"]["params"]["total_num_steps"] == 192 and ds["scheduler"]["params"]["warmup_num_steps"] == 19
    assert Config().train.deepspeed["scheduler"]["params"]["total_num_steps"] == "auto"  # not filled in place
    with pytest.raises(ConfigError, match="'auto' needs the run's number of steps"):
        deepspeed_config(cfg)
    odd = cfg_of({"deepspeed": {"scheduler": {"type": "WarmupLR", "params": {"warmup_max_lr": "auto"}}}})
    with pytest.raises(ConfigError, match="scheduler.params.warmup_max_lr"):
        deepspeed_config(odd, num_steps=10)
    sgd = cfg_of({"lr": 0.1, "optimizer": {"type": "sgd"}}).validate()
    assert resolve_optimizer(sgd) == OptimizerSpec("sgd", 0.1)


def test_own_block_and_deepspeed_block_mean_the_same():
    own = cfg_of({"lr": 1e-3, "optimizer": {"type": "adamw", "betas": [0.9, 0.95], "eps": 1e-6,
                                            "weight_decay": 0.1}}).validate()
    for ds_type in ("AdamW", "Adam"):
        ds = cfg_of({"deepspeed": {"optimizer": {"type": ds_type, "params": {
            "lr": 1e-3, "betas": [0.9, 0.95], "eps": 1e-6, "weight_decay": 0.1}}}}).validate()
        a, b = resolve_optimizer(own), resolve_optimizer(ds)
        assert a.adamw and b.adamw and b.from_deepspeed
        assert (a.lr, a.beta1, a.beta2, a.eps, a.weight_decay) == (b.lr, b.beta1, b.beta2, b.eps, b.weight_decay)
        # the rank builds torch's AdamW for both: DeepSpeed's block is not passed on
        assert "optimizer" not in deepspeed_config(ds, 10) and "optimizer" not in deepspeed_config(own, 10)


def test_deepspeed_sgd_block_still_passes_through():
    cfg = cfg_of({"deepspeed": {"optimizer": {"type": "SGD", "params": {"lr": 0.05}}}}).validate()
    assert resolve_optimizer(cfg) == OptimizerSpec("sgd", 0.05, from_deepspeed=True)
    assert deepspeed_config(cfg)["optimizer"]["type"] == "SGD"


@pytest.mark.parametrize("train, capture, key", [
    ({"deepspeed": {"optimizer": {"type": "SGD", "params": {"lr": 0.1, "momentum": 0.9}}}}, {},
     "train.deepspeed.optimizer.params.momentum"),
    ({"deepspeed": {"optimizer": {"type": "SGD", "params": {"lr": 0.1, "nesterov": True}}}}, {},
     "train.deepspeed.optimizer.params.nesterov"),
    ({"deepspeed": {"optimizer": {"type": "Lamb", "params": {"lr": 0.1}}}}, {}, "train.deepspeed.optimizer.type"),
    ({"deepspeed": {"optimizer": {"type": "Adam", "params": {"weight_decay": 0.1, "adam_w_mode": False}}}}, {},
     "train.deepspeed.optimizer.params.adam_w_mode"),
    ({"deepspeed": {"optimizer": {"type": "AdamW", "params": {"amsgrad": True}}}}, {},
     "train.deepspeed.optimizer.params.amsgrad"),
    ({"optimizer": {"type": "lion"}}, {}, "train.optimizer.type"),
    ({"optimizer": {"type": "adamw", "betas": [0.9, 1.0]}}, {}, "train.optimizer.betas"),
    ({"optimizer": {"type": "adamw", "eps": 0}}, {}, "train.optimizer.eps"),
    # (a train.optimizer equal to the built-in default cannot be told from none given)
    ({"optimizer": {"type": "adamw", "betas": [0.9, 0.999]}, "deepspeed": {"optimizer": {"type": "AdamW"}}}, {},
     "train.optimizer and"),
    ({"optimizer": {"type": "adamw"}}, {"precondition_every": 2}, "capture.preconditioner: lagged"),
    ({"optimizer": {"type": "adamw"}}, {"preconditioner": "soon"}, "capture.preconditioner must be"),
    ({"optimizer": {"type": "sgd"}}, {"v_response": True}, "it needs an AdamW run"),
    ({"optimizer": {"type": "adamw"}}, {"v_response": True, "preconditioner": "lagged"},
     "capture.v_response needs capture.preconditioner: lookahead"),
    ({"optimizer": {"type": "adamw"}, "checkpoint_every": 3}, {"preconditioner": "lagged", "precondition_every": 2},
     "train.checkpoint_every=3 must be a multiple of capture.precondition_every"),
])
def test_refusals_name_the_key(train, capture, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        resolve_optimizer(cfg_of(train, capture).validate())


@pytest.mark.parametrize("train, capture, key", [
    ({"optimizer": {"type": "sgd"}}, {}, "embed.momentum_curvature: K's curvature through Adam's momentum"),
    ({"optimizer": {"type": "adamw"}}, {"v_response": True}, "does not go with capture.v_response"),
])
def test_momentum_curvature_refusals(train, capture, key):
    cfg = Config.from_dict({"train": train, "capture": capture, "embed": {"momentum_curvature": True}})
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        resolve_optimizer(cfg.validate())
    resolve_optimizer(Config.from_dict({"embed": {"momentum_curvature": True}}).validate())  # the default AdamW


def test_per_group_lr_or_decay_within_a_layer_is_refused():
    layer = torch.nn.Linear(3, 2)
    same = torch.optim.AdamW([{"params": [layer.weight]}, {"params": [layer.bias]}], lr=1e-3)
    check_param_groups(same, {"fc": layer})  # two groups, equal settings: fine
    for key, value in (("lr", 1e-2), ("weight_decay", 0.0)):
        opt = torch.optim.AdamW([{"params": [layer.weight]}, {"params": [layer.bias], key: value}],
                                lr=1e-3, weight_decay=0.1)
        with pytest.raises(ConfigError, match=f"layer 'fc' different {key}"):
            check_param_groups(opt, {"fc": layer})


def test_step_records_keep_the_adamw_settings(tmp_path):
    from rayattr.store import Run, StepRecord

    run = Run.create(str(tmp_path), "r", {})
    adam = StepRecord(1, 0, 1e-3, 1e-4, [3], ["a"], [0], clip=0.5, optimizer="adamw", weight_decay=0.1,
                      beta1=0.9, beta2=0.95, eps=1e-8, adam_step=2, precondition_step=1)
    run.write_step_records([StepRecord(0, 0, 0.1, 0.05, [1], ["a"], [0]), adam])
    sgd, back = run.step_records()
    assert back == adam and back.decay == pytest.approx(1 - 1e-3 * 0.1)
    assert (sgd.optimizer, sgd.adam_step, sgd.decay, sgd.loss) == ("sgd", None, 1.0, None)
