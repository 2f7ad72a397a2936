import json

import pytest
import yaml
from transformers import HfArgumentParser

from hf_rifle import RifleConfig

RIFLE_SETTINGS = {
    "num_periods": 4,
    "reinit_head": False,
    "head_lr_schedule": "trainer",
    "head_init": "normal",
    "head_init_std": 0.02,
    "reset_head_optimizer_state": False,
    "head_module": "classifier.1",
    "regularizer": "l2sp",
    "l2sp_alpha": 0.1,
    "l2sp_beta": 0.2,
}


def check_settings(config):
    for name, value in RIFLE_SETTINGS.items():
        assert getattr(config, name) == value, name


def test_defaults_are_the_papers_full_method(tmp_path):
    config = RifleConfig(output_dir=str(tmp_path))
    assert (config.num_periods, config.reinit_head, config.head_lr_schedule) == (3, True, "cyclic_cosine")
    assert (config.head_init, config.head_init_std, config.regularizer) == ("default", 0.01, "l2")
    assert (config.l2sp_alpha, config.l2sp_beta, config.reset_head_optimizer_state) == (0.01, 0.01, True)
    assert config.lr_scheduler_type == "cosine" and config.max_grad_norm == 0.0


def test_parser_reads_flags(tmp_path):
    flags = ["--output_dir", str(tmp_path), "--no_reinit_head", "--no_reset_head_optimizer_state"]
    for name, value in RIFLE_SETTINGS.items():
        if not isinstance(value, bool):
            flags += [f"--{name}", str(value)]
    (config,) = HfArgumentParser(RifleConfig).parse_args_into_dataclasses(flags)
    check_settings(config)


@pytest.mark.parametrize("suffix", ["json", "yaml"])
def test_parser_reads_json_and_yaml_files(tmp_path, suffix):
    path = tmp_path / f"config.{suffix}"
    settings = {"output_dir": str(tmp_path), **RIFLE_SETTINGS}
    path.write_text(json.dumps(settings) if suffix == "json" else yaml.safe_dump(settings))
    parser = HfArgumentParser(RifleConfig)
    (config,) = parser.parse_json_file(str(path)) if suffix == "json" else parser.parse_yaml_file(str(path))
    check_settings(config)


@pytest.mark.parametrize(
    "field,value,message",
    [
        ("num_periods", 0, "num_periods must be >= 1"),
        ("l2sp_alpha", -0.1, "l2sp_alpha must be a finite number >= 0"),
        ("l2sp_beta", float("nan"), "l2sp_beta must be a finite number >= 0"),
        ("head_init_std", float("inf"), "head_init_std must be a finite number >= 0"),
        ("regularizer", "l1", "Unknown regularizer='l1': choose one of 'l2', 'l2sp'"),
        ("head_lr_schedule", "step", "Unknown head_lr_schedule='step'"),
        ("head_init", "xavier", "Unknown head_init='xavier'"),
    ],
)
def test_bad_settings_are_rejected_with_the_fix(tmp_path, field, value, message):
    with pytest.raises(ValueError, match=message):
        RifleConfig(output_dir=str(tmp_path), **{field: value})


def test_l2_is_the_papers_weight_decay_unless_set_and_l2sp_has_none():
    from hf_rifle.card import run_settings

    assert RifleConfig(output_dir="out").weight_decay == 1e-4
    assert RifleConfig(output_dir="out", weight_decay=0.01).weight_decay == 0.01
    assert RifleConfig(output_dir="out", weight_decay=0.0).weight_decay == 0.0
    l2sp = RifleConfig(output_dir="out", regularizer="l2sp")
    assert l2sp.weight_decay == 0.0
    assert ("weight decay", "0.0001") in run_settings(RifleConfig(output_dir="out"))
    assert json.loads(RifleConfig(output_dir="out").to_json_string())["weight_decay"] == 1e-4


def test_l2sp_with_weight_decay_is_refused_as_double_regularization(tmp_path):
    with pytest.raises(ValueError, match="regularizer='l2sp' with weight_decay=0.01 regularizes twice"):
        RifleConfig(output_dir=str(tmp_path), regularizer="l2sp", weight_decay=0.01)
    parser = HfArgumentParser(RifleConfig)
    (args,) = parser.parse_args_into_dataclasses(["--output_dir", str(tmp_path), "--weight_decay", "0.001"])
    assert args.weight_decay == 0.001
