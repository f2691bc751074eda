"""The one typed config: YAML round trip, overrides, validation, redaction, differences."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from rayattr.config import Config, ConfigError, load_config

DEFAULT = Path(__file__).resolve().parent.parent / "jobs" / "configs" / "default.yaml"


def test_default_yaml_is_the_builtin_default():
    assert load_config(DEFAULT).to_dict() == Config().validate().to_dict()


def test_overrides_and_yaml(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"train": {"lr": 0.1}, "capture": {"rank": 32}}))
    cfg = load_config(path, **{"train.ranks": 4, "embed.segments": None, "store.uri": "s3://b/p"})
    assert (cfg.train.lr, cfg.capture.rank, cfg.train.ranks, cfg.store.uri) == (0.1, 32, 4, "s3://b/p")
    assert cfg.embed.segments is None  # None overrides are ignored
    assert cfg.global_batch == 8 * 4
    assert Config.from_dict(cfg.to_dict()).to_dict() == cfg.to_dict()  # replayable from the manifest


def test_storage_options_never_reach_the_recorded_config():
    cfg = Config.from_dict({"store": {"storage_options": {"secret": "s3cr3t-value"}}})
    assert "storage_options" not in cfg.to_dict()["store"]
    assert cfg.to_dict(redact=False)["store"]["storage_options"] == {"secret": "s3cr3t-value"}


def test_differences_name_dotted_keys():
    a, b = Config(), load_config(None, **{"train.lr": 0.2, "run_id": "x"})
    assert a.differences(b) == ["run_id: None != 'x'", f"train.lr: {Config().train.lr!r} != 0.2"]
    assert a.differences(b, ignore=("run_id",)) == [f"train.lr: {Config().train.lr!r} != 0.2"]
    c = load_config(None, **{"train.deepspeed": {"zero_optimization": {"stage": 2}}})
    assert [d.split(":")[0] for d in a.differences(c)] == ["train.deepspeed"]  # pass-through dict: one key


@pytest.mark.parametrize("dotted, message", [
    ({"train.steps": 0}, "train.steps"),
    ({"train.placement": "RANDOM"}, "train.placement"),
    ({"train.max_restarts": -1}, "max_restarts"),
    ({"capture.dtype": "int8"}, "capture.dtype"),
    ({"capture.curvature_fraction": 0.0}, "curvature_fraction"),
    ({"capture.curvature_draws": 0}, "capture.curvature_draws must be an integer >= 1"),
    ({"capture.curvature_draws": 1.5}, "'capture.curvature_draws' must be an integer"),
    ({"embed.segments": 0}, "embed.segments"),
    ({"embed.dtype": "float16"}, "embed.dtype"),
    ({"capture.kind": "sparse"}, "capture.kind"),
    ({"capture.rank": 0}, "capture.rank must be >= 1, got 0"),
    ({"capture.members": 0}, "capture.members must be >= 1, got 0"),
    ({"capture.members": 2}, "capture.members 2 with embed.error_blocks 2: .* set embed.error_blocks: 1"),
    ({"store.steps_per_shard": 0}, "store.steps_per_shard must be >= 1"),
    ({"data.seq_len": -1}, "data.seq_len must be >= 1, got -1"),
    ({"train.lr": 0}, "train.lr must be a positive number"),
    ({"train.lr": float("nan")}, "train.lr must be a positive number"),
    ({"data.builtin.corrupted_fraction": 1.0}, "corrupted_fraction"),
    ({"model.n_head": 0}, "model.n_head"),
])
def test_validation_names_the_field(dotted, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, **dotted)


@pytest.mark.parametrize("section, key, value, expected", [
    ("train", "ranks", "two", "'train.ranks' must be an integer, got 'two' (str)"),
    ("train", "ranks", 2.5, "'train.ranks' must be an integer, got 2.5 (float)"),
    ("train", "ranks", True, "'train.ranks' must be an integer, got True (bool)"),
    ("train", "lr", "fast", "'train.lr' must be a number, got 'fast' (str)"),
    ("train", "steps", "ten", "'train.steps' must be an integer or null"),
    ("train", "use_gpu", "yes", "'train.use_gpu' must be true or false"),
    ("capture", "layers", "h.*", "'capture.layers' must be a list of a string or null"),
    ("capture", "layers", ["h.*", 3], "'capture.layers' must be a list of a string or null"),
    ("data", "train", 7, "'data.train' must be a string or a list of a string or null"),
    ("train", "deepspeed", "zero2.json", "'train.deepspeed' must be a mapping"),
])
def test_wrongly_typed_values_name_key_and_type(section, key, value, expected):
    with pytest.raises(ConfigError) as err:
        Config.from_dict({section: {key: value}})
    assert expected in str(err.value)


def test_well_typed_values_pass_and_ints_become_floats():
    cfg = Config.from_dict({"train": {"lr": 1, "steps": None}, "capture": {"layers": ["h.0.*"]},
                            "data": {"train": ["a.parquet", "b.parquet"], "validation": "v.parquet"}})
    assert cfg.train.lr == 1.0 and isinstance(cfg.train.lr, float)
    assert cfg.capture.layers == ["h.0.*"] and cfg.data.train == ["a.parquet", "b.parquet"]


def test_bad_yaml_files(tmp_path):
    (tmp_path / "list.yaml").write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="mapping at the top level"):
        load_config(tmp_path / "list.yaml")
    (tmp_path / "broken.yaml").write_text("train: {lr: [\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(tmp_path / "broken.yaml")
    (tmp_path / "section.yaml").write_text("train: 3\n")
    with pytest.raises(ConfigError, match="section train must be a mapping"):
        load_config(tmp_path / "section.yaml")
