"""``dist-optim``: train the default char-LM (or compare optimizers on it) on N ranks it launches.

    dist-optim train --optimizer ranger --strategy fsdp2 --nproc 2 --steps 300 --out out/ranger
    dist-optim train --resume out/ranger [--steps 600]
    dist-optim compare --optimizers adamw,ranger,radam,sgd --strategy fsdp2 --nproc 2 --out out/compare
    dist-optim compare --optimizers adamw,ranger --state-dtype fp32,int8 --out out/int8
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

from .train.accelerate_launch import accelerate_values, strategy_from_launcher, under_accelerate
from .train.config import MIXED_PRECISION, STRATEGIES, TrainConfig

FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}


def _add_train_args(p: argparse.ArgumentParser, *, with_optimizer: bool) -> None:
    if with_optimizer:
        p.add_argument("--optimizer", default=None)
    p.add_argument("--strategy", default=None, help=f"one of {', '.join(STRATEGIES)}")
    p.add_argument("--nproc", type=int, default=None)
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--schedule", default=None, help="cosine, linear, step, cyclic or constant (after warmup)")
    p.add_argument("--warmup", type=int, default=None, help="default: min(20, steps // 10)")
    p.add_argument("--accum", type=int, default=None, help="micro-batches per optimizer step")
    p.add_argument("--max-grad-norm", type=float, default=None, help="global clipping norm (0 disables)")
    p.add_argument("--state-dtype", default=None,
                   help="fp32 or int8 (block-wise 8-bit moments); compare takes a comma-separated list")
    p.add_argument("--param-dtype", default=None,
                   help="fp32, or bf16: the model's weights in bf16 with no fp32 master copy (not zero1/2/3)")
    p.add_argument("--bf16-update", default=None,
                   help="with --param-dtype bf16: nearest, stochastic (stochastic rounding) or kahan (a bf16 "
                        "compensation buffer)")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--context", type=int, default=None)
    p.add_argument("--data", default=None, help="a text file (default: the Python standard library's sources)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--mixed-precision", default=None, help=f"one of {', '.join(MIXED_PRECISION)} (fp16: zero1/2/3 only)")
    p.add_argument("--log-every", type=int, default=None)
    p.add_argument("--eval-every", type=int, default=None)
    p.add_argument("--ckpt-every", type=int, default=None)
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out folder")


def _overrides(args: argparse.Namespace) -> dict:
    values = {k: v for k, v in vars(args).items() if k in FIELDS and v is not None}
    if values.get("max_grad_norm") == 0:
        values["max_grad_norm"] = None
    return values


def _worker(rank: int, world: int, init_file: str, cfg: TrainConfig, resume: bool) -> None:
    import torch
    import torch.distributed as dist

    from .train.loop import train

    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world))  # as a launcher would
    if cfg.device == "cpu":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    if cfg.device == "cuda":
        torch.cuda.set_device(rank % torch.cuda.device_count())
    backend = "nccl" if cfg.device == "cuda" else "gloo"
    dist.init_process_group(backend, init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        train(cfg, resume=resume)
    finally:
        dist.destroy_process_group()


def launch(cfg: TrainConfig, *, resume: bool = False) -> None:
    """Run the job on ``cfg.nproc`` ranks (in this process for 'single')."""
    if cfg.strategy == "single":
        from .train.loop import train

        train(cfg, resume=resume)
        return
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as tmp:
        mp.start_processes(
            _worker, args=(cfg.nproc, os.path.join(tmp, "init"), cfg, resume), nprocs=cfg.nproc,
            start_method="spawn", join=True,
        )


def _prepare_out(out: Path, overwrite: bool) -> None:
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise ValueError(f"Invalid out: {str(out)!r} exists and is not empty (use --resume {out}, --overwrite or another --out)")
        shutil.rmtree(out)


def cmd_train(args: argparse.Namespace) -> None:
    if args.resume:
        saved = Path(args.resume) / "config.json"
        if not saved.is_file():
            raise ValueError(f"Invalid resume: {args.resume!r} holds no config.json of an earlier run")
        if args.out not in (None, args.resume):
            raise ValueError(f"Invalid out: {args.out!r} (a resumed run writes into its own folder {args.resume!r})")
        cfg = TrainConfig(**{**json.loads(saved.read_text()), **_overrides(args), "out": args.resume})
        saved.write_text(cfg.to_json())
        launch(cfg, resume=True)
        return
    cfg = TrainConfig(**_overrides(args))
    out = Path(cfg.out)
    _prepare_out(out, args.overwrite)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(cfg.to_json())
    launch(cfg)


def cmd_compare(args: argparse.Namespace) -> None:
    from .train.report import write_plot

    names = [n.strip() for n in args.optimizers.split(",") if n.strip()]
    if not names:
        raise ValueError("Invalid optimizers: '' (give a comma-separated list)")
    out = Path(args.out)
    common = {k: v for k, v in _overrides(args).items() if k not in ("out", "state_dtype")}
    dtypes = [d.strip() for d in (args.state_dtype or "fp32").split(",") if d.strip()]
    # One run per (optimizer, state dtype); a run is named by its optimizer, and its dtype when several.
    runs_of = [(n, d, n if len(dtypes) == 1 else f"{n}[{d}]") for n in names for d in dtypes]
    configs = [TrainConfig(**common, optimizer=n, state_dtype=d, out=str(out / label.replace("[", "-").rstrip("]")))
               for n, d, label in runs_of]  # validate all first
    labels = {cfg.out: label for cfg, (_, _, label) in zip(configs, runs_of)}
    _prepare_out(out, args.overwrite)
    runs, table = {}, []
    for cfg in configs:
        Path(cfg.out).mkdir(parents=True, exist_ok=True)
        (Path(cfg.out) / "config.json").write_text(cfg.to_json())
        launch(cfg)
        rows = [json.loads(line) for line in (Path(cfg.out) / "metrics.jsonl").read_text().splitlines()]
        runs[labels[cfg.out]] = rows
        report = (Path(cfg.out) / "report.md").read_text()
        val = next(line for line in report.splitlines() if line.startswith("| validation loss"))
        table.append((labels[cfg.out], rows[0]["loss"], rows[-1]["loss"], val.split("|")[2].strip()))
    write_plot(out / "compare.png", runs)
    lines = ["| optimizer | first loss | final loss | validation loss |", "|---|---:|---:|---:|"]
    lines += [f"| {n} | {a:.4f} | {b:.4f} | {v} |" for n, a, b, v in table]
    (out / "compare.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def _launched_config(args: argparse.Namespace, env: dict[str, str]) -> TrainConfig:
    """The job as the launcher and the flags describe it (accelerate's config files included)."""
    import torch

    world = int(env.get("WORLD_SIZE", "1"))
    given = _overrides(args)
    if under_accelerate(env):
        values = accelerate_values(env, given, world)
        if env.get("ACCELERATE_USE_CPU", "").lower() == "true":
            values.setdefault("device", "cpu")
    else:
        values = dict(given, launcher="external")
        values.setdefault("strategy", strategy_from_launcher(env))
    if values.get("nproc", world) != world:
        raise ValueError(f"Invalid nproc: {values['nproc']} (the launcher started {world} ranks; set the count there)")
    values["nproc"] = world
    values.setdefault("device", "cuda" if torch.cuda.is_available() else "cpu")
    return TrainConfig(**values)


def launched_main(argv: list[str] | None = None) -> int:
    """Entry point when another launcher started the ranks (``accelerate launch``, ``deepspeed``,
    ``torchrun``): RANK/WORLD_SIZE/MASTER_ADDR come from the environment."""
    import torch
    import torch.distributed as dist

    from .train.cpu_ranks import accelerate_cpu_processes, start_cpu_ranks
    from .train.loop import train

    parser = argparse.ArgumentParser(prog="launch/train.py")
    _add_train_args(parser, with_optimizer=True)
    parser.add_argument("--out", default=None)
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)  # deepspeed's
    args = parser.parse_args(argv)
    env = dict(os.environ)
    try:
        wanted = accelerate_cpu_processes(env)
        if wanted > 1:  # `accelerate launch --cpu` started one process for N: start the N ranks here
            start_cpu_ranks(wanted, sys.argv[1:] if argv is None else argv)
            return 0
        cfg = _launched_config(args, env)
    except ValueError as err:
        # One line, also for accelerate's own multi-line refusals.
        print(f"dist-optim: error: {' '.join(str(err).split())}", file=sys.stderr)
        return 2
    if cfg.strategy != "single" and not dist.is_initialized():
        if cfg.device == "cuda":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl" if cfg.device == "cuda" else "gloo", init_method="env://")
    try:
        if not dist.is_initialized() or dist.get_rank() == 0:
            Path(cfg.out).mkdir(parents=True, exist_ok=True)
            (Path(cfg.out) / "config.json").write_text(cfg.to_json())
        train(cfg)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="dist-optim", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p_train = sub.add_parser("train", help="train the char-LM")
    _add_train_args(p_train, with_optimizer=True)
    p_train.add_argument("--out", default=None)
    p_train.add_argument("--resume", default=None, metavar="DIR", help="continue the run in DIR")
    p_cmp = sub.add_parser("compare", help="train once per optimizer under identical data and seed")
    p_cmp.add_argument("--optimizers", required=True)
    _add_train_args(p_cmp, with_optimizer=False)
    p_cmp.add_argument("--out", default="out/compare")
    args = parser.parse_args(argv)
    if getattr(args, "device", None) is None:
        import torch

        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        {"train": cmd_train, "compare": cmd_compare}[args.command](args)
    except (ValueError, FileNotFoundError) as err:
        print(f"dist-optim: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
