"""SGD with momentum, dampening, coupled weight decay and Nesterov (torch.optim.SGD's algorithm).

    g = grad * grad_scale + weight_decay * p
    buf = g                                   on the first step with momentum
    buf = momentum * buf + (1 - dampening) * g    afterwards
    d = g + momentum * buf if nesterov else buf   (d = g without momentum)
    p = p - lr * d
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from ._common import (Step, Tensors, dequantized, fp32_views, fused_kernels, host_number, on_host, reads_device_values,
                      rounding_of, scaled_grads, warming, write_back)

STATE_KEYS_MOMENTUM = ("momentum_buffer",)


def sgd_step(
    params: Tensors,
    grads: Tensors,
    states: Mapping[str, Tensors],
    *,
    lr: float,
    momentum: float,
    dampening: float,
    weight_decay: float,
    nesterov: bool,
    first_step: bool,
    grad_scale=1.0,
    skip: torch.Tensor | None = None,
    step: Step | None = None,
    bf16_update: str = "nearest",
    sr_seeds: Sequence[torch.Tensor] | None = None,
    sr_bases: Sequence[int] | None = None,
    backend: str = "torch",
) -> None:
    """One SGD step in place. ``states['momentum_buffer']`` (fp32) is required when momentum != 0;
    ``first_step`` says the buffers are fresh and take the gradient as it is. ``grad_scale`` and
    ``skip`` may be one-element device tensors (device flow). ``bf16_update`` says how bf16 params
    are stored (see ``_common.write_back``); SGD's update needs no step count, but stochastic
    rounding's streams do: ``step`` (int t, or advanced counters in the device flow)."""
    hyper = dict(lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay, nesterov=nesterov,
                 first_step=first_step)
    rounding = rounding_of(bf16_update, params, sr_seeds, sr_bases)
    kernels = fused_kernels(backend, params, grads, states, rounding.mode)
    if skip is not None or isinstance(grad_scale, torch.Tensor):  # device flow
        counters = step if rounding.mode == "stochastic" else None
        if reads_device_values(kernels):
            kernels.sgd_step(params, grads, states, **hyper, grad_scale=grad_scale, skip=skip,
                             **rounding.for_kernels(steps=counters))
            return
        for call in on_host(params, grads, states, counters, grad_scale, skip, rounding=rounding):
            sgd_step(call.params, call.grads, call.states, **hyper, grad_scale=call.grad_scale, step=call.t,
                     **call.rounding.kwargs(), backend=backend)
        return
    if kernels is not None:
        kernels.sgd_step(params, grads, states, **hyper, grad_scale=grad_scale, **rounding.for_kernels(sr_step=step))
        return
    if warming():
        return
    lr = host_number(lr)
    states, requantize = dequantized(params, states)
    p32 = fp32_views(params)
    g = scaled_grads(grads, grad_scale)
    if weight_decay != 0.0:
        g = list(torch._foreach_add(g, p32, alpha=weight_decay))
    if momentum != 0.0:
        bufs = list(states["momentum_buffer"])
        if first_step:
            torch._foreach_copy_(bufs, g)
        else:
            torch._foreach_mul_(bufs, momentum)
            torch._foreach_add_(bufs, g, alpha=1.0 - dampening)
        if nesterov:
            g = list(torch._foreach_add(g, bufs, alpha=momentum))
        else:
            g = bufs
    torch._foreach_add_(p32, g, alpha=-lr)
    write_back(params, p32, rounding, step=step, comps=states.get("kahan_comp"))
    if requantize is not None:
        requantize()
