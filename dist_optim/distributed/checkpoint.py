"""Checkpoints of model and optimizer through torch.distributed.checkpoint (DCP), reshardable across
world sizes, written so that a crash mid-save loses nothing.

Layout under ``root``: one folder per saved step (``step_00000100/``) and a ``latest`` file naming
the newest complete one. A save writes into a hidden temporary folder, renames it into place once
every rank has finished, and only then replaces ``latest`` (write a temp file, fsync, rename): an
interrupted save leaves the previous checkpoint and ``latest`` as they were.

int8 optimizer state is saved in the form the optimizer's ``state_dict()`` gives (codes + absmax,
or fp32; see dist_optim.optim._state_dict). A load whose optimizer would ask for the other form (an
fp32-state optimizer loading int8 codes, an int8 one loading fp32 moments, a 1-D param saved whole
and loaded sharded) is converted here (``match_saved_forms``): the request is rewritten to the
saved form and the optimizer's load converts. A plain ``dcp.load`` would fail on the missing entry.
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

from ..state.layout import SIGNED_KEYS, UNSIGNED_KEYS, absmax_key, codes_key, dequantize_state
from .collectives import active
from .shard import DTensor, is_dtensor, local_tensor

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


def _like(target: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """An empty tensor of ``dtype`` laid out like ``target`` (a DTensor with its placements)."""
    local = torch.empty(local_tensor(target).shape, dtype=dtype, device=local_tensor(target).device)
    if not is_dtensor(target):
        return local
    return DTensor.from_local(local, target.device_mesh, target.placements, run_check=False, shape=target.shape,
                              stride=target.stride())


def _whole(size, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    return torch.empty(tuple(size), dtype=dtype, device=device)


def match_saved_forms(optim_sd: dict, saved: Any, prefix: str = "optim") -> list:
    """Rewrite ``optim_sd`` (the optimizer's part of a DCP load request, from get_state_dict) so
    that each int8-state moment is requested in the form the checkpoint holds (``saved``: the
    checkpoint's ``state_dict_metadata``, keyed ``<prefix>.state.<fqn>.<key>``). Returns the fixes
    to run once ``dcp.load`` has filled the request: a moment saved as codes but requested in fp32
    form is read whole (codes and absmax, every rank) and dequantized into this rank's shard.
    A moment requested as codes but saved in fp32 is requested in fp32 form, laid out like the
    codes; the optimizer's load quantizes it."""
    fixes = []
    for fqn, pstate in optim_sd.get("state", {}).items():
        where = f"{prefix}.state.{fqn}."
        for key in sorted(SIGNED_KEYS | UNSIGNED_KEYS):  # one order on every rank (str hashes differ)
            ck, ak = codes_key(key), absmax_key(key)
            if ck in pstate and where + ck not in saved and where + key in saved:
                pstate[key] = _like(pstate.pop(ck), torch.float32)
                pstate.pop(ak, None)
            elif key in pstate and where + key not in saved and where + ck in saved and where + ak in saved:
                target = pstate.pop(key)
                device = local_tensor(target).device
                pstate[ck] = _whole(saved[where + ck].size, device, torch.uint8)
                pstate[ak] = _whole(saved[where + ak].size, device, torch.float32)
                fixes.append((pstate, key, target))
    return [lambda f=f: _dequantize_into(*f) for f in fixes]


def _dequantize_into(pstate: dict, key: str, target: torch.Tensor) -> None:
    codes, absmax = pstate.pop(codes_key(key)), pstate.pop(absmax_key(key))
    values = dequantize_state(codes.reshape(-1), absmax.reshape(-1).contiguous(), key, codes.shape)
    if is_dtensor(target):
        # every rank holds the whole values: cutting its shard out needs no communication
        from torch.distributed.tensor import distribute_tensor

        shard = distribute_tensor(values, target.device_mesh, target.placements, src_data_rank=None)
        local_tensor(target).copy_(local_tensor(shard))
    else:
        target.copy_(values)
    pstate[key] = target


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
    saved = dcp.FileSystemReader(str(path)).read_metadata().state_dict_metadata
    fixes = match_saved_forms(optim_sd, saved)
    dcp.load(state, checkpoint_id=str(path))
    for fix in fixes:
        fix()
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    return checkpoint_extra(path)
