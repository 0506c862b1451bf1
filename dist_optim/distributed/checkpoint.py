"""Checkpoints of model and optimizer through torch.distributed.checkpoint (DCP), reshardable across
world sizes, written so that a crash mid-save loses nothing.

Layout under ``root``: one folder per saved step (``step_00000100/``) and a ``latest`` file naming
the newest complete one. A save writes into a hidden temporary folder, renames it into place once
every rank has finished, and only then replaces ``latest`` (write a temp file, fsync, rename): an
interrupted save leaves the previous checkpoint and ``latest`` as they were.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from .collectives import active

LATEST = "latest"
EXTRA = "extra.json"


def _barrier() -> None:
    if active():
        dist.barrier()


def _is_writer() -> bool:
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def commit(root: Path, tmp: Path, final: Path, extra: dict, keep: int) -> None:
    """Rank 0, after every rank has written ``tmp``: record ``extra``, move ``tmp`` into place,
    point ``latest`` at it (atomically) and drop all but the newest ``keep`` checkpoints."""
    _write_atomic(tmp / EXTRA, json.dumps(extra))
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    _write_atomic(root / LATEST, final.name)
    for old in sorted(root.glob("step_*"))[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)


def paths(root: str | os.PathLike, step: int) -> tuple[Path, Path, Path]:
    """(root, the step's hidden temporary folder, its final folder)."""
    root = Path(root)
    return root, root / f".tmp_step_{step:08d}", root / f"step_{step:08d}"


def save_checkpoint(
    root: str | os.PathLike, model: torch.nn.Module, optimizer: Any, *, step: int, extra: dict | None = None, keep: int = 2
) -> Path:
    """Save ``model`` and ``optimizer`` (every rank calls this) as ``root/step_<step>``; ``extra`` is a
    JSON-able dict (data position, RNG seeds, ...). Keeps the newest ``keep`` checkpoints."""
    root, tmp, final = paths(root, step)
    if _is_writer():
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
    _barrier()
    model_sd, optim_sd = get_state_dict(model, optimizer)
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(tmp))
    _barrier()
    if _is_writer():
        commit(root, tmp, final, {"step": step, **(extra or {})}, keep)
    _barrier()
    return final


def latest_checkpoint(root: str | os.PathLike) -> Path | None:
    """The newest complete checkpoint under ``root``, or None."""
    root = Path(root)
    try:
        name = (root / LATEST).read_text().strip()
    except FileNotFoundError:
        return None
    return root / name


def checkpoint_extra(path: str | os.PathLike) -> dict:
    """The ``extra`` dict (with ``step``) saved with a complete checkpoint folder."""
    return json.loads((Path(path) / EXTRA).read_text())


def load_checkpoint(path: str | os.PathLike, model: torch.nn.Module, optimizer: Any) -> dict:
    """Load into ``model`` and ``optimizer`` (every rank calls this; any world size) from a
    checkpoint folder or a root holding ``latest``; returns the saved ``extra`` dict."""
    path = Path(path)
    if (path / LATEST).exists():
        path = latest_checkpoint(path)
    if not (path / EXTRA).exists():
        raise FileNotFoundError(f"no complete checkpoint at {path}")
    model_sd, optim_sd = get_state_dict(model, optimizer)
    state = {"model": model_sd, "optim": optim_sd}
    dcp.load(state, checkpoint_id=str(path))
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    return checkpoint_extra(path)
