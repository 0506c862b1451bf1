"""dist-optim train/compare: smoke runs at world 2 per strategy (loss falls, files written), resume
equals an uninterrupted run, and bad input exits non-zero with one line and writes nothing."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest

from dist_optim.distributed.checkpoint import latest_checkpoint

SMALL = ["--steps", "24", "--warmup", "4", "--log-every", "4", "--eval-every", "12", "--ckpt-every", "12",
         "--batch-size", "4", "--context", "64"]


def cli(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "dist_optim.cli", *args], capture_output=True, text=True, timeout=600)
    if check and proc.returncode != 0:
        raise AssertionError(proc.stderr[-3000:])
    return proc


def metrics(out) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize(
    "strategy,optimizer",
    [("ddp", "adamw"), ("fsdp2", "ranger"), ("single", "lookahead-sgd"), ("zero1", "radam"), ("zero2", "adamw"),
     ("zero3", "lookahead-adam")],
)
def test_train_smoke_learns_and_writes_everything(tmp_path, strategy, optimizer):
    out = tmp_path / "run"
    nproc = "1" if strategy == "single" else "2"
    cli("train", "--optimizer", optimizer, "--strategy", strategy, "--nproc", nproc, "--out", str(out), *SMALL)
    rows = metrics(out)
    assert [r["step"] for r in rows] == list(range(4, 25, 4))
    assert rows[-1]["loss"] < rows[0]["loss"]
    assert set(rows[0]) == {"step", "loss", "lr", "grad_norm", "tokens_per_s", "skipped"}
    assert (out / "loss.png").stat().st_size > 1000
    report = (out / "report.md").read_text()
    assert "validation loss" in report and "peak memory" in report
    assert latest_checkpoint(out / "checkpoint").name == "step_00000024"


@pytest.mark.parametrize("strategy", ["fsdp2", "zero2"])
def test_resume_after_a_crash_equals_the_uninterrupted_run(tmp_path, strategy):
    full, crashed = tmp_path / "full", tmp_path / "crashed"
    cli("train", "--optimizer", "ranger", "--strategy", strategy, "--nproc", "2", "--out", str(full), *SMALL)
    # The crashed run is the full run as it stood at its step-12 checkpoint.
    shutil.copytree(full, crashed)
    shutil.rmtree(crashed / "checkpoint" / "step_00000024")
    (crashed / "checkpoint" / "latest").write_text("step_00000012")
    cli("train", "--resume", str(crashed))
    a, b = metrics(full), metrics(crashed)
    assert [r["step"] for r in a] == [r["step"] for r in b]
    for x, y in zip(a, b):
        assert (x["loss"], x["lr"], x["grad_norm"]) == (y["loss"], y["lr"], y["grad_norm"])


def test_resume_with_more_steps_runs_the_new_schedule_from_the_first_resumed_step(tmp_path):
    """The lr after resuming with --steps 36 is the 36-step schedule's from the first resumed step
    (the checkpoint's lr, the 24-step schedule's, ran one step; the linear decay then ran on from it)."""
    fresh, resumed = tmp_path / "fresh36", tmp_path / "resumed"
    args = ["--optimizer", "adamw", "--strategy", "single", "--nproc", "1", "--schedule", "linear"]
    cli("train", *args, "--out", str(fresh), *SMALL, "--steps", "36")
    cli("train", *args, "--out", str(resumed), *SMALL)
    shutil.rmtree(resumed / "checkpoint" / "step_00000024")
    (resumed / "checkpoint" / "latest").write_text("step_00000012")
    cli("train", "--resume", str(resumed), "--steps", "36")
    after = {r["step"]: r["lr"] for r in metrics(resumed) if r["step"] > 12}
    assert after == {r["step"]: r["lr"] for r in metrics(fresh) if r["step"] > 12}


@pytest.mark.parametrize(
    "args,message",
    [
        (["--optimizer", "adamx"], "Invalid optimizer: 'adamx'"),
        (["--strategy", "zero9"], "Invalid strategy: 'zero9'"),
        (["--nproc", "0"], "Invalid nproc: 0"),
        (["--data", "/nonexistent/corpus.txt"], "Invalid data: '/nonexistent/corpus.txt'"),
        (["--steps", "10", "--warmup", "10"], "Invalid warmup: 10"),
        (["--mixed-precision", "fp8"], "Invalid mixed_precision: 'fp8'"),
        (["--mixed-precision", "fp16", "--strategy", "fsdp2"], "Invalid mixed_precision: 'fp16' with strategy 'fsdp2'"),
    ],
)
def test_bad_input_exits_nonzero_with_one_line_and_writes_nothing(tmp_path, args, message):
    out = tmp_path / "never"
    proc = cli("train", "--out", str(out), *args, check=False)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], proc.stderr
    assert not out.exists()


@pytest.mark.parametrize(
    "strategy,recorded",
    [
        ("fsdp2", {"param_dtype": "torch.bfloat16", "reduce_dtype": "torch.float32"}),  # MixedPrecisionPolicy
        ("ddp", {"autocast": "torch.bfloat16"}),
        ("zero2", {"mixed_precision": "bf16"}),  # read back from the engine
    ],
)
def test_mixed_precision_bf16_changes_the_run_and_is_recorded(tmp_path, strategy, recorded):
    losses = {}
    for precision in ("no", "bf16"):
        out = tmp_path / precision
        cli("train", "--optimizer", "adamw", "--strategy", strategy, "--nproc", "2", "--mixed-precision", precision,
            "--out", str(out), "--steps", "4", "--log-every", "2", "--batch-size", "4", "--context", "32")
        losses[precision] = [r["loss"] for r in metrics(out)]
        ran = json.loads((out / "run.json").read_text())
        assert ran["mixed_precision"] == precision and ran["world_size"] == 2
    assert {k: ran[k] for k in recorded} == recorded
    assert losses["bf16"] != losses["no"]


def test_short_runs_need_no_warmup_flag(tmp_path):
    out = tmp_path / "short"
    cli("train", "--optimizer", "sgd", "--strategy", "single", "--nproc", "1", "--steps", "3", "--log-every", "1",
        "--batch-size", "2", "--context", "32", "--out", str(out))
    assert json.loads((out / "config.json").read_text())["warmup"] == 0 and len(metrics(out)) == 3


def test_refuses_a_non_empty_out_without_resume(tmp_path):
    (tmp_path / "keep.txt").write_text("mine")
    proc = cli("train", "--out", str(tmp_path), "--steps", "5", "--warmup", "0", check=False)
    assert proc.returncode == 2 and "use --resume" in proc.stderr
    assert [p.name for p in tmp_path.iterdir()] == ["keep.txt"]


def test_compare_writes_one_table_and_plot(tmp_path):
    out = tmp_path / "cmp"
    proc = cli("compare", "--optimizers", "adamw,sgd", "--strategy", "single", "--nproc", "1", "--out", str(out), *SMALL)
    table = (out / "compare.md").read_text()
    assert "| adamw |" in table and "| sgd |" in table
    assert (out / "compare.png").stat().st_size > 1000
    assert "| adamw |" in proc.stdout


def test_state_dtype_int8_reaches_the_optimizer_and_compare_runs_both(tmp_path):
    """--state-dtype int8 gives the optimizer int8 moments (run.json records what it held: about 2
    bytes per element rather than 8); compare runs each optimizer once per state dtype."""
    out = tmp_path / "int8"
    cli("train", "--optimizer", "adamw", "--strategy", "single", "--nproc", "1", "--state-dtype", "int8",
        "--out", str(out), *SMALL)
    ran = json.loads((out / "run.json").read_text())
    assert ran["state_dtype"] == "int8" and ran["params_with_int8_state"] > 0 and ran["state_bytes_per_element"] < 3
    assert metrics(out)[-1]["loss"] < metrics(out)[0]["loss"]
    cmp = tmp_path / "cmp"
    cli("compare", "--optimizers", "sgd", "--state-dtype", "fp32,int8", "--strategy", "single", "--nproc", "1",
        "--out", str(cmp), "--steps", "6", "--warmup", "1", "--log-every", "2", "--eval-every", "6",
        "--ckpt-every", "6", "--batch-size", "4", "--context", "32")
    table = (cmp / "compare.md").read_text()
    assert "| sgd[fp32] |" in table and "| sgd[int8] |" in table
    assert json.loads((cmp / "sgd-int8" / "run.json").read_text())["state_dtype"] == "int8"


def test_a_bad_state_dtype_exits_nonzero_and_writes_nothing(tmp_path):
    proc = cli("train", "--state-dtype", "int4", "--out", str(tmp_path / "y"), check=False)
    assert proc.returncode == 2 and "Invalid state_dtype: 'int4'" in proc.stderr
    assert not (tmp_path / "y").exists()


def test_bf16_weights_with_stochastic_rounding_train_under_fsdp2(tmp_path):
    """--param-dtype bf16 --bf16-update stochastic: the sharded weights are bf16 (no fp32 master
    copy), the optimizer rounds updates stochastically, and the loss falls."""
    out = tmp_path / "bf16"
    cli("train", "--optimizer", "adamw", "--strategy", "fsdp2", "--nproc", "2", "--param-dtype", "bf16",
        "--bf16-update", "stochastic", "--state-dtype", "int8", "--out", str(out), *SMALL)
    ran = json.loads((out / "run.json").read_text())
    assert ran["weights_dtype"] == "torch.bfloat16" and ran["sharded"]
    assert ran["bf16_update"] == "stochastic" and ran["state_dtype"] == "int8"
    assert metrics(out)[-1]["loss"] < metrics(out)[0]["loss"] - 0.3


@pytest.mark.parametrize(
    "args, message",
    [
        (["--bf16-update", "stochastic"], "Invalid bf16_update: 'stochastic' with param_dtype 'fp32'"),
        (["--param-dtype", "bf16", "--bf16-update", "round"], "Invalid bf16_update: 'round'"),
        (["--param-dtype", "bf16", "--strategy", "zero2"], "Invalid param_dtype: 'bf16' with strategy 'zero2'"),
        (["--param-dtype", "fp8"], "Invalid param_dtype: 'fp8'"),
    ],
)
def test_bad_bf16_flags_exit_nonzero_and_write_nothing(tmp_path, args, message):
    proc = cli("train", *args, "--out", str(tmp_path / "z"), check=False)
    assert proc.returncode == 2 and message in proc.stderr, proc.stderr[-500:]
    assert not (tmp_path / "z").exists()
