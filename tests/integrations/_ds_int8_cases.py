"""What the int8-state DeepSpeed tests run on each rank (gloo, DS_ACCELERATOR=cpu), and the
one-process references they are compared with.

Under ZeRO our optimizer steps DeepSpeed's tensors, not the model's params: one flat fp32
partition per param group (ZeRO-1/2) or one flat tensor per sub-group (ZeRO-3), and int8 blocks
start at each such tensor's element 0. A rank therefore describes each tensor it steps as a
``Piece``: its param group and the run of model elements it holds (``segments``), read from the
engine. The reference builds the same pieces from the full model in one process and steps them
with the same optimizer, so its blocks are DeepSpeed's blocks.

The model (``model``): two 64 x 129 weights (8256 elements: 4128 per rank) and a small head. By
default the weights and the biases are two param groups (biases without weight decay, the usual
set-up):
- ZeRO-1/2: group 0's partition is 8320 elements per rank (int8), group 1's 98 (fp32 by the
  min-size rule; rank 1's ends in an element of DeepSpeed's alignment padding);
- ZeRO-3, ``sub_group_size`` 4096 (counted in partition elements): sub-groups [W1], [W2] (4128
  per rank, int8), [W3] (64, fp32), [b1, b2, b3] (98, fp32), so step() runs 4 times a step.
With one param group (``grouped=False``), ZeRO-3 makes [W1], [b1, W2] (4193, int8: rank 1's b1
partition ends in a padding element, inside the tensor's first block) and [b2, W3, b3].
No partition boundary above falls on a multiple of the 256-element block, so rank 1's blocks are
not the blocks one process would lay over the whole param: only the pieces' layout reproduces them.
Every rank holds partitions of the same size, so every rank takes the same int8 decision.

Each rank trains on its slice of a global batch. DeepSpeed averages the two ranks' gradients;
halving is exact in binary floating point, so (g0 + g1) / 2 and g0 / 2 + g1 / 2 are the same bits
whichever DeepSpeed computes, and the reference computes the per-rank gradients in one process,
single-threaded like the ranks, to get those bits.
"""

from __future__ import annotations

import copy
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

IN, HIDDEN, OUT = 64, 129, 2
PER_RANK = 3
SUB_GROUP_SIZE = 4096
NO_DECAY_GROUP = 1

SPECS = {
    "AdamW": {"type": "dist_optim.AdamW", "params": {"lr": 0.01, "betas": [0.9, 0.99], "weight_decay": 0.1}},
    "Ranger": {"type": "dist_optim.Ranger", "params": {"lr": 0.01, "k": 2, "alpha": 0.4}},
    "SGD": {"type": "dist_optim.SGD", "params": {"lr": 0.05, "momentum": 0.9, "nesterov": True}},
    "Adagrad": {"type": "dist_optim.Adagrad", "params": {"lr": 0.05}},
    "RMSprop": {"type": "dist_optim.RMSprop", "params": {"lr": 0.001, "momentum": 0.5, "centered": True}},
    # coupled weight decay: the update reads the param itself, padding included
    "SGD+L2": {"type": "dist_optim.SGD", "params": {"lr": 0.05, "momentum": 0.9, "weight_decay": 0.01}},
}
# The moments each family keeps (int8 where the tensor is quantized), besides counters and Ranger's
# fp32 slow weights.
MOMENTS = {"AdamW": 2, "Ranger": 2, "SGD": 1, "Adagrad": 1, "RMSprop": 3, "SGD+L2": 1}


def model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(IN, HIDDEN), nn.Tanh(), nn.Linear(HIDDEN, IN), nn.Tanh(), nn.Linear(IN, OUT))


def param_groups(net: nn.Module, grouped: bool = True) -> list[dict]:
    if not grouped:
        return [{"params": list(net.parameters())}]
    weights = [p for n, p in net.named_parameters() if n.endswith("weight")]
    biases = [p for n, p in net.named_parameters() if n.endswith("bias")]
    return [{"params": weights}, {"params": biases, "weight_decay": 0.0}]


def spec(name: str, state_dtype: str) -> dict:
    out = copy.deepcopy(SPECS[name])
    out["params"]["state_dtype"] = state_dtype
    return out


def global_batch(step: int, world: int):
    gen = torch.Generator().manual_seed(5000 + step)
    return torch.randn(PER_RANK * world, IN, generator=gen), torch.randn(PER_RANK * world, OUT, generator=gen)


def rank_slice(t: torch.Tensor, rank: int) -> torch.Tensor:
    return t[rank * PER_RANK:(rank + 1) * PER_RANK]


def loss_fn(net, x, y):
    return torch.nn.functional.mse_loss(net(x), y)


def ds_config(stage: int, name: str, state_dtype: str, *, offload: bool = False, aligned: bool = False,
              zero_extra: dict | None = None) -> dict:
    """``aligned``: ZeRO-1/2's ``parameter_alignment`` (padding between params in the flat buffer)."""
    zero: dict = {"stage": stage, **(zero_extra or {})}
    if aligned:
        zero["parameter_alignment"] = True
    if stage == 3:
        zero.update(sub_group_size=SUB_GROUP_SIZE, stage3_param_persistence_threshold=0)
    if offload:
        zero["offload_optimizer"] = {"device": "cpu"}
    return {
        "train_micro_batch_size_per_gpu": PER_RANK,
        "gradient_accumulation_steps": 1,
        "zero_optimization": zero,
        "gradient_clipping": 0.0,
        "steps_per_print": 10**9,
        "optimizer": spec(name, state_dtype),
    }


def build(stage: int, name: str, state_dtype: str = "int8", *, offload: bool = False, aligned: bool = False,
          grouped: bool = True, zero_extra: dict | None = None, seed: int = 0):
    """A ds_config naming ours, plain ``deepspeed.initialize`` with param groups: the user's idiom."""
    import deepspeed

    import dist_optim  # noqa: F401 (teaches DeepSpeed's engine our optimizers)

    net = model(seed)
    engine, *_ = deepspeed.initialize(model=net, model_parameters=param_groups(net, grouped),
                                      config=ds_config(stage, name, state_dtype, offload=offload, aligned=aligned,
                                                       zero_extra=zero_extra))
    return engine


@contextmanager
def nan_filled_allocations():
    """``torch.empty`` hands out NaN-filled float tensors: uninitialized memory at its worst, for
    code that reads memory it never wrote."""
    real = torch.empty

    def empty(*args, **kwargs):
        out = real(*args, **kwargs)
        if out.is_floating_point():
            out.fill_(float("nan"))
        return out

    torch.empty = empty
    try:
        yield
    finally:
        torch.empty = real


def train(engine, start: int, steps: int) -> None:
    rank, world = dist.get_rank(), dist.get_world_size()
    for step in range(start, start + steps):
        x, y = global_batch(step, world)
        engine.backward(loss_fn(engine, rank_slice(x, rank), rank_slice(y, rank)))
        engine.step()


def full_params(engine) -> list[torch.Tensor]:
    import deepspeed

    params = list(engine.module.parameters())
    with deepspeed.zero.GatheredParameters(params, enabled=hasattr(params[0], "ds_id")):
        return [p.detach().clone() for p in params]


# --- the layout: which model elements each stepped tensor holds ------------------------------------

@dataclass(frozen=True)
class Piece:
    """One tensor the optimizer steps: its param group, and its elements in order as segments
    (model param index or None for DeepSpeed's padding, first element, length). Elements of a
    param segment past the param's end are padding (ZeRO-3 pads each param's last partition)."""

    group: int
    segments: tuple[tuple[int | None, int, int], ...]

    @property
    def numel(self) -> int:
        return sum(n for _, _, n in self.segments)


def _zero12_pieces(engine) -> list[Piece]:
    """ZeRO-1/2: this rank's partition of each param group's flat buffer (params at DeepSpeed's
    recorded offsets, alignment padding between and after them)."""
    wrapper = engine.optimizer
    index = {id(p): i for i, p in enumerate(engine.module.parameters())}
    pieces = []
    for g, params in enumerate(wrapper.round_robin_bit16_groups):
        rank = dist.get_rank(group=wrapper.real_dp_process_group[g])
        parts = wrapper.parallel_partitioned_bit16_groups[g]
        lo = sum(t.numel() for t in parts[:rank])
        hi = lo + parts[rank].numel()
        segments, at = [], lo
        for p, offset in zip(params, wrapper.round_robin_bit16_offsets[g]):
            start, stop = max(lo, offset), min(hi, offset + p.numel())
            if start >= stop:
                continue
            if start > at:
                segments.append((None, 0, start - at))
            segments.append((index[id(p)], start - offset, stop - start))
            at = stop
        if hi > at:
            segments.append((None, 0, hi - at))
        pieces.append(Piece(g, tuple(segments)))
    return pieces


def _zero3_pieces(engine) -> list[Piece]:
    """ZeRO-3: each sub-group's tensor is this rank's partition of each of its params, in order."""
    wrapper = engine.optimizer
    index = {id(p): i for i, p in enumerate(engine.module.parameters())}
    rank = dist.get_rank()
    pieces = []
    for j, params in enumerate(wrapper.fp16_groups):
        segments = tuple((index[id(p)], rank * p.partition_numel(), p.partition_numel()) for p in params)
        pieces.append(Piece(wrapper.sub_group_to_group_id[j], segments))
    return pieces


def stepped(engine) -> tuple[list[Piece], list[torch.Tensor]]:
    """The pieces this rank steps and DeepSpeed's tensors for them, in the same order."""
    wrapper = engine.optimizer
    if engine.zero_optimization_stage() == 3:
        return _zero3_pieces(engine), list(wrapper.fp32_partitioned_groups_flat)
    return _zero12_pieces(engine), list(wrapper.single_partition_of_fp32_groups)


def piece_values(piece: Piece, flats: list[torch.Tensor]) -> torch.Tensor:
    """The piece's elements taken from the model's flattened params (or grads) ``flats``."""
    parts = []
    for i, start, n in piece.segments:
        if i is None:
            parts.append(torch.zeros(n))
            continue
        got = flats[i][start:start + n]
        parts.append(torch.cat([got, torch.zeros(n - got.numel())]))
    return torch.cat(parts)


def write_back(piece: Piece, values: torch.Tensor, params: list[torch.Tensor]) -> None:
    """Copy the piece's model elements into ``params`` (padding stays behind)."""
    at = 0
    for i, start, n in piece.segments:
        if i is not None:
            flat = params[i].view(-1)
            held = max(0, min(n, flat.numel() - start))
            flat[start:start + held] = values[at:at + held]
        at += n


# --- what the ranks run ---------------------------------------------------------------------------

def states(opt, tensors: list[torch.Tensor]) -> list[dict[str, torch.Tensor]]:
    """A copy of each stepped tensor's optimizer state, as the optimizer holds it."""
    return [{k: v.clone() for k, v in opt.state[t].items()} for t in tensors]


def run(stage: int, name: str, steps: int, *, offload: bool = False, aligned: bool = False, grouped: bool = True,
        nan_memory: bool = False, state_dtype: str = "int8"):
    """(full params, pieces, their states, memory report, pieces whose layout was misread) after ``steps``
    steps on this rank. ``nan_memory``: DeepSpeed builds the engine under ``nan_filled_allocations``
    (with a small reduce bucket: filling its default 5e8-element one would take seconds)."""
    if nan_memory:
        with nan_filled_allocations():
            engine = build(stage, name, state_dtype, offload=offload, aligned=aligned, grouped=grouped,
                           zero_extra={"reduce_bucket_size": 1 << 16})
    else:
        engine = build(stage, name, state_dtype, offload=offload, aligned=aligned, grouped=grouped)
    pieces, tensors = stepped(engine)
    start = [p.reshape(-1) for p in full_params(engine)]
    # The layout as read is DeepSpeed's own (returned, not raised: a rank raising alone would leave
    # the other waiting in a collective).
    misread = [piece for piece, t in zip(pieces, tensors)
               if not torch.equal(piece_values(piece, start), t.detach().cpu())]
    train(engine, 0, steps)
    opt = engine.basic_optimizer
    return full_params(engine), pieces, states(opt, tensors), opt.memory_report(), misread


def run_checkpoint(stage: int, name: str, root: str, steps: int, then: int, resume: bool, *, offload: bool = False):
    """Train ``steps`` and save, then continue ``then`` steps; or (resume) load that checkpoint into
    an engine built from another seed and continue ``then`` steps. Returns the full params and this
    rank's optimizer state (int8 codes and absmax as DeepSpeed's tensors hold them)."""
    if not resume:
        engine = build(stage, name, offload=offload)
        train(engine, 0, steps)
        engine.save_checkpoint(root, tag="ckpt")
    else:
        engine = build(stage, name, offload=offload, seed=7)
        engine.load_checkpoint(root, tag="ckpt")
    state = states(engine.basic_optimizer, stepped(engine)[1])
    train(engine, steps, then)
    return full_params(engine), state


def run_state_accessors(stage: int, name: str, steps: int, keys: tuple[str, ...], value: torch.Tensor):
    """DeepSpeed's per-param accessors after ``steps`` steps: each param's full moments ``keys``, then
    the first param's ``keys[0]`` after ``safe_set_full_optimizer_state(param, value, keys[0])``;
    and this rank's pieces. One param group: ZeRO-1/2 link the state to the params after the first
    group's first step, when a later group has no state yet, so theirs is never reachable (DeepSpeed's
    behaviour with any optimizer that builds state lazily)."""
    from deepspeed.utils import safe_get_full_optimizer_state, safe_set_full_optimizer_state

    engine = build(stage, name, grouped=False)
    train(engine, 0, steps)
    params = list(engine.module.parameters())
    got = {key: [safe_get_full_optimizer_state(p, key).clone() for p in params] for key in keys}
    safe_set_full_optimizer_state(params[0], value, keys[0])
    return got, safe_get_full_optimizer_state(params[0], keys[0]).clone(), stepped(engine)[0]


# --- the one-process references -------------------------------------------------------------------

def _averaged_grads(net: nn.Module, step: int, world: int) -> list[torch.Tensor]:
    """The flattened gradients DeepSpeed averages: each rank's slice backpropagated alone."""
    x, y = global_batch(step, world)
    total = None
    for rank in range(world):
        net.zero_grad()
        loss_fn(net, rank_slice(x, rank), rank_slice(y, rank)).backward()
        grads = [p.grad.reshape(-1).clone() for p in net.parameters()]
        total = grads if total is None else [a + b for a, b in zip(total, grads)]
    return [g / world for g in total]


def _one_thread(fn):
    def wrapped(*args, **kwargs):
        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # as the ranks run: the same matmul kernels, the same bits
        try:
            return fn(*args, **kwargs)
        finally:
            torch.set_num_threads(threads)

    return wrapped


@_one_thread
def layout_reference(name: str, steps: int, world: int, pieces: list[Piece], state_dtype: str = "int8",
                     grouped: bool = True):
    """Our optimizer in one process stepping ``pieces`` (every rank's, built from the full model):
    returns (full params, the optimizer, the piece tensors)."""
    import dist_optim.deepspeed

    net = model()
    params = [p.detach() for p in net.parameters()]
    tensors = [piece_values(piece, [p.reshape(-1) for p in params]).requires_grad_() for piece in pieces]
    groups = [{"params": [t for t, piece in zip(tensors, pieces) if piece.group == g]} for g in range(1 + grouped)]
    if grouped:
        groups[NO_DECAY_GROUP]["weight_decay"] = 0.0
    opt = dist_optim.deepspeed.build_from_config(spec(name, state_dtype), groups)
    for step in range(steps):
        grads = _averaged_grads(net, step, world)
        for piece, t in zip(pieces, tensors):
            t.grad = piece_values(piece, grads)
        opt.step()
        with torch.no_grad():
            for piece, t in zip(pieces, tensors):
                write_back(piece, t.detach(), params)
    return [p.clone() for p in params], opt, tensors


@_one_thread
def plain_reference(name: str, steps: int, world: int, state_dtype: str = "fp32") -> list[torch.Tensor]:
    """Our optimizer in one process on the model's own params (the whole batch's mean loss)."""
    import dist_optim.deepspeed

    net = model()
    groups = param_groups(net)
    opt = dist_optim.deepspeed.build_from_config(spec(name, state_dtype), groups)
    for step in range(steps):
        x, y = global_batch(step, world)
        net.zero_grad()
        loss_fn(net, x, y).backward()
        opt.step()
    return [p.detach().clone() for p in net.parameters()]


def full_moments(pieces: list[Piece], opt, tensors: list[torch.Tensor], key: str) -> list[torch.Tensor]:
    """Each model param's moment ``key`` gathered from the pieces' states, int8 ones dequantized."""
    from dist_optim.state.layout import absmax_key, dequantize_state

    out = [torch.zeros_like(p) for p in model().parameters()]
    for piece, t in zip(pieces, tensors):
        state = opt.state[t]
        quantized = absmax_key(key) in state
        write_back(piece, dequantize_state(state[key], state[absmax_key(key)], key) if quantized else state[key], out)
    return out


def elastic_checkpoint_refusal(stage: int) -> str | None:
    """The error ``deepspeed.initialize`` raises for int8 state with ``elastic_checkpoint: true``."""
    try:
        build(stage, "AdamW", zero_extra={"elastic_checkpoint": True})
    except ValueError as error:
        return str(error)
    return None
