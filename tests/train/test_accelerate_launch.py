"""What launch/train.py reads from accelerate's settings, without launching: the DeepSpeed config
file is resolved with accelerate's own plugin and honoured, a flag contradicting it is refused with
one clear line, and `--cpu --num_processes N` is recognised from the accelerate command line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dist_optim.train.accelerate_launch import accelerate_values
from dist_optim.train.config import TrainConfig
from dist_optim.train.cpu_ranks import accelerate_cpu_processes

LAUNCH = Path(__file__).resolve().parents[2] / "launch"

DS = {
    "train_micro_batch_size_per_gpu": 8,
    "gradient_accumulation_steps": 1,
    "zero_optimization": {"stage": 3},
    "optimizer": {"type": "dist_optim.AdamW", "params": {"lr": 3e-3, "max_grad_norm": 1.0}},
}


def env_for(tmp_path: Path, ds: dict | None, precision: str = "no", **extra: str) -> dict[str, str]:
    """The variables accelerate's DeepSpeed launcher gives a rank for a yaml naming ``ds``."""
    env = {"ACCELERATE_MIXED_PRECISION": precision, "ACCELERATE_USE_DEEPSPEED": "true", "WORLD_SIZE": "2", **extra}
    if ds is not None:
        (tmp_path / "ds.json").write_text(json.dumps(ds))
        env["ACCELERATE_DEEPSPEED_CONFIG_FILE"] = str(tmp_path / "ds.json")
    return env


def test_the_ds_config_file_decides_stage_optimizer_batch_and_precision(tmp_path):
    ds = {**DS, "gradient_accumulation_steps": 4, "bf16": {"enabled": True}}
    values = accelerate_values(env_for(tmp_path, ds), {}, world=2)
    cfg = TrainConfig(**values, nproc=2)
    assert (cfg.strategy, cfg.optimizer, cfg.batch_size, cfg.accum, cfg.mixed_precision) == (
        "zero3", "dist_optim.AdamW", 8, 4, "bf16")
    assert cfg.ds_config["optimizer"] == DS["optimizer"]


def test_accelerates_mixed_precision_enables_the_ds_config_precision(tmp_path):
    values = accelerate_values(env_for(tmp_path, DS, precision="bf16"), {}, world=2)
    assert values["ds_config"]["bf16"] == {"enabled": True} and values["mixed_precision"] == "bf16"


def test_without_a_config_file_the_launchers_stage_applies(tmp_path):
    env = env_for(tmp_path, None, ACCELERATE_DEEPSPEED_ZERO_STAGE="1")
    values = accelerate_values(env, {"optimizer": "radam", "batch_size": 4}, world=2)
    assert (values["strategy"], values["ds_config"]["train_micro_batch_size_per_gpu"]) == ("zero1", 4)
    assert "optimizer" not in values["ds_config"]  # ours, built from --optimizer


@pytest.mark.parametrize(
    "change,given,message",
    [
        ({}, {"batch_size": 4}, "Invalid batch_size: 4 (the DeepSpeed config"),
        ({}, {"accum": 2}, "Invalid accum: 2 (the DeepSpeed config"),
        ({}, {"optimizer": "sgd"}, "Invalid optimizer: 'sgd' (the DeepSpeed config"),
        ({}, {"lr": 0.1}, "Invalid lr: 0.1 (the DeepSpeed config"),
        ({}, {"strategy": "zero2"}, "Invalid strategy: 'zero2'"),
        ({}, {"mixed_precision": "bf16"}, "Invalid mixed_precision: 'bf16' (the DeepSpeed config, with accelerate's "
                                          "setting, runs mixed_precision 'no'"),
        ({"bf16": {"enabled": True}}, {"mixed_precision": "no"}, "Invalid mixed_precision: 'no' (the DeepSpeed config"),
        ({"optimizer": None, "gradient_clipping": 0.7}, {"max_grad_norm": 0.5}, "Invalid max_grad_norm: 0.5 (the DeepSpeed "
                                                                             "config"),
        ({"optimizer": None, "gradient_clipping": 0.7}, {"max_grad_norm": None}, "Invalid max_grad_norm: 0 (the DeepSpeed"),
        ({"optimizer": None, "scheduler": {"type": "WarmupLR", "params": {}}}, {"lr": 0.05}, "Invalid lr: 0.05 (the DeepSpeed "
                                                                                             "config"),
        ({"train_micro_batch_size_per_gpu": None, "train_batch_size": 9}, {}, "Invalid train_batch_size: 9"),
        ({"zero_optimization": {"stage": 0}}, {}, "Invalid zero_optimization.stage: 0"),
        ({"scheduler": {"type": "WarmupLR", "params": {}}}, {"warmup": 3}, "Invalid warmup: 3 (the DeepSpeed config"),
        ({"scheduler": {"type": "WarmupLR", "params": {"warmup_num_steps": "auto"}}}, {}, "Invalid scheduler.params.warmup_num_steps: 'auto'"),
        ({"zero_optimization": {"stage": 2, "reduce_bucket_size": "auto"}}, {}, "Invalid zero_optimization.reduce_bucket_size: 'auto'"),
    ],
)
def test_what_cannot_be_honoured_is_refused_naming_the_setting(tmp_path, change, given, message):
    with pytest.raises(ValueError) as err:
        accelerate_values(env_for(tmp_path, edited(DS, change)), given, world=2)
    assert message in str(err.value) and "\n" not in str(err.value)


def edited(ds: dict, change: dict) -> dict:
    """``ds`` with ``change`` applied; a None value removes the key."""
    out = {**ds, **change}
    return {k: v for k, v in out.items() if v is not None}


WITHOUT_OPTIMIZER = edited(DS, {"optimizer": None, "zero_optimization": {"stage": 2}})


@pytest.mark.parametrize(
    "clipping,given,ours,deepspeeds",
    [
        (None, {}, 1.0, 0.0),  # the file is silent: the flag's default clips, in ours, once
        (None, {"max_grad_norm": None}, None, 0.0),  # --max-grad-norm 0: nothing clips (DeepSpeed's default 1.0 did)
        ("auto", {"max_grad_norm": None}, None, 0.0),  # "auto" takes the flag (it was 1.0)
        ("auto", {"max_grad_norm": 0.5}, 0.5, 0.0),
        (0.7, {}, None, 0.7),  # the file's clipping stands, done by DeepSpeed
        (0.7, {"max_grad_norm": 0.7}, None, 0.7),
        (0.0, {}, None, 0.0),  # the file says no clipping: the flag's default does not clip either
    ],
)
def test_clipping_without_an_optimizer_section_is_what_the_file_and_flag_say(tmp_path, clipping, given, ours, deepspeeds):
    ds = edited(WITHOUT_OPTIMIZER, {"gradient_clipping": clipping})
    cfg = TrainConfig(**accelerate_values(env_for(tmp_path, ds), given, world=2), nproc=2)
    assert (cfg.max_grad_norm, cfg.ds_config["gradient_clipping"]) == (ours, deepspeeds)


def test_train_batch_size_alone_gives_the_micro_batch_as_deepspeed_derives_it(tmp_path):
    ds = edited(DS, {"train_micro_batch_size_per_gpu": None, "gradient_accumulation_steps": 2, "train_batch_size": 16})
    cfg = TrainConfig(**accelerate_values(env_for(tmp_path, ds), {}, world=2), nproc=2)
    assert (cfg.batch_size, cfg.accum, cfg.ds_config["train_micro_batch_size_per_gpu"]) == (4, 2, 4)


def test_lr_flag_stands_beside_a_scheduler_that_scales_it(tmp_path):
    ds = edited(WITHOUT_OPTIMIZER, {"scheduler": {"type": "WarmupCosineLR", "params": {"total_num_steps": 10}}})
    cfg = TrainConfig(**accelerate_values(env_for(tmp_path, ds), {"lr": 0.05}, world=2), nproc=2)
    assert cfg.lr == 0.05 and cfg.schedule == "ds_config"


def test_a_ds_config_scheduler_sets_the_lr_instead_of_the_jobs_schedule(tmp_path):
    ds = {**DS, "scheduler": {"type": "WarmupLR", "params": {"warmup_max_lr": 0.01, "warmup_num_steps": 4}}}
    cfg = TrainConfig(**accelerate_values(env_for(tmp_path, ds), {}, world=2), nproc=2)
    assert (cfg.schedule, cfg.warmup, cfg.ds_config["scheduler"]["type"]) == ("ds_config", 0, "WarmupLR")


def test_a_missing_ds_config_file_is_refused(tmp_path):
    env = env_for(tmp_path, None, ACCELERATE_DEEPSPEED_CONFIG_FILE="launch/deepspeed/nope.json")
    with pytest.raises(ValueError, match="Invalid deepspeed_config_file: 'launch/deepspeed/nope.json'"):
        accelerate_values(env, {}, world=2)


@pytest.mark.parametrize("steps,warmup", [(10, 1), (5, 0), (300, 20), (1000, 20)])
def test_default_warmup_fits_short_runs(steps, warmup):
    assert TrainConfig(steps=steps).warmup == warmup


CPU_ENV = {"ACCELERATE_MIXED_PRECISION": "no", "ACCELERATE_USE_CPU": "True", "MASTER_ADDR": "127.0.0.1"}


@pytest.mark.parametrize(
    "env,cmdline,count",
    [
        (CPU_ENV, ["python", "/bin/accelerate", "launch", "--cpu", "--num_processes", "3", "train.py", "--steps", "9"], 3),
        (CPU_ENV, ["python", "/bin/accelerate", "launch", "--cpu", "--num_processes=1", "train.py"], 1),
        ({**CPU_ENV, "WORLD_SIZE": "2"}, [], 1),  # a real launcher already started the ranks
        ({k: v for k, v in CPU_ENV.items() if k != "MASTER_ADDR"}, [], 1),  # one process was asked for
    ],
)
def test_accelerate_cpu_process_count_is_read_from_its_command(env, cmdline, count):
    assert accelerate_cpu_processes(env, cmdline) == count


def test_mpirun_ranks_are_refused_rather_than_each_training_alone():
    with pytest.raises(ValueError, match="Invalid launch: mpirun started the ranks"):
        accelerate_cpu_processes({**CPU_ENV, "OMPI_COMM_WORLD_SIZE": "2"}, [])


def test_an_unreadable_accelerate_command_is_refused_not_run_as_one_process():
    with pytest.raises(ValueError, match="accelerate launch --cpu started one process, though it was asked for several"):
        accelerate_cpu_processes(CPU_ENV, ["python", "my_own_launcher.py"])


@pytest.mark.parametrize("config,ignored", [("zero2.yaml", "DeepSpeed"), ("fsdp2.yaml", "FSDP")])
@pytest.mark.parametrize("several", [True, False])
def test_cpu_flag_dropping_the_configs_deepspeed_or_fsdp_is_refused(config, ignored, several):
    env = CPU_ENV if several else {k: v for k, v in CPU_ENV.items() if k != "MASTER_ADDR"}
    cmdline = ["python", "/bin/accelerate", "launch", "--cpu", "--config_file", str(LAUNCH / "accelerate" / config), "train.py"]
    with pytest.raises(ValueError, match=f"accelerate launch --cpu ignores the config's {ignored} settings"):
        accelerate_cpu_processes(env, cmdline)


@pytest.mark.parametrize("env", [{"ACCELERATE_MIXED_PRECISION": "no", "WORLD_SIZE": "2"}, {"WORLD_SIZE": "2"}],
                         ids=["accelerate", "torchrun"])
def test_an_nproc_flag_other_than_the_launchers_count_is_refused(env):
    import argparse

    from dist_optim.cli import _add_train_args, _launched_config

    parser = argparse.ArgumentParser()
    _add_train_args(parser, with_optimizer=True)
    parser.add_argument("--out", default=None)
    with pytest.raises(ValueError, match=r"Invalid nproc: 4 \(the launcher started 2 ranks"):
        _launched_config(parser.parse_args(["--nproc", "4"]), env)
    assert _launched_config(parser.parse_args(["--nproc", "2"]), env).nproc == 2


@pytest.mark.parametrize(
    "params,given,lr,clip",
    [
        ({"lr": "auto", "max_grad_norm": 1.0}, {"lr": 0.02}, 0.02, 1.0),  # the flag fills "auto"
        ({"lr": "auto", "max_grad_norm": 1.0}, {}, 3e-3, 1.0),  # or its default for AdamW
        ({"lr": 1e-3, "max_grad_norm": "auto"}, {"max_grad_norm": None}, 1e-3, None),  # --max-grad-norm 0
        ({"lr": 1e-3, "max_grad_norm": "auto"}, {}, 1e-3, 1.0),
    ],
)
def test_auto_in_the_optimizer_section_takes_the_flag(tmp_path, params, given, lr, clip):
    ds = edited(DS, {"optimizer": {"type": "dist_optim.AdamW", "params": params}})
    cfg = TrainConfig(**accelerate_values(env_for(tmp_path, ds), given, world=2), nproc=2)
    assert (cfg.lr, cfg.max_grad_norm) == (lr, clip)
    assert cfg.ds_config["optimizer"]["params"] == {"lr": lr, "max_grad_norm": clip}
    assert cfg.ds_config["gradient_clipping"] == 0.0  # ours clips, or (--max-grad-norm 0) nothing does


def test_auto_lr_reaches_lookaheads_inner_optimizer(tmp_path):
    inner = {"type": "dist_optim.SGD", "params": {"lr": "auto", "momentum": 0.9}}
    ds = edited(DS, {"optimizer": {"type": "dist_optim.Lookahead", "params": {"optimizer": inner, "k": 5}}})
    cfg = TrainConfig(**accelerate_values(env_for(tmp_path, ds), {}, world=2), nproc=2)
    assert cfg.ds_config["optimizer"]["params"]["optimizer"]["params"]["lr"] == cfg.lr == 0.3  # SGD's default


def test_zero3_init_flag_is_refused_at_zero3(tmp_path):
    with pytest.raises(ValueError, match="Invalid zero3_init_flag: true"):
        accelerate_values(env_for(tmp_path, DS, ACCELERATE_DEEPSPEED_ZERO3_INIT="true"), {}, world=2)
    # below ZeRO-3 accelerate turns it off itself (with a warning), and so the run goes on
    stage2 = edited(DS, {"zero_optimization": {"stage": 2}})
    with pytest.warns(UserWarning, match="only applicable for ZeRO Stage 3"):
        values = accelerate_values(env_for(tmp_path, stage2, ACCELERATE_DEEPSPEED_ZERO3_INIT="true"), {}, world=2)
    assert values["strategy"] == "zero2"


def test_lr_flag_filling_auto_beside_a_scheduler_that_sets_the_lr_is_refused(tmp_path):
    ds = edited(DS, {"optimizer": {"type": "dist_optim.AdamW", "params": {"lr": "auto"}},
                     "scheduler": {"type": "WarmupLR", "params": {"warmup_max_lr": 0.001}}})
    with pytest.raises(ValueError, match="Invalid lr: 0.05 .*scheduler section"):
        accelerate_values(env_for(tmp_path, ds), {"lr": 0.05}, world=2)


def test_a_full_state_dict_type_is_refused_for_fsdp2():
    env = {"ACCELERATE_MIXED_PRECISION": "no", "ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2", "WORLD_SIZE": "2",
           "FSDP_STATE_DICT_TYPE": "FULL_STATE_DICT"}
    with pytest.raises(ValueError, match="Invalid fsdp_state_dict_type: 'FULL_STATE_DICT'"):
        accelerate_values(env, {}, world=2)
    for sharded in ("SHARDED_STATE_DICT", "3"):  # accelerate takes StateDictType's number too
        assert accelerate_values({**env, "FSDP_STATE_DICT_TYPE": sharded}, {}, world=2)["strategy"] == "fsdp2"


def test_lookaheads_inner_spec_refuses_keys_it_would_drop():
    import torch

    from dist_optim.integrations.deepspeed import build_from_config

    spec = {"type": "dist_optim.Lookahead", "params": {"optimizer": {"type": "SGD", "params": {"lr": 0.1}, "lr": 0.5}}}
    with pytest.raises(ValueError, match="Invalid optimizer.params.optimizer key: 'lr'"):
        build_from_config(spec, [torch.nn.Parameter(torch.zeros(2))])
