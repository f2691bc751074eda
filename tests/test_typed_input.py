"""Typed, validated input, refused by name before anything starts: --storage-option values
typed, a projection rank the error blocks do not divide, ZeRO stage 3 (in the config, and a
real ZeRO-3 engine given to the Recorder), a malformed DeepSpeed config, a model factory that
does not load and model.extra keys the model config does not know."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from rayattr import cli
from rayattr.config import Config, ConfigError
from rayattr.model.build import check_model


def test_storage_option_values_are_typed():
    got = cli._storage_options(["anon=false", "use_ssl=True", "max_concurrency=8", "timeout=2.5",
                                "endpoint_url=http://127.0.0.1:8333", "token=null",
                                'config_kwargs={"retries": {"max_attempts": 3}}', "region=us-east-1"])
    assert got == {"anon": False, "use_ssl": True, "max_concurrency": 8, "timeout": 2.5,
                   "endpoint_url": "http://127.0.0.1:8333", "token": None,
                   "config_kwargs": {"retries": {"max_attempts": 3}}, "region": "us-east-1"}
    assert got["anon"] is False and type(got["max_concurrency"]) is int


def test_a_bad_storage_option_is_a_user_error(capsys):
    assert cli.main(["show", "r", "--storage-option", "config_kwargs={oops"]) == 2
    assert "config_kwargs" in capsys.readouterr().err


def config(**kw) -> Config:
    return Config.from_dict(kw)


def test_error_blocks_must_divide_the_rank():
    with pytest.raises(ConfigError, match=r"capture.rank 15 is not divisible by embed.error_blocks 2"):
        config(capture={"rank": 15}).validate()
    config(capture={"rank": 15}, embed={"error_blocks": 1}).validate()  # no standard errors asked for
    config(capture={"rank": 15}, embed={"error_blocks": 3}).validate()


def test_a_mixed_projection_needs_no_error_blocks():
    with pytest.raises(ConfigError, match=r"capture.mix 64 with embed.error_blocks 2: .*embed.error_blocks: 1"):
        config(capture={"mix": 64}).validate()
    cfg = config(capture={"mix": 64}, embed={"error_blocks": 1}).validate()
    from rayattr.record import projection_spec

    assert projection_spec(cfg).dim == 64
    with pytest.raises(ConfigError, match="capture.mix must be >= 1"):
        config(capture={"mix": 0}, embed={"error_blocks": 1}).validate()


def test_zero_stage_3_is_refused_by_name():
    with pytest.raises(ConfigError, match=r"stage 3 \(ZeRO-3\) is not supported"):
        config(train={"deepspeed": {"zero_optimization": {"stage": 3}}}).validate()
    for stage in (0, 1, 2):
        config(train={"deepspeed": {"zero_optimization": {"stage": stage}}}).validate()


# A real ZeRO-3 DeepSpeed engine on one gloo rank (CPU) handed to the Recorder, which must
# refuse it before it writes anything; exit 3 with the message when it does.
ZERO3 = textwrap.dedent("""
    import sys, deepspeed, torch, rayattr
    from rayattr.errors import UsageError
    deepspeed.init_distributed(dist_backend="gloo")
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Linear(8, 2))
    engine, *_ = deepspeed.initialize(
        model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        config={"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1,
                "zero_optimization": {"stage": 3}, "zero_allow_untested_optimizer": True,
                "steps_per_print": 10**9})
    assert engine.zero_optimization_stage() == 3
    try:
        rayattr.Recorder(engine, sys.argv[1])
    except UsageError as err:
        print("refused:", err)
        sys.exit(3)
""")


@pytest.mark.slow  # starts a process group and a DeepSpeed engine
def test_a_zero_stage_3_engine_is_refused_by_the_recorder(tmp_path):
    from rayattr.store import Run

    run = Run.create(str(tmp_path), "z3", {})
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent), "OMP_NUM_THREADS": "1",
           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1"}
    out = subprocess.run([sys.executable, "-c", ZERO3, run.uri], env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 3, out.stdout[-3000:] + out.stderr[-3000:]
    assert "refused: a DeepSpeed engine with ZeRO stage 3 is not supported" in out.stdout
    assert sorted(os.listdir(tmp_path / "z3")) == ["run.json"]  # nothing recorded


@pytest.mark.parametrize("ds, what", [
    ({"zero_optimization": {"stage": "one"}}, "whole number"),
    ({"zero_optimization": 2}, "must be a mapping"),
    ({"gradient_clipping": "1.0"}, "gradient_clipping"),
    ({"bf16": True}, "bf16 must be a mapping"),
])
def test_a_malformed_deepspeed_config_is_refused(ds, what):
    with pytest.raises(ConfigError, match=what):
        config(train={"deepspeed": ds}).validate()


def test_model_factory_and_extra_are_checked_in_the_driver():
    with pytest.raises(ConfigError, match="module:function"):
        config(model={"factory": "no_colon"}).validate()
    with pytest.raises(ConfigError, match="cannot be loaded"):
        check_model(config(model={"factory": "no_such_module_for_rayattr:make"}).model)
    with pytest.raises(ConfigError, match="not a function"):
        check_model(config(model={"factory": "rayattr:__version__"}).model)
    with pytest.raises(ConfigError, match=r"\['n_embed_typo'\] are not GPT2Config keys"):
        check_model(config(model={"extra": {"n_embed_typo": 3}}).model)
    check_model(config(model={"family": "llama", "extra": {"intermediate_size": 64, "rope_theta": 1e5}}).model)


def test_new_run_refuses_a_factory_that_does_not_load_before_creating_anything(tmp_path):
    import rayattr

    cfg = config(store={"uri": str(tmp_path / "store")}, run_id="r",
                 model={"factory": "no_such_module_for_rayattr:make"})
    with pytest.raises(ConfigError, match="cannot be loaded"):
        rayattr.new_run(cfg)
    assert not (tmp_path / "store" / "r").exists()
