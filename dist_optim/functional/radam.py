"""RAdam (Liu et al. 2020) as torch.optim.RAdam computes it, with a settable rectification threshold,
and Ranger's fused step (RAdam followed, on Lookahead sync steps, by the slow-weight update).

    decoupled: p = p * (1 - lr * weight_decay)     else: g = grad * grad_scale + weight_decay * p
    m = beta1 * m + (1 - beta1) * g;   v = beta2 * v + (1 - beta2) * g * g
    rho_inf = 2 / (1 - beta2) - 1;     rho_t = rho_inf - 2 t beta2^t / (1 - beta2^t)
    rho_t > rho_threshold:  r = sqrt((rho_t - 4)(rho_t - 2) rho_inf / ((rho_inf - 4)(rho_inf - 2) rho_t))
                            p = p - lr * r * sqrt(1 - beta2^t) / (1 - beta1^t) * m / (sqrt(v) + eps)
    otherwise:              p = p - lr / (1 - beta1^t) * m      (SGD with bias-corrected momentum)
    Ranger, on a sync step: slow = slow + alpha * (p - slow);  p = slow
                            (slow in fp32 from its stored dtype, stored rounded to nearest; p gets
                            the stored slow, rounded to nearest: no bf16_update on a sync step)

eps is added to sqrt(v), not to the bias-corrected sqrt(v / (1 - beta2^t)): that is torch.optim.RAdam's
and the authors' choice, and it differs from Adam's.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch

from ._common import (NEAREST, Step, Tensors, dequantized, fused_kernels, host_number, on_host, reads_device_values,
                      rounding_of, warming, write_back)
from .adam import moments
from .lookahead import pull_and_reset

STATE_KEYS = ("step", "exp_avg", "exp_avg_sq")


def radam_rho(beta2: float, step: int) -> float:
    """rho_t, the length of the approximated simple moving average at step t."""
    rho_inf = 2.0 / (1.0 - beta2) - 1.0
    beta2_t = beta2**step
    return rho_inf - 2.0 * step * beta2_t / (1.0 - beta2_t)


def radam_step_size(lr: float, beta1: float, beta2: float, step: int, rho_threshold: float) -> tuple[bool, float]:
    """(rectified, step size): the adaptive step's size lr*r*sqrt(1-beta2^t)/(1-beta1^t) when
    rho_t > rho_threshold, else the momentum step's lr/(1-beta1^t)."""
    bias_correction1 = 1.0 - beta1**step
    rho_t = radam_rho(beta2, step)
    if rho_t > rho_threshold:
        rho_inf = 2.0 / (1.0 - beta2) - 1.0
        rect = math.sqrt((rho_t - 4.0) * (rho_t - 2.0) * rho_inf / ((rho_inf - 4.0) * (rho_inf - 2.0) * rho_t))
        return True, lr * rect * math.sqrt(1.0 - beta2**step) / bias_correction1
    return False, lr / bias_correction1


def radam_step(
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
    rho_threshold: float,
    step: Step,
    lookahead_alpha: float | None = None,
    lookahead_steps: Tensors | None = None,
    k: int | None = None,
    grad_scale=1.0,
    skip: torch.Tensor | None = None,
    bf16_update: str = "nearest",
    sr_seeds: Sequence[torch.Tensor] | None = None,
    sr_bases: Sequence[int] | None = None,
    backend: str = "torch",
) -> None:
    """One RAdam step in place. With ``lookahead_alpha`` (Ranger) the slow weights in
    ``states['slow_buffer']`` (fp32, bf16 or fp16) are pulled towards the new params and the params
    reset to them, in the same pass; the fp32 result of the step feeds the slow update before any
    rounding to the param dtype. The sync happens on every tensor given (host flow: the caller passes
    the due ones), or, with ``lookahead_steps`` (advanced Lookahead counters) and ``k``, on those
    whose count is a multiple of k (device flow, with ``step`` as device counters). ``bf16_update``
    says how bf16 params are stored on the steps without a sync (see ``_common.write_back``)."""
    hyper = dict(lr=lr, beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay, decoupled=decoupled)
    rounding = rounding_of(bf16_update, params, sr_seeds, sr_bases)
    kernels = fused_kernels(backend, params, grads, states, rounding.mode)
    if not isinstance(step, int):
        if reads_device_values(kernels):
            kernels.radam_step(params, grads, states, **hyper, rho_threshold=rho_threshold, steps=step, rectified=None,
                               step_size=None, lookahead_alpha=lookahead_alpha, la_steps=lookahead_steps, k=k,
                               grad_scale=grad_scale, skip=skip, **rounding.for_kernels())
            return
        for call in on_host(params, grads, states, step, grad_scale, skip, lookahead_steps, k, rounding=rounding):
            ss = call.states
            if call.sync is False:
                ss = {key: v for key, v in ss.items() if key != "slow_buffer"}
            radam_step(call.params, call.grads, ss, **hyper, rho_threshold=rho_threshold, step=call.t,
                       lookahead_alpha=None if call.sync is False else lookahead_alpha, grad_scale=call.grad_scale,
                       **call.rounding.kwargs(), backend=backend)
        return
    if not reads_device_values(kernels):
        lr = host_number(lr)
    rectified, step_size = radam_step_size(lr, beta1, beta2, step, rho_threshold)
    if kernels is not None:
        kernels.radam_step(
            params, grads, states, lr=lr, beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay,
            decoupled=decoupled, rectified=rectified, step_size=step_size, lookahead_alpha=lookahead_alpha,
            grad_scale=grad_scale, **rounding.for_kernels(sr_step=step),
        )
        return
    if warming():
        return
    states, requantize = dequantized(params, states)
    p32, exp_avgs, exp_avg_sqs = moments(params, grads, states, lr=lr, beta1=beta1, beta2=beta2,
                                         weight_decay=weight_decay, decoupled=decoupled, grad_scale=grad_scale)
    if rectified:
        denom = torch._foreach_sqrt(exp_avg_sqs)
        torch._foreach_add_(denom, eps)
        torch._foreach_addcdiv_(p32, exp_avgs, denom, value=-step_size)
    else:
        torch._foreach_add_(p32, exp_avgs, alpha=-step_size)
    if lookahead_alpha is not None:
        pull_and_reset(p32, list(states["slow_buffer"]), lookahead_alpha)
        rounding = NEAREST  # the params take the slow weights as they are (the Kahan buffer stays)
    write_back(params, p32, rounding, step=step, comps=states.get("kahan_comp"))
    if requantize is not None:
        requantize()
