"""Shared fixtures of the optimizer tests: a parameter set with the awkward cases every optimizer
must handle (size 1, odd sizes, an empty tensor, a param whose grad is None on some steps, a frozen
param) in two param groups, and deterministic gradients per (step, param)."""

from __future__ import annotations

import torch

SHAPES = [(1,), (7,), (3, 5), (0,), (33,), (4, 4)]
SOMETIMES_NONE = 1  # index of the param whose grad is None on every third step
GROUP_A = slice(0, 3)


def make_params(dtype: torch.dtype = torch.float32, seed: int = 0) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    params = [torch.randn(s, generator=gen).to(dtype).requires_grad_() for s in SHAPES]
    frozen = torch.randn(3, generator=gen).to(dtype)  # requires_grad=False: never has a grad
    return params + [frozen]


def clone_params(params: list[torch.Tensor]) -> list[torch.Tensor]:
    return [p.detach().clone().requires_grad_(p.requires_grad) for p in params]


def groups(params: list[torch.Tensor], kw_a: dict, kw_b: dict) -> list[dict]:
    trainable, frozen = params[:-1], params[-1]
    return [{"params": trainable[GROUP_A] + [frozen], **kw_a}, {"params": trainable[GROUP_A.stop:], **kw_b}]


def set_grads(params: list[torch.Tensor], step: int, scale: float = 1.0) -> None:
    for i, p in enumerate(params):
        if not p.requires_grad or (i == SOMETIMES_NONE and step % 3 == 2):
            p.grad = None
            continue
        gen = torch.Generator().manual_seed(1000 * step + i)
        p.grad = (scale * torch.randn(p.shape, generator=gen)).to(p.dtype)


def run(opt, params: list[torch.Tensor], start: int, stop: int, scale: float = 1.0) -> None:
    for step in range(start, stop):
        set_grads(params, step, scale)
        opt.step()


def grads_in_place(params: list[torch.Tensor]):
    """``set_grads`` keeping each param's grad storage from step to step, as a training loop's grads
    are (the caching allocator hands a backward the same blocks; ZeRO's and FSDP2's grad buffers are
    reused), with its None pattern: returns ``step(i)``, which sets step i's values in place."""
    kept: dict[int, torch.Tensor] = {}

    def step(index: int) -> None:
        set_grads(params, index)
        for p in params:
            if p.grad is not None:
                grad = kept.setdefault(id(p), p.grad)
                if grad is not p.grad:
                    grad.copy_(p.grad)
                    p.grad = grad

    return step


def steady_state_host_work(opt, params: list[torch.Tensor]):
    """(host reads, launches, launch tables built) over three steady-state Triton steps, launches
    stubbed: after ``compile_kernels()``, the first (host-flow) step with real kernels, and one cycle
    of ``set_grads``' None pattern that caches the tables of both param sets."""
    from collections import Counter

    import triton_kernels
    from dist_optim.host_work import counting_host_reads, stubbed_launches

    set_grads(params, 0)
    opt.compile_kernels()
    step_in_place = grads_in_place(params)
    step_in_place(0)
    opt.step()
    launches, counts = Counter(), Counter()
    with stubbed_launches(launches):
        for step in range(1, 4):
            step_in_place(step)
            opt.step()
        builds = triton_kernels._multi_tensor.TABLES.builds
        launches.clear()
        for step in range(4, 7):
            step_in_place(step)
            with counting_host_reads(counts):
                opt.step()
    return counts, launches, triton_kernels._multi_tensor.TABLES.builds - builds
