"""launch/: train.py under `accelerate launch` for real, the launcher-to-strategy mapping, and the
config files parse and name what exists."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from dist_optim.cli import strategy_from_launcher

LAUNCH = Path(__file__).resolve().parents[2] / "launch"


@pytest.mark.parametrize("config,strategy", [("fsdp2.yaml", "fsdp2"), ("zero2.yaml", "zero2")])
def test_accelerate_launch_config_trains(tmp_path, config, strategy):
    accelerate = shutil.which("accelerate")
    if accelerate is None:
        pytest.skip("accelerate is not installed (pip install 'dist-optim[accelerate]')")
    out = tmp_path / "acc"
    proc = subprocess.run(
        [accelerate, "launch", "--config_file", str(LAUNCH / "accelerate" / config), str(LAUNCH / "train.py"),
         "--optimizer", "radam", "--steps", "12", "--warmup", "2", "--log-every", "4", "--batch-size", "4",
         "--context", "64", "--out", str(out)],
        capture_output=True, text=True, timeout=600, cwd=LAUNCH.parent,  # the yaml names launch/deepspeed/... relative
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    cfg = json.loads((out / "config.json").read_text())
    assert (cfg["strategy"], cfg["nproc"]) == (strategy, 2)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["loss"] < rows[0]["loss"]


@pytest.mark.parametrize(
    "env,strategy",
    [
        ({"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2", "WORLD_SIZE": "8"}, "fsdp2"),
        ({"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_ZERO_STAGE": "3", "WORLD_SIZE": "8"}, "zero3"),
        ({"WORLD_SIZE": "4"}, "ddp"),
        ({}, "single"),
    ],
)
def test_strategy_from_launcher(env, strategy):
    assert strategy_from_launcher(env) == strategy


def test_fsdp1_launch_is_refused_with_a_clear_message():
    with pytest.raises(ValueError, match="fsdp_version: 1"):
        strategy_from_launcher({"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "1"})


@pytest.mark.parametrize("path", sorted((LAUNCH / "accelerate").glob("*.yaml")), ids=lambda p: p.name)
def test_accelerate_configs_parse_and_point_at_existing_files(path):
    cfg = yaml.safe_load(path.read_text())
    assert cfg["distributed_type"] in ("FSDP", "DEEPSPEED")
    if cfg["distributed_type"] == "FSDP":
        assert cfg["fsdp_config"]["fsdp_version"] == 2
    else:
        ds_file = LAUNCH.parent / cfg["deepspeed_config"]["deepspeed_config_file"]
        assert ds_file.is_file(), ds_file


@pytest.mark.parametrize("path", sorted((LAUNCH / "deepspeed").glob("*.json")), ids=lambda p: p.name)
def test_ds_configs_name_our_optimizers_and_build(path):
    import torch

    from dist_optim.integrations.deepspeed import VALID_TYPES, build_from_config

    cfg = json.loads(path.read_text())
    assert cfg["optimizer"]["type"] in VALID_TYPES
    assert build_from_config(cfg["optimizer"], [torch.nn.Parameter(torch.zeros(2))]) is not None


def test_launch_train_script_runs_under_a_bare_launcher(tmp_path):
    """WORLD_SIZE unset: one process, strategy single."""
    out = tmp_path / "bare"
    proc = subprocess.run(
        [sys.executable, str(LAUNCH / "train.py"), "--optimizer", "sgd", "--steps", "4", "--warmup", "0",
         "--log-every", "2", "--batch-size", "2", "--context", "32", "--out", str(out)],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads((out / "config.json").read_text())["strategy"] == "single"
