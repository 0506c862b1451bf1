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

int8 state (``state_dtype="int8"``): a rank's checkpoint holds each moment of its partition as
codes + absmax with blocks laid out over the partition (``<key>_codes``, ``<key>_absmax``; see
dist_optim.optim._state_dict). The universal form keeps it quantized in a canonical layout: per
parameter ``<key>_codes`` (uint8 shaped like the parameter) and ``<key>_absmax`` (fp32
[ceil(n / 256)], blocks over the flattened parameter from its element 0). Converting dequantizes
each fragment from its partition's blocks and quantizes the parameter over canonical blocks; loading
dequantizes each new partition's fragments and quantizes over the new partition (or keeps fp32
where the loading optimizer keeps fp32 state: the min-size rule is the partition's). Each of the two
steps is exact for a block that is a block on both sides (a parameter starting on a block boundary
of its partition, away from partition ends) and otherwise one rounding at the new block's scale
(dist_optim.state.checkpoint's bound). fp32 universal folders load into int8 optimizers (quantized
over the partition) and int8 ones into fp32 optimizers (dequantized).
"""

from __future__ import annotations

import os
import re
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch

from ..state.checkpoint import dequantize_pieces
from ..state.layout import CODES_SUFFIX, QBLOCK, absmax_key, code_map, codes_key, quantize_state

META = "meta.pt"
PARAMS = "params"
FP32 = "fp32"


def _per_element(value: Any) -> bool:
    return torch.is_tensor(value) and value.dim() == 1


def _coded(state: dict) -> set[str]:
    """The moments a partition's state holds as codes + absmax."""
    return {k[: -len(CODES_SUFFIX)] for k in state if isinstance(k, str) and k.endswith(CODES_SUFFIX)
            and absmax_key(k[: -len(CODES_SUFFIX)]) in state}


def _moments(state: dict, skip: frozenset[str] = frozenset()) -> list[str]:
    """The per-element state of a partition's state or a universal param file (less ``skip``),
    a moment held as codes + absmax under its own name."""
    coded = _coded(state)
    parts = {codes_key(k) for k in coded} | {absmax_key(k) for k in coded}
    return sorted(coded | {k for k, v in state.items()
                           if k not in parts and k not in skip and torch.is_tensor(v) and v.dim() > 0})


def _fragment(state: dict, key: str, lo: int, hi: int) -> torch.Tensor:
    """fp32 values [lo, hi) of moment ``key`` of a partition's state, whichever form holds it."""
    if key in _coded(state):
        pieces = [(state[codes_key(key)].reshape(-1), state[absmax_key(key)], lo, hi)]
        return dequantize_pieces(pieces, code_map(key), QBLOCK)
    return state[key][lo:hi].float()


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
    quantized: dict[str, set[str]] = defaultdict(set)  # per param, the moments some rank held in int8
    counters: dict[int, dict[str, torch.Tensor]] = defaultdict(dict)
    param_groups = None
    for osd in shards:
        base = osd["base_optimizer_state"]
        param_groups = base["param_groups"]
        for g, flat in enumerate(osd["single_partition_of_fp32_groups"]):
            state = base["state"].get(g, {})
            # Per-element state is 1-D (it may keep the group padding the saved partition drops);
            # counters are 0-dim and the same on every rank.
            coded, moments = _coded(state), _moments(state)
            for key, value in state.items():
                if not _per_element(value):
                    counters[g].setdefault(key, value)
            for name, frag in osd["param_slice_mappings"][g].items():
                cut = slice(frag.start, frag.start + frag.numel)
                pieces[name][FP32].append(flat[cut])
                quantized[name] |= coded
                for key in moments:
                    pieces[name][key].append(_fragment(state, key, cut.start, cut.stop))
    (out / PARAMS).mkdir(parents=True, exist_ok=True)
    for name, by_key in pieces.items():
        whole = {}
        for key, parts in by_key.items():
            values = torch.cat(parts)
            if key in quantized[name]:
                codes, absmax = quantize_state(values, key)
                whole[codes_key(key)], whole[absmax_key(key)] = codes.reshape(shapes[name]), absmax
            else:
                whole[key] = values.reshape(shapes[name]).clone()
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
    flats = zero.single_partition_of_fp32_groups
    # Per group, each per-element state in fp32 over the new partition; put in the optimizer's own
    # form (quantized over the partition where it keeps int8) once every fragment is in.
    values: list[dict[str, torch.Tensor]] = [{} for _ in flats]
    for name, param in engine.module.named_parameters():
        saved = torch.load(universal / PARAMS / f"{name}.pt", map_location="cpu", weights_only=False)
        saved = {k: v.reshape(-1) if torch.is_tensor(v) else v for k, v in saved.items()}
        with torch.no_grad():
            param.copy_(saved[FP32].view(param.shape).to(param.dtype))
        mapping = getattr(param, "_hp_mapping", None)
        if mapping is None:  # no piece of this param in this rank's partition
            continue
        lp, hp = mapping.lp_fragment_address, mapping.hp_fragment_address
        group = mapping.param_group_index
        flat = flats[group]
        flat.data[hp.start : hp.start + hp.numel].copy_(saved[FP32][lp.start : lp.start + lp.numel])
        for key in _moments(saved, skip=frozenset({FP32})):
            target = values[group].setdefault(key, torch.zeros_like(flat, dtype=torch.float32))
            target[hp.start : hp.start + hp.numel].copy_(_fragment(saved, key, lp.start, lp.start + lp.numel))
    # Our optimizers (and Lookahead) put loaded state in the form they keep: moments quantized over
    # the partition where it is int8, slow weights in their dtype.
    stored_form = getattr(inner, "_stored_form", None)
    for g, flat in enumerate(flats):
        state = {key: value.clone() if torch.is_tensor(value) else value
                 for key, value in meta["counters"].get(g, {}).items()}
        state.update(values[g])
        inner.state[flat].clear()
        inner.state[flat].update(stored_form(flat, state) if stored_form is not None else state)
