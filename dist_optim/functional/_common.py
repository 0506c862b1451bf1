"""Shared plumbing of the torch path: backend choice, fp32 views of low-precision params, scaled grads."""

from __future__ import annotations

from collections.abc import Sequence

import torch

Tensors = Sequence[torch.Tensor]


def resolve_backend(backend: str, params: Tensors) -> str:
    """'torch' or 'triton' for these tensors. 'auto' takes Triton for CUDA tensors when it is installed."""
    if backend == "torch" or not params:
        return "torch"
    import triton_kernels

    device = params[0].device
    if backend == "auto":
        return "triton" if device.type == "cuda" and triton_kernels.supports(device) else "torch"
    if backend == "triton":
        if not triton_kernels.supports(device):
            raise RuntimeError(
                f"backend='triton' cannot run on {device}: it needs the triton package and a CUDA device "
                "(or TRITON_INTERPRET=1 for the CPU interpreter)"
            )
        return "triton"
    raise ValueError(f"Invalid backend: {backend!r} (must be one of 'auto', 'torch', 'triton')")


def fp32_views(params: Tensors) -> list[torch.Tensor]:
    """fp32 tensors to do the math in: fp32 params themselves, fp32 copies of bf16/fp16 ones."""
    return [p if p.dtype == torch.float32 else p.float() for p in params]


def write_back(params: Tensors, views: Tensors) -> None:
    """Round the fp32 results into low-precision params (fp32 params were updated in place)."""
    pairs = [(p, v) for p, v in zip(params, views) if p is not v]
    if pairs:
        torch._foreach_copy_([p for p, _ in pairs], [v for _, v in pairs])


def scaled_grads(grads: Tensors, grad_scale: float) -> list[torch.Tensor]:
    """fp32 gradients times ``grad_scale`` (clip coefficient x accumulation divisor, negative for
    ``maximize``). The user's ``.grad`` tensors are never written."""
    g32 = [g if g.dtype == torch.float32 else g.float() for g in grads]
    if grad_scale == 1.0:
        return list(g32)
    return list(torch._foreach_mul(g32, grad_scale))

