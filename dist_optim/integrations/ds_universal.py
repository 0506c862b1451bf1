"""A world-size-independent ("universal") form of DeepSpeed ZeRO-1/2 checkpoints for every optimizer
state we keep, and loading it into an engine at any data-parallel size.

DeepSpeed's own conversion (ds_to_universal) extracts only Adam's exp_avg/exp_avg_sq. Ours takes
every per-element state tensor the optimizer holds (slow_buffer, momentum_buffer, sum, square_avg,
grad_avg, max_exp_avg_sq, exp_avg, exp_avg_sq) and the per-partition counters (step,
lookahead_step):

    ds_to_universal(".../checkpoint/step_00000100", "universal/")      # offline, any machine
    engine, *_ = dist_optim.deepspeed.initialize(...)                   # at the new world size
    load_universal(engine, "universal/")

Each rank's partition of a parameter group is a run of fragments of the flattened parameters;
DeepSpeed records where (``param_slice_mappings``), so concatenating a parameter's fragments in
rank order gives the whole parameter, and each new rank takes back the fragment its new partition
holds (the engine's ``_hp_mapping`` per parameter says which).
"""

from __future__ import annotations

import os
import re
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch

META = "meta.pt"
PARAMS = "params"
FP32 = "fp32"


def _per_element(value: Any) -> bool:
    return torch.is_tensor(value) and value.dim() == 1


def _rank_files(folder: Path) -> list[Path]:
    files = list(folder.glob("*zero_pp_rank_*_mp_rank_00_optim_states.pt"))
    if not files:
        raise FileNotFoundError(f"no ZeRO optimizer shards (zero_pp_rank_*_optim_states.pt) in {folder}")
    return sorted(files, key=lambda f: int(re.search(r"zero_pp_rank_(\d+)_", f.name).group(1)))


def ds_to_universal(checkpoint: str | os.PathLike, out: str | os.PathLike) -> Path:
    """Convert one saved ZeRO-1/2 checkpoint folder (a tag) into a universal folder."""
    checkpoint, out = Path(checkpoint), Path(out)
    shards = [torch.load(path, map_location="cpu", weights_only=False)["optimizer_state_dict"] for path in _rank_files(checkpoint)]
    for rank, osd in enumerate(shards):
        if int(osd.get("zero_stage", 0)) not in (1, 2):
            raise ValueError(f"Invalid checkpoint: rank {rank}'s shard is ZeRO stage {int(osd.get('zero_stage', 0))}; this converts ZeRO-1/2")
    model_states = torch.load(next(checkpoint.glob("mp_rank_*_model_states.pt")), map_location="cpu", weights_only=False)
    shapes = {name: shape for group in model_states["param_shapes"] for name, shape in group.items()}
    pieces: dict[str, dict[str, list[torch.Tensor]]] = defaultdict(lambda: defaultdict(list))
    counters: dict[int, dict[str, torch.Tensor]] = defaultdict(dict)
    param_groups = None
    for osd in shards:
        base = osd["base_optimizer_state"]
        param_groups = base["param_groups"]
        for g, flat in enumerate(osd["single_partition_of_fp32_groups"]):
            state = base["state"].get(g, {})
            # Per-element state is 1-D (it may keep the group padding the saved partition drops);
            # counters are 0-dim and the same on every rank.
            for key, value in state.items():
                if not _per_element(value):
                    counters[g].setdefault(key, value)
            for name, frag in osd["param_slice_mappings"][g].items():
                cut = slice(frag.start, frag.start + frag.numel)
                pieces[name][FP32].append(flat[cut])
                for key, value in state.items():
                    if _per_element(value):
                        pieces[name][key].append(value[cut])
    (out / PARAMS).mkdir(parents=True, exist_ok=True)
    for name, by_key in pieces.items():
        whole = {key: torch.cat(parts).reshape(shapes[name]).clone() for key, parts in by_key.items()}
        torch.save(whole, out / PARAMS / f"{name}.pt")
    torch.save({"counters": dict(counters), "param_groups": param_groups}, out / META)
    return out


def load_universal(engine: Any, universal: str | os.PathLike) -> None:
    """Fill a ZeRO-1/2 engine (any data-parallel size) from a universal folder: fp32 master weights,
    the model's params, every optimizer state tensor and the counters (every rank calls this)."""
    universal = Path(universal)
    zero = engine.optimizer
    if not hasattr(zero, "single_partition_of_fp32_groups"):
        raise ValueError("Invalid engine: load_universal takes a ZeRO-1/2 engine")
    meta = torch.load(universal / META, map_location="cpu", weights_only=False)
    inner = zero.optimizer
    for g, flat in enumerate(zero.single_partition_of_fp32_groups):
        state = inner.state[flat]
        state.clear()
        for key, value in meta["counters"].get(g, {}).items():
            state[key] = value.clone() if torch.is_tensor(value) else value
    for name, param in engine.module.named_parameters():
        saved = torch.load(universal / PARAMS / f"{name}.pt", map_location="cpu", weights_only=False)
        with torch.no_grad():
            param.copy_(saved[FP32].to(param.dtype))
        mapping = getattr(param, "_hp_mapping", None)
        if mapping is None:  # no piece of this param in this rank's partition
            continue
        lp, hp = mapping.lp_fragment_address, mapping.hp_fragment_address
        group = mapping.param_group_index
        flat = zero.single_partition_of_fp32_groups[group]
        state = inner.state[flat]
        for key, whole in saved.items():
            target = flat if key == FP32 else state.setdefault(key, torch.zeros_like(flat))
            target.data[hp.start : hp.start + hp.numel].copy_(whole.reshape(-1)[lp.start : lp.start + lp.numel])
