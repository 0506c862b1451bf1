"""The training loop run by every rank: deterministic batches, schedule, logging, evaluation,
checkpoints, and rank 0's metrics.jsonl, progress bar, loss plot and report."""

from __future__ import annotations

import json
import resource
import time
import warnings
from pathlib import Path

import torch
import torch.distributed as dist

from ..distributed.checkpoint import checkpoint_extra, latest_checkpoint
from ..distributed.collectives import global_mean
from ..optim import fused_core
from ..optim.schedules import warmup_schedule
from .config import DS_SCHEDULE, TrainConfig
from .data import VOCAB, Corpus, batch
from .model import TinyGPT
from .report import write_plot, write_report
from .strategies import make_runner

EVAL_BATCHES = 4


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


class _EngineSchedules:
    """The loop's scheduler when the ds_config's scheduler sets the lr: DeepSpeed steps that one
    inside engine.step(), and its state travels in the engine's checkpoints."""

    def step(self) -> None:
        pass


def _schedule(cfg: TrainConfig, optimizer):
    if cfg.schedule == DS_SCHEDULE:
        return _EngineSchedules()
    return warmup_schedule(
        optimizer, total_steps=cfg.steps, warmup_steps=cfg.warmup, decay=cfg.schedule,
        step_size=max(1, cfg.steps // 3), cycle_steps=max(2, cfg.steps // 4), min_lr_ratio=0.1,
    )


def _evaluate(cfg: TrainConfig, runner, corpus: Corpus, rank: int) -> float:
    losses = [
        runner.eval_loss(*batch(corpus.val, cfg.batch_size, cfg.context, seed=cfg.seed + 1, step=i, rank=rank))
        for i in range(EVAL_BATCHES)
    ]
    return global_mean(sum(losses) / len(losses))


def _metrics_so_far(path: Path, upto: int) -> list[dict]:
    """The logged steps a resumed run keeps: those its checkpoint covers."""
    if not path.exists():
        return []
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r for r in rows if r["step"] <= upto]


def train(cfg: TrainConfig, *, resume: bool = False) -> dict:
    rank = _rank()
    device = torch.device("cuda", torch.cuda.current_device()) if cfg.device == "cuda" else torch.device("cpu")
    torch.manual_seed(cfg.seed)
    corpus = Corpus.load(cfg.data, cfg.data_bytes)
    model = TinyGPT(VOCAB, cfg.context, cfg.dim, cfg.layers, cfg.heads).to(device, cfg.torch_param_dtype)
    runner = make_runner(cfg, model, device)
    scheduler = _schedule(cfg, runner.optimizer)
    out = Path(cfg.out)
    ckpt_root = out / "checkpoint"
    metrics_path = out / "metrics.jsonl"

    start = 0
    if resume:
        checkpoint = latest_checkpoint(ckpt_root)
        if checkpoint is None:
            raise FileNotFoundError(f"--resume: no checkpoint under {ckpt_root}")
        # The schedulers are chainable (each step scales the current lr), so the schedule is replayed
        # from the fresh lr first. Loading restores the saved lr, which is this schedule's only if
        # the resumed run kept --steps, --lr and the schedule: the replayed lr is put back.
        start = checkpoint_extra(checkpoint)["step"]
        with warnings.catch_warnings():  # replaying the schedule without optimizer steps is the point
            warnings.simplefilter("ignore")
            for _ in range(start):
                scheduler.step()
        replayed = [group["lr"] for group in runner.optimizer.param_groups]
        runner.load(str(checkpoint))
        if not isinstance(scheduler, _EngineSchedules):  # DeepSpeed's scheduler comes back with the engine
            for group, lr in zip(runner.optimizer.param_groups, replayed):
                group["lr"] = lr
    rows = _metrics_so_far(metrics_path, start) if rank == 0 else []
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        metrics_path.write_text("".join(json.dumps(r) + "\n" for r in rows))

    bar = None
    if rank == 0:
        from tqdm import tqdm

        bar = tqdm(total=cfg.steps, initial=start, desc=f"{cfg.optimizer}/{cfg.strategy}", dynamic_ncols=True)
    world = dist.get_world_size() if dist.is_initialized() else 1
    tokens_per_step = cfg.batch_size * cfg.context * cfg.accum * world
    step_times: list[float] = []
    val_loss = None
    for step in range(start + 1, cfg.steps + 1):
        began = time.perf_counter()
        lr = runner.optimizer.param_groups[0]["lr"]
        window = [
            batch(corpus.train, cfg.batch_size, cfg.context, seed=cfg.seed, step=step, rank=rank, micro=i)
            for i in range(cfg.accum)
        ]
        loss, skipped = runner.train_step(window)
        scheduler.step()
        step_times.append(time.perf_counter() - began)
        if step % cfg.log_every == 0 or step == cfg.steps:
            loss = global_mean(loss)
            row = dict(
                step=step, loss=loss, lr=lr, grad_norm=runner.grad_norm,
                tokens_per_s=tokens_per_step / step_times[-1], skipped=skipped,
            )
            if rank == 0:
                rows.append(row)
                with open(metrics_path, "a") as f:
                    f.write(json.dumps(row) + "\n")
                bar.set_postfix(loss=f"{loss:.3f}", lr=f"{lr:.2e}", tok_s=f"{row['tokens_per_s']:.0f}")
        if step % cfg.eval_every == 0 or step == cfg.steps:
            val_loss = _evaluate(cfg, runner, corpus, rank)
        if step % cfg.ckpt_every == 0 or step == cfg.steps:
            runner.save(str(ckpt_root), step, {})
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    if val_loss is None:
        val_loss = _evaluate(cfg, runner, corpus, rank)
    summary = dict(
        final_loss=rows[-1]["loss"] if rows else None,
        first_loss=rows[0]["loss"] if rows else None,
        val_loss=val_loss,
        step_ms=1e3 * sum(step_times) / max(1, len(step_times)),
        peak_memory_mb=_peak_memory_mb(device),
        world_size=world,
    )
    ran = {**runner.facts(), "world_size": world, **_state_facts(runner.optimizer)}
    if rank == 0:
        write_plot(out / "loss.png", {cfg.optimizer: rows})
        write_report(out / "report.md", cfg, summary, ran)
        (out / "run.json").write_text(json.dumps(ran, indent=1) + "\n")
    return summary


def _state_facts(optimizer) -> dict:
    """The optimizer state this rank holds (ours, or ours inside a Lookahead or a DeepSpeed engine)."""
    core = fused_core(optimizer)
    if core is None:
        return {}
    report = core.memory_report()
    return dict(state_dtype=core.state_dtype, state_bytes_per_element=round(report.bytes_per_element, 3),
                params_with_int8_state=report.params_int8, bf16_update=getattr(core, "bf16_update", "nearest"))


def _peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
