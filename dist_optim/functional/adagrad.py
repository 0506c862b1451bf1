"""Adagrad (torch.optim.Adagrad's algorithm), for one step count t shared by the tensors given.

    g = grad * grad_scale + weight_decay * p
    clr = lr / (1 + (t - 1) * lr_decay)
    sum = sum + g * g
    p = p - clr * g / (sqrt(sum) + eps)
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from ._common import (Step, Tensors, dequantized, fp32_views, fused_kernels, host_number, on_host, reads_device_values,
                      rounding_of, scaled_grads, warming, write_back)

STATE_KEYS = ("step", "sum")


def adagrad_clr(lr: float, lr_decay: float, step: int) -> float:
    return lr / (1.0 + (step - 1) * lr_decay)


def adagrad_step(
    params: Tensors,
    grads: Tensors,
    states: Mapping[str, Tensors],
    *,
    lr: float,
    lr_decay: float,
    weight_decay: float,
    eps: float,
    step: Step,
    grad_scale=1.0,
    skip: torch.Tensor | None = None,
    bf16_update: str = "nearest",
    sr_seeds: Sequence[torch.Tensor] | None = None,
    sr_bases: Sequence[int] | None = None,
    backend: str = "torch",
) -> None:
    """One Adagrad step in place; ``step`` is the (already incremented) step count t >= 1, or
    per-tensor counters on the device with ``grad_scale`` and ``skip`` there too (device flow).
    ``bf16_update`` says how bf16 params are stored (see ``_common.write_back``)."""
    rounding = rounding_of(bf16_update, params, sr_seeds, sr_bases)
    kernels = fused_kernels(backend, params, grads, states, rounding.mode)
    if not isinstance(step, int):
        if reads_device_values(kernels):
            kernels.adagrad_step(params, grads, states, clr=None, lr=lr, lr_decay=lr_decay, steps=step,
                                 weight_decay=weight_decay, eps=eps, grad_scale=grad_scale, skip=skip,
                                 **rounding.for_kernels())
            return
        for call in on_host(params, grads, states, step, grad_scale, skip, rounding=rounding):
            adagrad_step(call.params, call.grads, call.states, lr=lr, lr_decay=lr_decay, weight_decay=weight_decay,
                         eps=eps, step=call.t, grad_scale=call.grad_scale, **call.rounding.kwargs(), backend=backend)
        return
    if not reads_device_values(kernels):
        lr = host_number(lr)
    clr = adagrad_clr(lr, lr_decay, step)
    if kernels is not None:
        kernels.adagrad_step(
            params, grads, states, clr=clr, weight_decay=weight_decay, eps=eps, grad_scale=grad_scale,
            **rounding.for_kernels(sr_step=step),
        )
        return
    if warming():
        return
    states, requantize = dequantized(params, states)
    p32 = fp32_views(params)
    g = scaled_grads(grads, grad_scale)
    if weight_decay != 0.0:
        g = list(torch._foreach_add(g, p32, alpha=weight_decay))
    sums = list(states["sum"])
    torch._foreach_addcmul_(sums, g, g, value=1.0)
    std = torch._foreach_sqrt(sums)
    torch._foreach_add_(std, eps)
    numerator = torch._foreach_mul(g, -clr)
    torch._foreach_addcdiv_(p32, numerator, std)
    write_back(params, p32, rounding, step=step, comps=states.get("kahan_comp"))
    if requantize is not None:
        requantize()
