"""Adam (coupled L2 weight decay) and AdamW (decoupled), torch.optim's algorithms, for one step count t.

    AdamW: p = p * (1 - lr * weight_decay)        Adam: g = grad * grad_scale + weight_decay * p
    m = beta1 * m + (1 - beta1) * g                (a lerp towards g)
    v = beta2 * v + (1 - beta2) * g * g
    amsgrad: v_max = max(v_max, v), used in place of v below
    p = p - lr / (1 - beta1^t) * m / (sqrt(v) / sqrt(1 - beta2^t) + eps)
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch

from ._common import (Step, Tensors, dequantized, fp32_views, fused_kernels, host_number, on_host, reads_device_values,
                      rounding_of, scaled_grads, warming, write_back)


def moments(params, grads, states, *, lr, beta1, beta2, weight_decay, decoupled, grad_scale):
    """The part Adam and RAdam share: weight decay (decoupled on the params or coupled into g), then
    m = lerp(m, g, 1 - beta1) and v = beta2 v + (1 - beta2) g^2. Returns (fp32 params, m, v)."""
    lr = host_number(lr)
    p32 = fp32_views(params)
    g = scaled_grads(grads, grad_scale)
    if weight_decay != 0.0:
        if decoupled:
            torch._foreach_mul_(p32, 1.0 - lr * weight_decay)
        else:
            g = list(torch._foreach_add(g, p32, alpha=weight_decay))
    exp_avgs, exp_avg_sqs = list(states["exp_avg"]), list(states["exp_avg_sq"])
    torch._foreach_lerp_(exp_avgs, g, 1.0 - beta1)
    torch._foreach_mul_(exp_avg_sqs, beta2)
    torch._foreach_addcmul_(exp_avg_sqs, g, g, value=1.0 - beta2)
    return p32, exp_avgs, exp_avg_sqs


def adam_state_keys(amsgrad: bool) -> tuple[str, ...]:
    return ("step", "exp_avg", "exp_avg_sq") + (("max_exp_avg_sq",) if amsgrad else ())


def adam_step(
    params: Tensors,
    grads: Tensors,
    states: Mapping[str, Tensors],
    *,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    decoupled: bool,
    amsgrad: bool,
    step: Step,
    grad_scale=1.0,
    skip: torch.Tensor | None = None,
    bf16_update: str = "nearest",
    sr_seeds: Sequence[torch.Tensor] | None = None,
    sr_bases: Sequence[int] | None = None,
    backend: str = "torch",
) -> None:
    """One Adam/AdamW step in place; ``step`` is the (already incremented) step count t >= 1, or
    per-tensor counters on the device with ``grad_scale`` and ``skip`` there too (device flow).
    ``bf16_update`` says how bf16 params are stored (see ``_common.write_back``)."""
    hyper = dict(lr=lr, beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay, decoupled=decoupled,
                 amsgrad=amsgrad)
    rounding = rounding_of(bf16_update, params, sr_seeds, sr_bases)
    kernels = fused_kernels(backend, params, grads, states, rounding.mode)
    if not isinstance(step, int):
        if reads_device_values(kernels):
            kernels.adam_step(params, grads, states, **hyper, steps=step, step_size=None,
                              bias_correction2_sqrt=None, grad_scale=grad_scale, skip=skip, **rounding.for_kernels())
            return
        for call in on_host(params, grads, states, step, grad_scale, skip, rounding=rounding):
            adam_step(call.params, call.grads, call.states, **hyper, step=call.t, grad_scale=call.grad_scale,
                      **call.rounding.kwargs(), backend=backend)
        return
    if not reads_device_values(kernels):
        lr = host_number(lr)
    step_size = lr / (1.0 - beta1**step)
    bias_correction2_sqrt = math.sqrt(1.0 - beta2**step)
    if kernels is not None:
        kernels.adam_step(
            params, grads, states, lr=lr, beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay,
            decoupled=decoupled, amsgrad=amsgrad, step_size=step_size,
            bias_correction2_sqrt=bias_correction2_sqrt, grad_scale=grad_scale, **rounding.for_kernels(sr_step=step),
        )
        return
    if warming():
        return
    states, requantize = dequantized(params, states)
    p32, exp_avgs, exp_avg_sqs = moments(params, grads, states, lr=lr, beta1=beta1, beta2=beta2,
                                         weight_decay=weight_decay, decoupled=decoupled, grad_scale=grad_scale)
    if amsgrad:
        max_sqs = list(states["max_exp_avg_sq"])
        torch._foreach_maximum_(max_sqs, exp_avg_sqs)
        denom = torch._foreach_sqrt(max_sqs)
    else:
        denom = torch._foreach_sqrt(exp_avg_sqs)
    torch._foreach_div_(denom, bias_correction2_sqrt)
    torch._foreach_add_(denom, eps)
    torch._foreach_addcdiv_(p32, exp_avgs, denom, value=-step_size)
    write_back(params, p32, rounding, step=step, comps=states.get("kahan_comp"))
    if requantize is not None:
        requantize()
