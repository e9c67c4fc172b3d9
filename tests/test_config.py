"""Typed configs: YAML + dotted overrides; unknown keys, wrong types and bad values name the key."""

import pytest
import yaml

from adapt import config
from adapt.config import ConfigError, RunConfig


def _load(*overrides, path=None):
    return config.load(RunConfig, path, ["data.source=x", *overrides])


def test_public_override_keys():
    cfg = _load("out_dir=o", "model.base=b", "train.max_steps=7", "train.seed=3", "train.batch_size=5",
                "objective.strength=0.4", "objective.window=continuous", "lora.preset=cross_attn_kv", "lora.rank=16", "lora.alpha=8")
    assert (cfg.out_dir, cfg.model.base, cfg.train.max_steps, cfg.train.seed, cfg.train.batch_size) == ("o", "b", 7, 3, 5)
    assert (cfg.objective.strength, cfg.objective.window, cfg.lora.preset, cfg.lora.rank, cfg.lora.alpha) == (0.4, "continuous", "cross_attn_kv", 16, 8.0)


@pytest.mark.parametrize("override,match", [
    ("lora.rnak=4", "unknown config key 'lora.rnak'"),
    ("trian.max_steps=4", "unknown config key 'trian'"),
    ("train.max_steps=ten", "train.max_steps: expected int"),
    ("train.max_steps=1.5", "train.max_steps: expected int"),
    ("objective.strength=0", r"objective.strength: must be in \(0, 1\]"),
    ("objective.strength=1.5", r"objective.strength: must be in \(0, 1\]"),
    ("lora.rank=0", "lora.rank: must be > 0"),
    ("lora.preset=self", "lora.preset: 'self' is not one of"),
    ("objective.window=sometimes", "objective.window"),
    ("data.resolution=30", "data.resolution"),
    ("train.mixed_precision=fp8", "train.mixed_precision"),
    ("objective.strength=0.01", "visits no timestep"),
    ("train.report_to=tensorbord", "train.report_to: 'tensorbord': choose from auto, none, all, .*tensorboard, wandb"),
    ("train.report_to=yes", "train.report_to: a bare yes / on / true names no tracker"),
    ("model.base=no", r"model.base: expected str, got bool False \(YAML reads a bare yes / no .* quote the word"),
])
def test_bad_values_name_the_key(override, match):
    with pytest.raises(ConfigError, match=match):
        _load(override)


def test_report_to_bare_no_means_none(tmp_path):
    # YAML 1.1 reads `report_to: no` as the boolean False, the way people write "no tracker"
    for spelled in ("no", "off", "false", "none", "'none'"):
        cfg_file = tmp_path / "c.yaml"
        cfg_file.write_text(f"train:\n  report_to: {spelled}\n")
        assert _load(path=cfg_file).train.report_to == "none"
    assert _load("train.report_to=no").train.report_to == "none"


def test_frozen_dtype_must_match_autocast():
    with pytest.raises(ConfigError, match="model.dtype=float16 with train.mixed_precision=bf16: use float16 with fp16"):
        _load("model.dtype=float16", "train.mixed_precision=bf16")
    assert _load("model.dtype=bfloat16", "train.mixed_precision=bf16").model.dtype == "bfloat16"
    assert _load("model.dtype=float16", "train.mixed_precision=no").model.dtype == "float16"
    assert _load("model.dtype=float16", "train.mixed_precision=auto").model.dtype == "float16"  # auto follows it


def test_yaml_booleans_for_no_and_yes():
    assert _load("train.mixed_precision=no").train.mixed_precision == "no"  # YAML 1.1 reads `no` as False
    assert config.load(RunConfig, None, ["data.source=x"]).train.mixed_precision == "auto"  # the default
    assert _load("train.compile=off").train.compile == "off"  # and `off` / `false` as False
    assert _load("train.compile=false").train.compile == "off"
    with pytest.raises(ConfigError, match=r"train.compile: True is not one of \['auto', 'off', 'regional'\]"):
        _load("train.compile=on")  # no choice spells True


def test_missing_source_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="data.source"):
        config.load(RunConfig, None, [])
    with pytest.raises(ConfigError, match="config file not found"):
        config.load(RunConfig, tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="key=value"):
        _load("justakey")


def test_yaml_then_overrides_then_dump_roundtrip(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("out_dir: a\ndata: {source: d, resolution: 128}\nlora: {rank: 4}\n")
    cfg = config.load(RunConfig, p, ["lora.rank=2"])
    assert cfg.data.resolution == 128 and cfg.lora.rank == 2 and cfg.out_dir == "a"
    config.dump(cfg, tmp_path / "resolved.yaml")
    again = config.load(RunConfig, tmp_path / "resolved.yaml")
    assert again == cfg
    assert yaml.safe_load((tmp_path / "resolved.yaml").read_text())["lora"]["rank"] == 2


def test_scientific_notation_without_dot_is_a_float():
    assert _load("optim.lr=1e-4").optim.lr == 1e-4
    with pytest.raises(ConfigError, match="optim.lr: expected float"):
        _load("optim.lr=fast")


def test_every_field_has_help():
    rows = config.describe(RunConfig)
    assert len(rows) > 40
    assert all(help_ for _, _, help_ in rows), [k for k, _, h in rows if not h]


def test_help_lists_every_key():
    text = config.keys_help(config.EvalConfig)
    assert all(f"  {k} " in text for k, _, _ in config.describe(config.EvalConfig))
    assert "fid_inception" in text and "train.mixed_precision" in config.keys_help(RunConfig)
