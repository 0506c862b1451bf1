"""RMSprop with optional momentum and centering (torch.optim.RMSprop's algorithm).

    g = grad * grad_scale + weight_decay * p
    v = alpha * v + (1 - alpha) * g * g
    centered:  m_g = m_g + (1 - alpha) * (g - m_g);  avg = sqrt(v - m_g^2) + eps
    else:      avg = sqrt(v) + eps
    momentum:  buf = momentum * buf + g / avg;  p = p - lr * buf
    else:      p = p - lr * g / avg
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from ._common import (Step, Tensors, dequantized, fp32_views, fused_kernels, host_number, on_host, reads_device_values,
                      rounding_of, scaled_grads, warming, write_back)


def rmsprop_state_keys(momentum: float, centered: bool) -> tuple[str, ...]:
    keys = ("step", "square_avg")
    if momentum > 0.0:
        keys += ("momentum_buffer",)
    if centered:
        keys += ("grad_avg",)
    return keys


def rmsprop_step(
    params: Tensors,
    grads: Tensors,
    states: Mapping[str, Tensors],
    *,
    lr: float,
    alpha: float,
    eps: float,
    weight_decay: float,
    momentum: float,
    centered: bool,
    grad_scale=1.0,
    skip: torch.Tensor | None = None,
    step: Step | None = None,
    bf16_update: str = "nearest",
    sr_seeds: Sequence[torch.Tensor] | None = None,
    sr_bases: Sequence[int] | None = None,
    backend: str = "torch",
) -> None:
    """One RMSprop step in place. ``states`` holds 'square_avg', plus 'momentum_buffer' when
    momentum > 0 and 'grad_avg' when centered (all fp32). ``grad_scale`` and ``skip`` may be
    one-element device tensors (device flow). ``bf16_update`` says how bf16 params are stored (see
    ``_common.write_back``); the update needs no step count, stochastic rounding's streams do:
    ``step`` (int t, or advanced counters in the device flow)."""
    hyper = dict(lr=lr, alpha=alpha, eps=eps, weight_decay=weight_decay, momentum=momentum, centered=centered)
    rounding = rounding_of(bf16_update, params, sr_seeds, sr_bases)
    kernels = fused_kernels(backend, params, grads, states, rounding.mode)
    if skip is not None or isinstance(grad_scale, torch.Tensor):  # device flow
        counters = step if rounding.mode == "stochastic" else None
        if reads_device_values(kernels):
            kernels.rmsprop_step(params, grads, states, **hyper, grad_scale=grad_scale, skip=skip,
                                 **rounding.for_kernels(steps=counters))
            return
        for call in on_host(params, grads, states, counters, grad_scale, skip, rounding=rounding):
            rmsprop_step(call.params, call.grads, call.states, **hyper, grad_scale=call.grad_scale, step=call.t,
                         **call.rounding.kwargs(), backend=backend)
        return
    if kernels is not None:
        kernels.rmsprop_step(params, grads, states, **hyper, grad_scale=grad_scale,
                             **rounding.for_kernels(sr_step=step))
        return
    if warming():
        return
    lr = host_number(lr)
    states, requantize = dequantized(params, states)
    p32 = fp32_views(params)
    g = scaled_grads(grads, grad_scale)
    if weight_decay != 0.0:
        g = list(torch._foreach_add(g, p32, alpha=weight_decay))
    square_avgs = list(states["square_avg"])
    torch._foreach_mul_(square_avgs, alpha)
    torch._foreach_addcmul_(square_avgs, g, g, value=1.0 - alpha)
    if centered:
        grad_avgs = list(states["grad_avg"])
        torch._foreach_lerp_(grad_avgs, g, 1.0 - alpha)
        avg = torch._foreach_addcmul(square_avgs, grad_avgs, grad_avgs, value=-1.0)
        if requantize is not None:
            # sq >= ga^2 holds for exact moments, not for rounded ones: with int8 state a
            # low-variance element can come out slightly negative, whose sqrt would be NaN
            torch._foreach_clamp_min_(avg, 0.0)
        torch._foreach_sqrt_(avg)
    else:
        avg = torch._foreach_sqrt(square_avgs)
    torch._foreach_add_(avg, eps)
    if momentum > 0.0:
        bufs = list(states["momentum_buffer"])
        torch._foreach_mul_(bufs, momentum)
        torch._foreach_addcdiv_(bufs, g, avg)
        torch._foreach_add_(p32, bufs, alpha=-lr)
    else:
        torch._foreach_addcdiv_(p32, g, avg, value=-lr)
    write_back(params, p32, rounding, step=step, comps=states.get("kahan_comp"))
    if requantize is not None:
        requantize()
