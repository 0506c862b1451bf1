"""What the FSDP2 route tests run on every rank: each user route (torchtitan's per-block
``fully_shard`` without a mesh, HSDP, TP x FSDP, mixed precision, CPU offload, frozen and tied params,
two param groups, DCP, accelerate's parameter swap) trained twice in the same worker, once with our
optimizer and once with ``torch.optim`` (+ ``torch.nn.utils.clip_grad_norm_``), in the identical
setup: same model, same data, same sharding. The results come back as full tensors by param name.

The model is a tiny language model with uneven shards by design (vocab 11, width 5: 6/5 and 3/2
rows at world 2). torch.optim has no Ranger or Lookahead: their reference is torch.optim.RAdam /
AdamW inside ``PlainLookahead`` (the paper's rule written out, on DTensors).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

import dist_optim

VOCAB, DIM, HIDDEN, SEQ, PER_RANK = 11, 5, 6, 4, 2
LR = 0.01
WEIGHT_DECAY = 0.1
K, ALPHA = 3, 0.3


# --- the model and its data ----------------------------------------------------------------------

class Block(nn.Module):
    """Pre-norm MLP with a residual: the norm is what TP leaves alone (only FSDP shards it)."""

    def __init__(self) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(DIM)
        self.up = nn.Linear(DIM, HIDDEN)
        self.down = nn.Linear(HIDDEN, DIM)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h + self.down(torch.tanh(self.up(self.norm(h))))


class TinyLM(nn.Module):
    def __init__(self, *, tied: bool = False, aux: bool = False, n_blocks: int = 2) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, DIM)
        self.blocks = nn.ModuleList(Block() for _ in range(n_blocks))
        self.norm = nn.LayerNorm(DIM)
        self.head = nn.Linear(DIM, VOCAB, bias=False)
        if tied:  # embedding/output tying, as HF's tie_word_embeddings
            self.head.weight = self.embed.weight
        # A branch some steps skip: its params get no grad on those steps.
        self.aux = nn.Linear(DIM, VOCAB) if aux else None

    # What accelerate's fsdp2_prepare_model looks for on a transformers model.
    def get_input_embeddings(self) -> nn.Module:
        return self.embed

    def get_output_embeddings(self) -> nn.Module:
        return self.head

    def forward(self, ids: torch.Tensor, use_aux: bool = True) -> torch.Tensor:
        h = self.embed(ids)
        for block in self.blocks:
            h = block(h)
        h = self.norm(h)
        logits = self.head(h)
        if self.aux is not None and use_aux:
            logits = logits + self.aux(h)
        return logits


def make_model(seed: int = 0, **kw) -> TinyLM:
    torch.manual_seed(seed)
    return TinyLM(**kw)


def global_batch(step: int, n_data_ranks: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1000 + step)
    ids = torch.randint(VOCAB, (PER_RANK * n_data_ranks, SEQ), generator=gen)
    return ids, torch.randint(VOCAB, (PER_RANK * n_data_ranks, SEQ), generator=gen)


def data_slice(t: torch.Tensor, index: int, n: int) -> torch.Tensor:
    per = t.shape[0] // n
    return t[index * per : (index + 1) * per]


def lm_loss(net, ids, targets, use_aux: bool = True) -> torch.Tensor:
    logits = net(ids, use_aux)
    return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())


def uses_aux(step: int) -> bool:
    return step % 2 == 1  # the aux branch has no grad on even steps (step 0 included: its state starts late)


# --- sharding, as each kind of user writes it ----------------------------------------------------

def shard_per_block(net: nn.Module, **fsdp_kw) -> nn.Module:
    """torchtitan's way: each block, then the root, each ``fully_shard`` building its own mesh."""
    from torch.distributed.fsdp import fully_shard

    for block in net.blocks:
        fully_shard(block, **fsdp_kw)
    fully_shard(net, **fsdp_kw)
    return net


def fsdp_kwargs(route: str) -> dict:
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy

    if route == "mixed_precision":
        return {"mp_policy": MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)}
    if route == "cpu_offload":
        return {"offload_policy": CPUOffloadPolicy(pin_memory=False)}
    return {}


# --- optimizers: ours and torch's, configured alike ------------------------------------------------

def param_groups(net: nn.Module, two_groups: bool):
    """One group, or the usual two: weight decay on matrices, none on norms and biases."""
    params = list(net.parameters())
    if not two_groups:
        return params
    return [
        {"params": [p for p in params if p.ndim >= 2]},
        {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
    ]


class PlainLookahead:
    """Every k inner steps: slow += alpha * (fast - slow); fast = slow, for every param, starting
    from slow = the params' initial values (the paper's rule, written out; works on DTensors)."""

    def __init__(self, inner: torch.optim.Optimizer, k: int, alpha: float) -> None:
        self.inner, self.k, self.alpha = inner, k, alpha
        self.params = [p for g in inner.param_groups for p in g["params"]]
        self.slow: dict[torch.Tensor, torch.Tensor] = {}
        self.count = 0

    @property
    def param_groups(self):
        return self.inner.param_groups

    @torch.no_grad()
    def step(self) -> None:
        if not self.slow:
            self.slow = {p: p.detach().clone() for p in self.params}
        self.inner.step()
        self.count += 1
        if self.count % self.k == 0:
            for p in self.params:
                s = self.slow[p]
                s.add_(self.alpha * (p - s))
                p.copy_(s)

    def zero_grad(self) -> None:
        self.inner.zero_grad()

    def state_of(self, p: torch.Tensor) -> dict[str, torch.Tensor]:
        state = dict(self.inner.state.get(p, {}))
        if p in self.slow and p.requires_grad:  # a frozen param's slow weight is itself: no state kept
            state["slow_buffer"] = self.slow[p]
        return state


def ours(name: str, groups, **kw):
    """Our optimizer: default nonfinite="skip" (so the grad statistics always run), torch backend."""
    kw = {"backend": "torch", **kw}
    if name == "AdamW":
        return dist_optim.AdamW(groups, lr=LR, weight_decay=WEIGHT_DECAY, **kw)
    if name == "SGD":
        return dist_optim.SGD(groups, lr=0.05, momentum=0.9, weight_decay=0.01, **kw)
    if name == "Ranger":
        return dist_optim.Ranger(groups, lr=LR, k=K, alpha=ALPHA, **kw)
    if name == "Lookahead(AdamW)":
        return dist_optim.Lookahead(dist_optim.AdamW(groups, lr=LR, weight_decay=WEIGHT_DECAY, **kw), k=K, alpha=ALPHA)
    raise KeyError(name)


def reference(name: str, groups):
    """torch.optim with the same algorithm and hyperparameters (foreach=False: the plain loop)."""
    if name == "AdamW":
        return torch.optim.AdamW(groups, lr=LR, weight_decay=WEIGHT_DECAY, foreach=False)
    if name == "SGD":
        return torch.optim.SGD(groups, lr=0.05, momentum=0.9, weight_decay=0.01, foreach=False)
    if name == "Ranger":  # Ranger's defaults: betas (0.95, 0.999), eps 1e-5, RAdam's threshold 5
        return PlainLookahead(torch.optim.RAdam(groups, lr=LR, betas=(0.95, 0.999), eps=1e-5, foreach=False), K, ALPHA)
    if name == "Lookahead(AdamW)":
        return PlainLookahead(torch.optim.AdamW(groups, lr=LR, weight_decay=WEIGHT_DECAY, foreach=False), K, ALPHA)
    raise KeyError(name)


def make_optimizer(side: str, name: str, groups, max_grad_norm: float | None):
    """``side`` "ours" (with ``max_grad_norm``) or "torch" (whose caller clips with torch's function)."""
    return ours(name, groups, max_grad_norm=max_grad_norm) if side == "ours" else reference(name, groups)


# --- reading results back ------------------------------------------------------------------------

def full(t: torch.Tensor) -> torch.Tensor:
    t = t.full_tensor() if hasattr(t, "full_tensor") else t
    return t.detach().float().clone()


def named_full_params(net: nn.Module) -> dict[str, torch.Tensor]:
    return {n: full(p) for n, p in net.named_parameters()}


def named_full_state(net: nn.Module, opt) -> dict[str, dict[str, torch.Tensor]]:
    out = {}
    for n, p in net.named_parameters():
        state = opt.state_of(p) if isinstance(opt, PlainLookahead) else opt.state.get(p, {})
        out[n] = {k: full(v) for k, v in state.items()}
    return out


# --- one training run, as the user of each route writes it ----------------------------------------

def train(side: str, name: str, steps: int, *, route: str = "per_block", max_grad_norm: float | None = None,
          two_groups: bool = False, tied: bool = False, frozen: bool = False, aux: bool = False):
    """One run on this rank's data slice under FSDP2; ``side`` is "ours" or "torch". Returns the
    full params and state by name and the grad norm of every step (ours: ``last_grad_norm``;
    torch: what ``clip_grad_norm_`` returned)."""
    rank, world = dist.get_rank(), dist.get_world_size()
    net = make_model(tied=tied, aux=aux)
    if frozen:  # a frozen block part, as in partial fine-tuning; still handed to the optimizer
        net.blocks[0].up.requires_grad_(False)
    shard_per_block(net, **fsdp_kwargs(route))
    groups = param_groups(net, two_groups)
    opt = make_optimizer(side, name, groups, max_grad_norm)
    norms = []
    for step in range(steps):
        ids, targets = global_batch(step, world)
        lm_loss(net, data_slice(ids, rank, world), data_slice(targets, rank, world), use_aux=uses_aux(step)).backward()
        if aux and not uses_aux(step):
            assert all(p.grad is None for p in net.aux.parameters()), "FSDP2 gave the unused branch a grad"
        step_and_record_norm(side, net, opt, max_grad_norm, norms)
    return net, opt, norms


def step_and_record_norm(side: str, net, opt, max_grad_norm, norms: list, clip=torch.nn.utils.clip_grad_norm_) -> None:
    """One step after backward. torch's side clips first with ``clip`` (when ``max_grad_norm`` is set)
    and records what it returns; ours clips inside ``step()`` and records ``last_grad_norm``."""
    if side == "torch" and max_grad_norm is not None:
        norms.append(float(clip(net.parameters(), max_grad_norm)))
    opt.step()
    opt.zero_grad()
    if side == "ours":
        norms.append(opt.last_grad_norm)


def run_route_pair(name: str, steps: int, **kw):
    """Ours and torch.optim in the identical setup, one after the other on this rank."""
    results = {}
    for side in ("ours", "torch"):
        net, opt, norms = train(side, name, steps, **kw)
        results[side] = (named_full_params(net), named_full_state(net, opt), norms)
    return results


def run_reference_alone(name: str, steps: int, **kw):
    net, opt, norms = train("torch", name, steps, **kw)
    return named_full_params(net), norms


# --- DCP round trip ------------------------------------------------------------------------------

def _train_steps(net, opt, start: int, stop: int) -> None:
    rank, world = dist.get_rank(), dist.get_world_size()
    for step in range(start, stop):
        ids, targets = global_batch(step, world)
        lm_loss(net, data_slice(ids, rank, world), data_slice(targets, rank, world), use_aux=uses_aux(step)).backward()
        opt.step()
        opt.zero_grad()


def _dcp_model(seed: int, frozen: bool, aux: bool) -> nn.Module:
    net = make_model(seed=seed, aux=aux)
    if frozen:
        net.blocks[0].up.requires_grad_(False)
    return shard_per_block(net)


def run_dcp_round_trip(name: str, root: str, before: int, after: int, flatten: bool, max_grad_norm: float | None,
                       frozen: bool = False, aux: bool = False, side: str = "ours"):
    """Train ``before`` steps, save with DCP (the user's own calls), train ``after`` more; then a
    fresh model (another init) and optimizer load the checkpoint and train the same ``after`` steps.
    Returns both runs' params and state, which must be bitwise equal. (``side="torch"`` runs
    torch.optim through the same calls, to tell DCP's own limits from ours.)"""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict

    options = StateDictOptions(flatten_optimizer_state_dict=flatten)

    net = _dcp_model(0, frozen, aux)
    opt = make_optimizer(side, name, param_groups(net, two_groups=True), max_grad_norm)
    _train_steps(net, opt, 0, before)
    model_sd, optim_sd = get_state_dict(net, opt, options=options)
    flat = all(isinstance(k, str) and k.startswith(("state.", "param_groups.")) for k in optim_sd)
    assert flat == flatten, sorted(optim_sd)[:4]
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=root)
    _train_steps(net, opt, before, before + after)
    uninterrupted = (named_full_params(net), named_full_state(net, opt), getattr(opt, "skipped_steps", 0))

    net = _dcp_model(123, frozen, aux)  # everything must come from the checkpoint
    opt = make_optimizer(side, name, param_groups(net, two_groups=True), max_grad_norm)
    model_sd, optim_sd = get_state_dict(net, opt, options=options)
    state = {"model": model_sd, "optim": optim_sd}
    dcp.load(state, checkpoint_id=root)
    set_state_dict(net, opt, model_state_dict=state["model"], optim_state_dict=state["optim"], options=options)
    _train_steps(net, opt, before, before + after)
    resumed = (named_full_params(net), named_full_state(net, opt), getattr(opt, "skipped_steps", 0))
    return uninterrupted, resumed


# --- accelerate's FSDP2 parameter swap -------------------------------------------------------------

def accelerate_prepare(net: nn.Module, opt) -> nn.Module:
    """What ``Accelerator._prepare_fsdp2`` does to a model and the optimizer built on its plain
    params (accelerate 1.x): remember each param's data_ptr by name, swap the optimizer's params for
    1-element placeholders carrying that data_ptr, shard with accelerate's own
    ``fsdp2_prepare_model`` (a transformer-block wrap policy and no mesh: ``fully_shard`` per Block,
    the embedding, [final norm, head] as one unit, then the root), map old data_ptr -> new sharded
    param by name and call ``fsdp2_switch_optimizer_parameters``. ``Accelerator.prepare`` does not
    shard on CPU, so an object carrying only what ``fsdp2_prepare_model`` reads stands in for it."""
    from types import SimpleNamespace

    from accelerate.utils import FullyShardedDataParallelPlugin
    from accelerate.utils.fsdp_utils import (
        fsdp2_canonicalize_names,
        fsdp2_prepare_model,
        fsdp2_switch_optimizer_parameters,
    )

    plugin = FullyShardedDataParallelPlugin(
        fsdp_version=2,
        auto_wrap_policy="transformer_based_wrap",
        transformer_cls_names_to_wrap=["Block"],
        reshard_after_forward=True,
        cpu_ram_efficient_loading=False,
    )
    accelerator = SimpleNamespace(
        state=SimpleNamespace(fsdp_plugin=plugin), torch_device_mesh=None, mixed_precision="no", is_main_process=True,
        device=torch.device("cpu"),  # accelerate >= 1.16 places ignored modules there
    )
    # Accelerator._get_named_parameters(..., drop_refs=True), then the placeholder swap.
    old_named_params = fsdp2_canonicalize_names({n: p.data_ptr() for n, p in net.named_parameters()})
    for group in opt.param_groups:
        for i, p in enumerate(group["params"]):
            group["params"][i] = torch.empty(1, dtype=p.dtype, device=p.device)
            group["params"][i].data_ptr = p.data_ptr()
    net = fsdp2_prepare_model(accelerator, net)
    new_named_params = fsdp2_canonicalize_names(dict(net.named_parameters()))
    mapping = {p: new_named_params[n] for n, p in old_named_params.items()}
    fsdp2_switch_optimizer_parameters(opt, mapping)
    return net


def run_accelerate_swap(name: str, steps: int, max_grad_norm: float | None, tied: bool):
    from torch.distributed.fsdp import FSDPModule

    rank, world = dist.get_rank(), dist.get_world_size()
    results = {}
    for side in ("ours", "torch"):
        net = make_model(tied=tied)
        groups = param_groups(net, two_groups=True)
        opt = make_optimizer(side, name, groups, max_grad_norm)
        net = accelerate_prepare(net, opt.inner if isinstance(opt, PlainLookahead) else opt)
        if isinstance(opt, PlainLookahead):
            opt.params = [p for g in opt.inner.param_groups for p in g["params"]]
        assert all(hasattr(p, "full_tensor") for g in opt.param_groups for p in g["params"])
        wrapped = {n for n, m in net.named_modules() if isinstance(m, FSDPModule)}
        assert wrapped == {"", "blocks.0", "blocks.1", "embed", "norm", "head"}, wrapped
        norms = []
        for step in range(steps):
            ids, targets = global_batch(step, world)
            lm_loss(net, data_slice(ids, rank, world), data_slice(targets, rank, world)).backward()
            step_and_record_norm(side, net, opt, max_grad_norm, norms)
        results[side] = (named_full_params(net), named_full_state(net, opt), norms)
    return results


# --- world 4: HSDP and TP x FSDP -----------------------------------------------------------------

def clip_across_meshes(params, max_norm: float) -> torch.Tensor:
    """``clip_grad_norm_`` for grads on more than one device mesh (TP x FSDP's 2-D mesh beside the
    1-D "dp" mesh of the norms): torch's own stacks the per-grad norms and refuses DTensors of
    different meshes, so, as torchtitan does, take each mesh's total norm, ``full_tensor()`` it,
    combine, and scale with ``clip_grads_with_norm_``."""
    params = list(params)
    by_mesh: dict = {}
    for p in params:
        if p.grad is not None:
            by_mesh.setdefault(getattr(p.grad, "device_mesh", None), []).append(p.grad)
    norms = [torch.nn.utils.get_total_norm(grads) for grads in by_mesh.values()]
    total = torch.linalg.vector_norm(torch.stack([full(n) for n in norms]))
    torch.nn.utils.clip_grads_with_norm_(params, max_norm, total, foreach=False)
    return total


def hsdp_shard(net: nn.Module) -> nn.Module:
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("replicate", "shard"))
    return shard_per_block(net, mesh=mesh)


def tp_fsdp_shard(net: nn.Module):
    """Megatron-style TP inside each block (up: column-parallel, down: row-parallel) on the "tp"
    sub-mesh, then FSDP2 on the "dp" sub-mesh. Norms, the embedding and the head are only
    DP-sharded. Returns (net, this rank's data-parallel index, the data-parallel degree)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "tp"))
    for block in net.blocks:
        parallelize_module(block, mesh["tp"], {"up": ColwiseParallel(), "down": RowwiseParallel()})
    shard_per_block(net, mesh=mesh["dp"])
    return net, mesh["dp"].get_local_rank(), mesh["dp"].size()


def run_mesh_pair(layout: str, name: str, steps: int, max_grad_norm: float | None):
    """Ours and torch.optim (+ clip_grad_norm_) on the same HSDP or TP x FSDP layout."""
    results = {}
    for side in ("ours", "torch"):
        net = make_model()
        if layout == "hsdp":
            net = hsdp_shard(net)
            index, n_data = dist.get_rank(), dist.get_world_size()  # 2 replicas x 2 shards: 4 data ranks
        else:
            net, index, n_data = tp_fsdp_shard(net)
        groups = param_groups(net, two_groups=True)
        opt = make_optimizer(side, name, groups, max_grad_norm)
        norms = []
        for step in range(steps):
            ids, targets = global_batch(step, n_data)
            lm_loss(net, data_slice(ids, index, n_data), data_slice(targets, index, n_data)).backward()
            clip = torch.nn.utils.clip_grad_norm_ if layout == "hsdp" else clip_across_meshes
            step_and_record_norm(side, net, opt, max_grad_norm, norms, clip=clip)
        results[side] = (named_full_params(net), named_full_state(net, opt), norms)
        # Per param: its mesh's ndim and, per mesh dim, whether the param is replicated along it.
        results[side + "_layout"] = {
            n: (p.device_mesh.ndim, tuple(pl.is_replicate() for pl in p.placements)) for n, p in net.named_parameters()
        }
    return results


def one_process(name: str, steps: int, n_data: int, max_grad_norm: float | None, side: str = "torch"):
    """The same training in one process on the whole global batch (the mean loss over it is what
    data-parallel averaging computes), with our optimizer or torch's."""
    net = make_model()
    groups = param_groups(net, two_groups=True)
    opt = make_optimizer(side, name, groups, max_grad_norm)
    norms = []
    for step in range(steps):
        ids, targets = global_batch(step, n_data)
        lm_loss(net, ids, targets).backward()
        step_and_record_norm(side, net, opt, max_grad_norm, norms)
    return named_full_params(net), norms


# --- non-finite agreement --------------------------------------------------------------------------

def run_nan_on_the_last_rank(layout: str, name: str, param: str):
    """Two good steps with clipping, then a step where only the last rank's local grad of ``param``
    holds a NaN (under TP x FSDP that rank is a "tp" replica whose copy of a DP-only norm is not
    counted in the norm: its flag must count all the same). Every rank must skip it, changing nothing."""
    rank, world = dist.get_rank(), dist.get_world_size()
    net = make_model()
    if layout == "tp":
        net, index, n_data = tp_fsdp_shard(net)
    elif layout == "hsdp":
        net, index, n_data = hsdp_shard(net), rank, world
    else:
        net, index, n_data = shard_per_block(net), rank, world
    opt = ours(name, param_groups(net, two_groups=True), max_grad_norm=0.05)
    for step in range(3):
        ids, targets = global_batch(step, n_data)
        lm_loss(net, data_slice(ids, index, n_data), data_slice(targets, index, n_data)).backward()
        if step == 2:
            before = (named_full_params(net), named_full_state(net, opt))
            if rank == world - 1:
                grad = dict(net.named_parameters())[param].grad
                local = grad.to_local() if hasattr(grad, "to_local") else grad
                assert local.numel() > 0
                local.view(-1)[0] = float("nan")
        opt.step()
        opt.zero_grad()
    after = (named_full_params(net), named_full_state(net, opt))
    same_params = all(torch.equal(before[0][n], after[0][n]) for n in before[0])
    same_state = all(
        torch.equal(before[1][n][k], after[1][n][k]) for n in before[1] for k in before[1][n]
    ) and all(before[1][n].keys() == after[1][n].keys() for n in before[1])
    return opt.skipped_steps, same_params, same_state


def assert_same_as_torch(results, tol: dict, norm_rel: float, *, clip: float | None) -> None:
    """Every rank: params, the state keys torch keeps (ours may keep more, e.g. lookahead_step) and,
    when ``clip`` is given, the grad norm of every step (each above ``clip``: clipping really was
    active), equal to torch.optim's within ``tol`` / ``norm_rel``."""
    import pytest

    for rank_result in results:
        (params, state, norms), (ref_params, ref_state, ref_norms) = rank_result["ours"], rank_result["torch"]
        assert params.keys() == ref_params.keys()
        for name in ref_params:
            torch.testing.assert_close(params[name], ref_params[name], **tol, msg=lambda m: f"{name}: {m}")
        for name, ref in ref_state.items():
            assert ref.keys() <= state[name].keys(), (name, sorted(state[name]), sorted(ref))
            for key in ref:
                torch.testing.assert_close(state[name][key], ref[key], **tol, msg=lambda m: f"{name}.{key}: {m}")
        if clip is not None:
            assert min(ref_norms) > clip
            assert norms == pytest.approx(ref_norms, rel=norm_rel)


def step_collectives(layout: str) -> list[tuple[str, int]]:
    """The collectives one ``step()`` of ours issues with clipping on, for a layout: (name, group
    size) of each. ``per_block`` is the world-wide per-block ``fully_shard`` without a mesh."""
    net = make_model()
    if layout == "hsdp":
        net, index, n_data = hsdp_shard(net), dist.get_rank(), dist.get_world_size()
    elif layout == "tp":
        net, index, n_data = tp_fsdp_shard(net)
    else:
        net, index, n_data = shard_per_block(net), dist.get_rank(), dist.get_world_size()
    opt = ours("AdamW", param_groups(net, two_groups=True), max_grad_norm=0.05)
    ids, targets = global_batch(0, n_data)
    lm_loss(net, data_slice(ids, index, n_data), data_slice(targets, index, n_data)).backward()
    seen = []
    originals = {name: getattr(dist, name) for name in ("all_reduce", "all_gather", "broadcast", "reduce_scatter_tensor",
                                                         "all_gather_into_tensor", "barrier")}

    def counting(name):
        def call(*args, group=None, **kwargs):
            seen.append((name, dist.get_world_size(group)))
            return originals[name](*args, group=group, **kwargs)
        return call

    for name in originals:
        setattr(dist, name, counting(name))
    try:
        opt.step()
    finally:
        for name, fn in originals.items():
            setattr(dist, name, fn)
    return seen
