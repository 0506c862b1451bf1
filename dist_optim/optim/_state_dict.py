"""Loading a state_dict into one of our optimizers: validate everything first, then swap it in.

torch.optim.Optimizer.load_state_dict casts state to the param's dtype (bf16 state for bf16 params)
and aliases the given tensors; we copy state, keep moments fp32 and other float state in its saved
dtype (fp32, bf16 or fp16), and refuse a state_dict from another optimizer class or shape with a
ValueError before anything changes.

Checkpoint form of int8 state (``state_dtype="int8"``), chosen per param by ``saves_int8`` from
its global shape and placements only, so that every rank (and every world size of FSDP2, whose
shards are whole dim-0 slices) picks the same form and DCP can reshard it:

- **int8 form** ``<key>_codes`` (uint8 shaped like the param) + ``<key>_absmax`` (fp32,
  ``layout.saved_absmax_shape``: blocks of 256 over the param flattened row-major, as an unsharded
  param keeps them; [shape[0], m / 256] for m elements per dim-0 slice), both DTensors with the
  param's placements for a DTensor param. Taken when the local shard's in-memory blocks *are* these
  blocks: a plain param of one dim, or of two or more with ``m % 256 == 0``; a DTensor of two or
  more dims with ``m % 256 == 0`` sharded on dim 0 only (FSDP2, HSDP). Saving is zero-copy (views
  of the live codes and absmax) and lossless; DCP reshards codes element-wise and absmax by dim-0
  slice, and a load at any such layout is lossless too (the new shard is again whole blocks).
  1 byte per element plus 4 per 256.
- **fp32 form** ``<key>`` (fp32 shaped like the param, dequantized): every other quantized param
  (a DTensor of one dim, whose shards may split a block; a last dim that is not a multiple of 256;
  a shard on another dim, as tensor parallelism makes). 4 bytes per element, resharded element-wise
  by DCP; quantized again on load, which at the same layout is exact.

Exactness at the same layout, in both forms: quantizing a dequantized block gives its codes and
absmax back (the absmax element dequantizes to +-absmax exactly, and every other element to a table
entry times it, which requantizes to its own code — tests/optim/test_int8_checkpoint.py). A load
therefore always goes through fp32 values (``restore`` dequantizes int8-form entries, the loading
optimizer's ``stored_form`` quantizes them over its own shard): exact where the loading shard holds
whole saved blocks, otherwise one more rounding at the new block's scale
(``state.checkpoint``'s bound). Either state_dtype loads the other's checkpoints in either form.

The two forms name no entry alike, so a DCP load whose target (the loading optimizer's own
``state_dict()``) expects the other form fails on the missing entry rather than copying codes into
an fp32 tensor; ``dist_optim.distributed.checkpoint.load_checkpoint`` converts between the forms.
"""

from __future__ import annotations

import copy
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch.optim import Optimizer

from ..distributed.shard import DTensor, is_dtensor, local_tensor, new_state_like
from ..state.blockwise import num_blocks
from ..state.layout import (ABSMAX_SUFFIX, CODES_SUFFIX, QBLOCK, SIGNED_KEYS, UNSIGNED_KEYS, absmax_key, codes_key,
                            dequantize_state, quantize_state, saved_absmax_shape)

# Per-param counters kept as 0-dim fp32 tensors (torch.optim's convention for "step"), on the CPU
# or, where the kernels read them, on the param's device (the optimizer's ``counter_device``).
COUNTER_KEYS = frozenset({"step", "lookahead_step"})

MOMENT_KEYS = SIGNED_KEYS | UNSIGNED_KEYS
# Float state other than the moments keeps its saved dtype when it is one of these (bf16 slow
# weights, Kahan compensation); anything else becomes fp32, the optimizers' state dtype.
KEPT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

KeyBlocks = Sequence[frozenset[str]]


def check_keys(name: str, pid: Any, keys: set[str], blocks: KeyBlocks) -> None:
    """A param's state is empty, or a union of whole key blocks that includes the first block
    (Lookahead's, which every stepped param has; the optimizer's own keys are the last block):
    anything else comes from another optimizer or configuration."""
    if not keys:
        return
    whole = all(block <= keys or not block & keys for block in blocks)
    if blocks and blocks[0] <= keys and whole and keys <= frozenset().union(*blocks):
        return
    expected = sorted(frozenset().union(*blocks)) if blocks else "no state"
    raise ValueError(
        f"state_dict['state'][{pid!r}] has keys {sorted(keys)}, but {name} with these settings keeps {expected}: "
        "the state_dict comes from a different optimizer class or configuration"
    )


def _restore_value(pid: Any, key: str, value: Any, param: torch.Tensor, counter_device: torch.device) -> torch.Tensor:
    if key in COUNTER_KEYS:
        if isinstance(value, torch.Tensor):
            if value.numel() != 1:
                raise ValueError(f"state_dict['state'][{pid!r}][{key!r}] must be a scalar, got shape {tuple(value.shape)}")
            return value.detach().to(device=counter_device, dtype=torch.float32, copy=True).reshape(())
        return torch.tensor(float(value), dtype=torch.float32, device=counter_device)
    if not isinstance(value, torch.Tensor):
        raise ValueError(f"state_dict['state'][{pid!r}][{key!r}] must be a tensor, got {type(value).__name__}")
    if value.shape != param.shape:
        raise ValueError(
            f"state_dict['state'][{pid!r}][{key!r}] has shape {tuple(value.shape)}, "
            f"but its param has shape {tuple(param.shape)}"
        )
    keep = key not in MOMENT_KEYS and value.dtype in KEPT_DTYPES
    return value.detach().to(device=param.device, dtype=value.dtype if keep else torch.float32, copy=True)


def saves_int8(param: torch.Tensor) -> bool:
    """Whether a quantized moment of ``param`` is checkpointed in int8 form (see the module
    docstring): the in-memory blocks of every rank's shard are the saved blocks. Decided from the
    global shape and the placements, so all ranks agree."""
    shape = saved_absmax_shape(param.shape)
    if shape is None:
        return False
    if not is_dtensor(param):
        return True
    if len(shape) == 1:
        return False
    return all(not pl.is_shard() or pl.dim == 0 for pl in param.placements) and not any(
        pl.is_partial() for pl in param.placements)


def _like(param: torch.Tensor, local: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """``local`` as this rank's piece of a tensor of global ``shape`` placed like ``param``."""
    if not is_dtensor(param):
        return local
    stride = [1] * len(shape)
    for d in range(len(shape) - 2, -1, -1):
        stride[d] = stride[d + 1] * shape[d + 1]
    return DTensor.from_local(local, param.device_mesh, param.placements, run_check=False, shape=tuple(shape),
                              stride=tuple(stride))


def _int8_entries(param: torch.Tensor, codes: torch.Tensor, absmax: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The int8-form entries of one moment: views of the live codes and absmax, no copy."""
    local = local_tensor(param)
    shape = saved_absmax_shape(param.shape)
    local_absmax = (local.shape[0], shape[1]) if len(shape) == 2 else (absmax.numel(),)
    return (_like(param, codes.view(local.shape), param.shape),
            _like(param, absmax.view(local_absmax), shape))


def _fp32_entry(param: torch.Tensor, key: str, codes: torch.Tensor, absmax: torch.Tensor) -> torch.Tensor:
    out = new_state_like(param)
    local = local_tensor(out)
    local.copy_(dequantize_state(codes, absmax, key, local.shape))
    return out


def _from_int8_form(pid: Any, key: str, codes: Any, absmax: Any, param: torch.Tensor) -> torch.Tensor:
    """The fp32 values (laid out like ``param``) of a moment saved in int8 form, after checking
    the entries against the param: a malformed entry raises ValueError naming it."""
    where = f"state_dict['state'][{pid!r}]"
    ck, ak = codes_key(key), absmax_key(key)
    want = saved_absmax_shape(param.shape)
    if not isinstance(codes, torch.Tensor) or codes.dtype != torch.uint8 or codes.shape != param.shape:
        got = f"{codes.dtype} {tuple(codes.shape)}" if isinstance(codes, torch.Tensor) else type(codes).__name__
        raise ValueError(f"{where}[{ck!r}] must be uint8 codes shaped like its param {tuple(param.shape)}, got {got}")
    if want is None:
        raise ValueError(f"{where}[{ck!r}]: a param of shape {tuple(param.shape)} has no int8 checkpoint form "
                         f"(the elements of a dim-0 slice must be a multiple of {QBLOCK}); it is saved in fp32 form")
    if not isinstance(absmax, torch.Tensor) or absmax.dtype != torch.float32 or tuple(absmax.shape) != want:
        got = f"{absmax.dtype} {tuple(absmax.shape)}" if isinstance(absmax, torch.Tensor) else type(absmax).__name__
        raise ValueError(f"{where}[{ak!r}] must be fp32 of shape {want} for a param of shape {tuple(param.shape)}, "
                         f"got {got}")
    local_param, local_codes, local_absmax = local_tensor(param), local_tensor(codes), local_tensor(absmax)
    if local_codes.shape != local_param.shape or local_absmax.numel() != num_blocks(local_codes.numel(), QBLOCK):
        raise ValueError(
            f"{where}[{ck!r}] holds a local piece of shape {tuple(local_codes.shape)} with "
            f"{local_absmax.numel()} absmax values, but this rank's shard of the param has shape "
            f"{tuple(local_param.shape)}: load int8-form entries laid out like the param (DCP's "
            "get_state_dict/set_state_dict, or dist_optim.distributed.checkpoint.load_checkpoint)")
    if is_dtensor(param) and not saves_int8(param):
        raise ValueError(f"{where}[{ck!r}]: this param's shards {param.placements} do not hold whole saved blocks; "
                         "load through dist_optim.distributed.checkpoint.load_checkpoint, which converts")
    device = local_param.device
    return _fp32_entry(param, key, local_codes.detach().reshape(-1).to(device).contiguous(),
                       local_absmax.detach().reshape(-1).to(device).contiguous())


def _fp32_view(pid: Any, pstate: Mapping[str, Any], param: torch.Tensor) -> dict[str, Any]:
    """``pstate`` with each int8-form moment turned into its fp32 form (the keys the optimizer's
    key blocks name); refuses codes in the optimizer's live layout."""
    absmaxes = {k[: -len(ABSMAX_SUFFIX)] for k in pstate if isinstance(k, str) and k.endswith(ABSMAX_SUFFIX)}
    coded = {k[: -len(CODES_SUFFIX)] for k in pstate if isinstance(k, str) and k.endswith(CODES_SUFFIX)}
    live = sorted(absmaxes - coded)
    if live:
        raise ValueError(
            f"state_dict['state'][{pid!r}] holds int8 codes in the optimizer's live layout "
            f"({', '.join(f'{k} with {absmax_key(k)}' for k in live)}): save with the optimizer's own state_dict(), "
            f"which stores each moment as {codes_key(live[0])} + {absmax_key(live[0])} or in fp32 form")
    for key in sorted(coded):
        if key not in MOMENT_KEYS:
            raise ValueError(f"state_dict['state'][{pid!r}][{codes_key(key)!r}]: {key!r} is not a moment kept in int8")
        if key not in absmaxes:
            raise ValueError(f"state_dict['state'][{pid!r}] has {codes_key(key)!r} without {absmax_key(key)!r}")
        if key in pstate:
            raise ValueError(f"state_dict['state'][{pid!r}] holds {key!r} in both int8 and fp32 form")
    if not coded:
        return dict(pstate)
    drop = {codes_key(k) for k in coded} | {absmax_key(k) for k in coded}
    out = {k: v for k, v in pstate.items() if k not in drop}
    for key in sorted(coded):
        out[key] = _from_int8_form(pid, key, pstate[codes_key(key)], pstate[absmax_key(key)], param)
    return out


def restore(
    optimizer: Optimizer,
    state_dict: Mapping[str, Any],
    key_blocks: Callable[[dict[str, Any]], KeyBlocks],
    check_group: Callable[[dict[str, Any]], None],
    counter_device: Callable[[torch.Tensor], torch.device],
    stored_form: Callable[[torch.Tensor, dict[str, torch.Tensor]], dict[str, torch.Tensor]] | None = None,
) -> tuple[defaultdict, list[dict[str, Any]]]:
    """The (state, param_groups) that ``state_dict`` describes for ``optimizer``'s params, fully
    validated; raises ValueError and changes nothing when it does not fit."""
    name = type(optimizer).__name__
    saved_groups, saved_state = state_dict.get("param_groups"), state_dict.get("state")
    if not isinstance(saved_groups, (list, tuple)) or not isinstance(saved_state, Mapping):
        raise ValueError("state_dict must have a 'param_groups' list and a 'state' mapping")
    groups = optimizer.param_groups
    if len(saved_groups) != len(groups):
        raise ValueError(f"state_dict has {len(saved_groups)} param groups, {name} has {len(groups)}")
    new_groups: list[dict[str, Any]] = []
    id_map: dict[Any, tuple[torch.Tensor, dict[str, Any]]] = {}
    for i, (group, saved) in enumerate(zip(groups, saved_groups)):
        if len(saved["params"]) != len(group["params"]):
            raise ValueError(
                f"state_dict param group {i} has {len(saved['params'])} params, {name}'s has {len(group['params'])}"
            )
        # Saved hyperparameters win, as in torch, and as copies (a tensor lr stepped by this
        # optimizer's scheduler must not step the source's); a key the checkpoint lacks (written by
        # an older version, say) keeps the current value.
        hyper = copy.deepcopy({k: v for k, v in saved.items() if k != "params"})
        new_group = {**group, **hyper, "params": group["params"]}
        check_group(new_group)
        new_groups.append(new_group)
        for pid, p in zip(saved["params"], group["params"]):
            id_map[pid] = (p, new_group)
    new_state: defaultdict = defaultdict(dict)
    for pid, pstate in saved_state.items():
        if pid not in id_map:
            raise ValueError(f"state_dict['state'] has an entry for param id {pid!r}, which no param group lists")
        param, group = id_map[pid]
        pstate = _fp32_view(pid, pstate, param)
        check_keys(name, pid, set(pstate), key_blocks(group))
        counters_at = counter_device(param)
        restored = {k: _restore_value(pid, k, v, param, counters_at) for k, v in pstate.items()}
        new_state[param] = stored_form(param, restored) if stored_form is not None else restored
    return new_state, new_groups


def checkpoint_form(params: Sequence[torch.Tensor], state_dict: dict[str, Any]) -> dict[str, Any]:
    """``state_dict`` (torch's packing: ``params`` numbered in param-group order) with each int8
    moment in its checkpoint form: int8 form where ``saves_int8(param)``, else fp32 form (module
    docstring). The packed state's per-param dicts are the live ones, so a converted param gets a
    new dict."""
    state = state_dict["state"]
    for pid, pstate in list(state.items()):
        if not any(isinstance(k, str) and k.endswith(ABSMAX_SUFFIX) for k in pstate):
            continue
        param = params[pid]
        as_int8 = saves_int8(param)
        converted = {}
        for k, v in pstate.items():
            if isinstance(k, str) and k.endswith(ABSMAX_SUFFIX) and k[: -len(ABSMAX_SUFFIX)] in pstate:
                continue
            if absmax_key(k) not in pstate:
                converted[k] = v
            elif as_int8:
                converted[codes_key(k)], converted[absmax_key(k)] = _int8_entries(param, v, pstate[absmax_key(k)])
            else:
                converted[k] = _fp32_entry(param, k, v, pstate[absmax_key(k)])
        state[pid] = converted
    return state_dict


def quantized_form(param: torch.Tensor, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A loaded param state with its moments (fp32, like the param) quantized over the local shard."""
    out = {}
    for k, v in state.items():
        if k in SIGNED_KEYS or k in UNSIGNED_KEYS:
            codes, absmax = quantize_state(local_tensor(v), k)
            out[k], out[absmax_key(k)] = codes, absmax
        else:
            out[k] = v
    return out


def load_into(
    optimizer: Optimizer, state_dict: Mapping[str, Any], restore_fn: Callable, owner: Optimizer | None = None
) -> None:
    """torch's load_state_dict protocol (pre hooks, swap, post hooks) around ``restore_fn``; the new
    state and groups go to ``owner`` (the wrapped optimizer, for Lookahead) or ``optimizer``."""
    state_dict = dict(state_dict)
    for hook in optimizer._optimizer_load_state_dict_pre_hooks.values():
        result = hook(optimizer, state_dict)
        if result is not None:
            state_dict = result
    new_state, new_groups = restore_fn(state_dict)
    Optimizer.__setstate__(owner or optimizer, {"state": new_state, "param_groups": new_groups})
    for hook in optimizer._optimizer_load_state_dict_post_hooks.values():
        hook(optimizer)
