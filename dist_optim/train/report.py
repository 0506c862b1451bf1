"""What rank 0 writes for a person: the loss plot and report.md."""

from __future__ import annotations

from pathlib import Path

from .config import TrainConfig


def optimizer_label(optimizer) -> str:
    """``dist_optim.AdamW``, ``torch.AdamW``, ``dist_optim.Lookahead(dist_optim.RAdam)``: the class and
    the package it comes from, so ours and a framework's same-named optimizer cannot be confused."""
    cls = type(optimizer)
    label = f"{cls.__module__.split('.')[0]}.{cls.__name__}"
    inner = getattr(optimizer, "optimizer", None)
    if inner is not None and inner is not optimizer and hasattr(inner, "param_groups"):
        label += f"({optimizer_label(inner)})"
    return label


def write_plot(path: Path, runs: dict[str, list[dict]]) -> None:
    """Training loss per logged step, one line per run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for name, rows in runs.items():
        if rows:
            ax.plot([r["step"] for r in rows], [r["loss"] for r in rows], label=name)
    ax.set_xlabel("step")
    ax.set_ylabel("training loss (nats/byte)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)


def write_report(path: Path, cfg: TrainConfig, summary: dict, ran: dict) -> None:
    """``ran``: what the runner read back from the engine or model (ZeRO stage, precision, ...)."""
    lines = [
        f"# dist-optim train: {cfg.optimizer} under {cfg.strategy} x {summary['world_size']}",
        "",
        "| | |",
        "|---|---|",
        f"| first logged loss | {summary['first_loss']:.4f} |" if summary["first_loss"] is not None else "| first logged loss | - |",
        f"| final training loss | {summary['final_loss']:.4f} |" if summary["final_loss"] is not None else "| final training loss | - |",
        f"| validation loss | {summary['val_loss']:.4f} |",
        f"| mean step time | {summary['step_ms']:.1f} ms |",
        f"| peak memory (rank 0) | {summary['peak_memory_mb']:.0f} MiB |",
        "",
        "## What ran",
        "",
        "| | |",
        "|---|---|",
        *(f"| {k} | {v} |" for k, v in ran.items()),
        "",
        "## Config",
        "",
        "```json",
        cfg.to_json(),
        "```",
        "",
    ]
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text("\n".join(lines))
    tmp.replace(path)
