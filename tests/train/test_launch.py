"""launch/: train.py under `accelerate launch` for real, honouring what the accelerate config, its
DeepSpeed config file, `mixed_precision` and `--num_processes` say (read back from the engine or
model into run.json), and the config files parse and name what exists."""

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
# A short run of the default char-LM; no --warmup: the default must fit 10 steps.
SHORT = ["--steps", "10", "--log-every", "2", "--context", "32", "--eval-every", "10", "--ckpt-every", "10"]


def accelerate_launch(out: Path, *launch_args: str, train_args: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    accelerate = shutil.which("accelerate")
    if accelerate is None:
        pytest.skip("accelerate is not installed (pip install 'dist-optim[accelerate]')")
    return subprocess.run(
        [accelerate, "launch", *launch_args, str(LAUNCH / "train.py"), *SHORT, *train_args, "--out", str(out)],
        capture_output=True, text=True, timeout=600, cwd=LAUNCH.parent,  # the yamls name launch/deepspeed/... relative
    )


def trained(proc: subprocess.CompletedProcess, out: Path) -> tuple[dict, dict, list[dict]]:
    """(config.json, run.json, metrics rows) of a run that must have succeeded and learned."""
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["loss"] < rows[0]["loss"]
    return json.loads((out / "config.json").read_text()), json.loads((out / "run.json").read_text()), rows


def with_ds_config(tmp_path: Path, yaml_name: str, edit) -> Path:
    """A copy of launch/accelerate/<yaml_name> whose DeepSpeed config file is its JSON after ``edit``."""
    acc = yaml.safe_load((LAUNCH / "accelerate" / yaml_name).read_text())
    ds = json.loads((LAUNCH.parent / acc["deepspeed_config"]["deepspeed_config_file"]).read_text())
    edit(ds)
    (tmp_path / "ds.json").write_text(json.dumps(ds))
    acc["deepspeed_config"]["deepspeed_config_file"] = str(tmp_path / "ds.json")
    (tmp_path / "acc.yaml").write_text(yaml.safe_dump(acc))
    return tmp_path / "acc.yaml"


@pytest.mark.parametrize(
    "config,expected",
    [
        ("fsdp2.yaml", {"engine": "fsdp2", "prepared_by": "accelerate", "sharded": True, "world_size": 2}),
        ("zero2.yaml", {"engine": "deepspeed", "zero_stage": 2, "optimizer": "dist_optim.Ranger", "micro_batch_size": 8,
                        "world_size": 2}),
        ("zero3.yaml", {"engine": "deepspeed", "zero_stage": 3, "optimizer": "dist_optim.AdamW", "micro_batch_size": 8,
                        "world_size": 2}),
    ],
)
def test_accelerate_config_runs_what_it_says_with_short_run_defaults(tmp_path, config, expected):
    """zero3.yaml runs ZeRO-3 (it used to run ZeRO-2), the DeepSpeed JSON's optimizer and micro-batch
    run, and --steps 10 needs no --warmup."""
    out = tmp_path / "acc"
    cfg, ran, _ = trained(accelerate_launch(out, "--config_file", str(LAUNCH / "accelerate" / config)), out)
    assert {k: ran[k] for k in expected} == expected
    assert cfg["nproc"] == 2 and cfg["launcher"] == "accelerate" and cfg["warmup"] == 1


def ours_sgd_on_stage_1(ds):
    ds["zero_optimization"] = {"stage": 1}
    ds["optimizer"] = {"type": "dist_optim.SGD", "params": {"lr": 0.05, "momentum": 0.9, "max_grad_norm": 0.5}}
    ds["train_micro_batch_size_per_gpu"] = 2
    ds["gradient_accumulation_steps"] = 2


def deepspeeds_own_adamw_with_its_clipping(ds):
    ds["optimizer"] = {"type": "AdamW", "params": {"lr": 0.002, "torch_adam": True}}
    ds["gradient_clipping"] = 0.7


@pytest.mark.parametrize(
    "edit,ran_expected,cfg_expected",
    [
        (ours_sgd_on_stage_1,
         {"zero_stage": 1, "optimizer": "dist_optim.SGD", "micro_batch_size": 2, "gradient_accumulation_steps": 2},
         {"strategy": "zero1", "optimizer": "dist_optim.SGD", "batch_size": 2, "accum": 2, "max_grad_norm": 0.5, "lr": 0.05}),
        (deepspeeds_own_adamw_with_its_clipping,
         {"zero_stage": 3, "optimizer": "torch.AdamW", "gradient_clipping": 0.7, "micro_batch_size": 8},
         {"strategy": "zero3", "optimizer": "AdamW", "lr": 0.002}),
    ],
    ids=["ours-sgd-stage1-batch2-accum2", "deepspeed-adamw-clip0.7"],
)
def test_editing_the_ds_config_changes_what_runs(tmp_path, edit, ran_expected, cfg_expected):
    """Stage, optimizer (ours or DeepSpeed's), micro-batch, accumulation and clipping come from the
    JSON the yaml points to; the JSON's lr is the schedule's base (warmup 1 step: full lr at step 2)."""
    out = tmp_path / "edited"
    cfg, ran, rows = trained(accelerate_launch(out, "--config_file", str(with_ds_config(tmp_path, "zero3.yaml", edit))), out)
    assert {k: ran[k] for k in ran_expected} == ran_expected
    assert {k: cfg[k] for k in cfg_expected} == cfg_expected
    assert rows[0]["lr"] == cfg_expected["lr"]


def test_a_ds_config_scheduler_drives_the_lr(tmp_path):
    """DeepSpeed's WarmupLR from the JSON sets the lr (the job's own schedule steps aside)."""
    def edit(ds):
        ds["scheduler"] = {"type": "WarmupLR", "params": {"warmup_min_lr": 0.0, "warmup_max_lr": 0.01,
                                                          "warmup_num_steps": 6, "warmup_type": "linear"}}

    out = tmp_path / "sched"
    cfg, ran, rows = trained(accelerate_launch(out, "--config_file", str(with_ds_config(tmp_path, "zero2.yaml", edit))), out)
    lrs = [r["lr"] for r in rows]  # logged at steps 2, 4, 6, 8, 10
    assert (cfg["schedule"], ran["lr_scheduler"]) == ("ds_config", "WarmupLR")
    assert lrs[0] < lrs[1] < lrs[2] <= 0.01 and lrs[3] == lrs[4] == 0.01


def test_auto_in_the_ds_config_takes_the_flags(tmp_path):
    def edit(ds):
        ds["train_micro_batch_size_per_gpu"] = "auto"
        ds["gradient_accumulation_steps"] = "auto"

    out = tmp_path / "auto"
    proc = accelerate_launch(out, "--config_file", str(with_ds_config(tmp_path, "zero2.yaml", edit)),
                             train_args=("--batch-size", "3", "--accum", "2"))
    _, ran, _ = trained(proc, out)
    assert (ran["micro_batch_size"], ran["gradient_accumulation_steps"]) == (3, 2)


@pytest.mark.parametrize(
    "config,recorded",
    [
        ("fsdp2.yaml", {"mixed_precision": "bf16", "param_dtype": "torch.bfloat16"}),
        ("zero2.yaml", {"mixed_precision": "bf16"}),  # read back from engine.bfloat16_enabled()
    ],
)
def test_mixed_precision_bf16_is_honoured(tmp_path, config, recorded):
    losses = {}
    for precision in ("no", "bf16"):
        out = tmp_path / precision
        proc = accelerate_launch(out, "--config_file", str(LAUNCH / "accelerate" / config), "--mixed_precision", precision)
        cfg, ran, rows = trained(proc, out)
        assert cfg["mixed_precision"] == ran["mixed_precision"] == precision
        losses[precision] = [r["loss"] for r in rows]
    assert {k: ran[k] for k in recorded} == recorded
    assert losses["bf16"] != losses["no"]


def with_fsdp_config(tmp_path: Path, **settings) -> Path:
    acc = yaml.safe_load((LAUNCH / "accelerate" / "fsdp2.yaml").read_text())
    acc["fsdp_config"].update(settings.pop("fsdp", {}))
    acc.update(settings)
    (tmp_path / "fsdp.yaml").write_text(yaml.safe_dump(acc))
    return tmp_path / "fsdp.yaml"


def test_fsdp_activation_checkpointing_is_applied(tmp_path):
    out = tmp_path / "ac"
    config = with_fsdp_config(tmp_path, fsdp={"fsdp_activation_checkpointing": True})
    cfg, ran, _ = trained(accelerate_launch(out, "--config_file", str(config)), out)
    assert (ran["activation_checkpointing"], ran["sharded"]) == (True, True)


def test_a_dynamo_backend_on_the_cpu_fsdp2_route_is_refused(tmp_path):
    out = tmp_path / "dynamo"
    config = with_fsdp_config(tmp_path, dynamo_config={"dynamo_backend": "EAGER"})
    proc = accelerate_launch(out, "--config_file", str(config))
    assert proc.returncode != 0 and "Invalid dynamo_backend: 'EAGER'" in proc.stderr


def test_cpu_num_processes_2_trains_as_two_ranks(tmp_path):
    """accelerate's simple launcher starts one process for --cpu; train.py starts the two ranks."""
    out = tmp_path / "cpu2"
    cfg, ran, _ = trained(accelerate_launch(out, "--cpu", "--num_processes", "2"), out)
    assert (cfg["nproc"], ran["world_size"], ran["engine"]) == (2, 2, "ddp")


def test_a_flag_contradicting_the_ds_config_is_refused(tmp_path):
    out = tmp_path / "refused"
    proc = accelerate_launch(out, "--config_file", str(LAUNCH / "accelerate" / "zero2.yaml"),
                             train_args=("--batch-size", "4"))
    assert proc.returncode != 0
    assert "Invalid batch_size: 4 (the DeepSpeed config launch/deepspeed/zero2.json sets train_micro_batch_size_per_gpu=8" in proc.stderr
    assert not (out / "metrics.jsonl").exists()


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
