"""SGD with momentum, dampening, coupled weight decay and Nesterov (torch.optim.SGD's algorithm).

    g = grad * grad_scale + weight_decay * p
    buf = g                                   on the first step with momentum
    buf = momentum * buf + (1 - dampening) * g    afterwards
    d = g + momentum * buf if nesterov else buf   (d = g without momentum)
    p = p - lr * d
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from ._common import Tensors, dequantized, fp32_views, fused_kernels, host_number, on_host, reads_device_values, scaled_grads, write_back

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
    backend: str = "torch",
) -> None:
    """One SGD step in place. ``states['momentum_buffer']`` (fp32) is required when momentum != 0;
    ``first_step`` says the buffers are fresh and take the gradient as it is. ``grad_scale`` and
    ``skip`` may be one-element device tensors (device flow)."""
    hyper = dict(lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay, nesterov=nesterov,
                 first_step=first_step)
    kernels = fused_kernels(backend, params, grads, states)
    if skip is not None or isinstance(grad_scale, torch.Tensor):  # device flow
        if reads_device_values(kernels):
            kernels.sgd_step(params, grads, states, **hyper, grad_scale=grad_scale, skip=skip)
            return
        for ps, gs, ss, _, scale, _ in on_host(params, grads, states, None, grad_scale, skip):
            sgd_step(ps, gs, ss, **hyper, grad_scale=scale, backend=backend)
        return
    if kernels is not None:
        kernels.sgd_step(params, grads, states, **hyper, grad_scale=grad_scale)
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
    write_back(params, p32)
    if requantize is not None:
        requantize()
