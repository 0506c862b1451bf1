"""Loading a state_dict into one of our optimizers: validate everything first, then swap it in.

torch.optim.Optimizer.load_state_dict casts state to the param's dtype (bf16 state for bf16 params)
and aliases the given tensors; we keep state fp32, copy it, and refuse a state_dict from another
optimizer class or shape with a ValueError before anything changes.

int8 state (``state_dtype="int8"``) is checkpointed in fp32 form: ``state_dict()`` dequantizes each
int8 moment into an fp32 tensor laid out like its param (a DTensor for a DTensor param), so DCP
saves and reshards it like any state, and a load quantizes a moment again where the loading
optimizer keeps it in int8. The codes' block layout depends on the shard boundaries, so the fp32 form
is what stays valid at another world size; at the same layout the round trip is exact
(quantizing a dequantized block gives its codes and absmax back: the absmax element dequantizes to
+-absmax exactly, and every other element to a table entry times it, which requantizes to its own
code — tests/optim/test_int8_checkpoint.py). Either mode loads the other's checkpoints.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch.optim import Optimizer

from ..distributed.shard import local_tensor, new_state_like
from ..state.layout import ABSMAX_SUFFIX, SIGNED_KEYS, UNSIGNED_KEYS, absmax_key, dequantize_state, quantize_state

# Per-param counters kept as 0-dim fp32 tensors (torch.optim's convention for "step"), on the CPU
# or, where the kernels read them, on the param's device (the optimizer's ``counter_device``).
COUNTER_KEYS = frozenset({"step", "lookahead_step"})

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
    return value.detach().to(device=param.device, dtype=torch.float32, copy=True)


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
        # Saved hyperparameters win, as in torch; a key the checkpoint lacks (written by an older
        # version, say) keeps the current value.
        new_group = {**group, **saved, "params": group["params"]}
        check_group(new_group)
        new_groups.append(new_group)
        for pid, p in zip(saved["params"], group["params"]):
            id_map[pid] = (p, new_group)
    new_state: defaultdict = defaultdict(dict)
    for pid, pstate in saved_state.items():
        if pid not in id_map:
            raise ValueError(f"state_dict['state'] has an entry for param id {pid!r}, which no param group lists")
        param, group = id_map[pid]
        codes = sorted(k for k in pstate if k.endswith(ABSMAX_SUFFIX))
        if codes:
            raise ValueError(
                f"state_dict['state'][{pid!r}] holds int8 codes ({', '.join(codes)}): save with the optimizer's own "
                "state_dict(), which stores every moment in fp32 form (resharded by DCP, quantized again on load)"
            )
        check_keys(name, pid, set(pstate), key_blocks(group))
        counters_at = counter_device(param)
        restored = {k: _restore_value(pid, k, v, param, counters_at) for k, v in pstate.items()}
        new_state[param] = stored_form(param, restored) if stored_form is not None else restored
    return new_state, new_groups


def fp32_moments(params: Sequence[torch.Tensor], state_dict: dict[str, Any]) -> dict[str, Any]:
    """``state_dict`` (torch's packing: ``params`` numbered in param-group order) with each int8
    moment replaced by its fp32 form shaped like the param and its absmax dropped. The packed state's
    per-param dicts are the live ones, so a converted param gets a new dict."""
    state = state_dict["state"]
    for pid, pstate in list(state.items()):
        if not any(isinstance(k, str) and k.endswith(ABSMAX_SUFFIX) for k in pstate):
            continue
        param = params[pid]
        converted = {}
        for k, v in pstate.items():
            if k.endswith(ABSMAX_SUFFIX):
                continue
            if absmax_key(k) in pstate:
                out = new_state_like(param)
                local = local_tensor(out)
                local.copy_(dequantize_state(v, pstate[absmax_key(k)], k, local.shape))
                v = out
            converted[k] = v
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
