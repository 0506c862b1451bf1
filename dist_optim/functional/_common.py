"""Shared plumbing of the torch path: backend choice, fp32 views of low-precision params, scaled grads."""

from __future__ import annotations

from collections.abc import Sequence

import torch

Tensors = Sequence[torch.Tensor]


def resolve_backend(backend: str, params: Tensors) -> str:
    """'torch', 'triton' or 'cpu' for these tensors. 'auto' takes Triton for CUDA tensors when it is
    installed and the fused CPU kernels (``cpu_kernels``) for CPU tensors when they build here."""
    if backend == "torch" or not params:
        return "torch"
    device = params[0].device
    if backend == "auto":
        if device.type == "cuda":
            import triton_kernels

            return "triton" if triton_kernels.supports(device) else "torch"
        if device.type == "cpu":
            import cpu_kernels

            return "cpu" if cpu_kernels.supports(device) else "torch"
        return "torch"
    if backend == "triton":
        import triton_kernels

        if not triton_kernels.supports(device):
            raise RuntimeError(
                f"backend='triton' cannot run on {device}: it needs the triton package and a CUDA device "
                "(or TRITON_INTERPRET=1 for the CPU interpreter)"
            )
        return "triton"
    if backend == "cpu":
        import cpu_kernels

        if device.type != "cpu":
            raise RuntimeError(f"backend='cpu' cannot run on {device}: it takes CPU tensors")
        if not cpu_kernels.supports(device):
            from cpu_kernels._build import library

            library()  # raises the build error that says why
        return "cpu"
    raise ValueError(f"Invalid backend: {backend!r} (must be one of 'auto', 'torch', 'triton', 'cpu')")


def fused_kernels(backend: str, params: Tensors, grads: Tensors | None = None, states=None):
    """The one place a step's implementation is chosen: the kernel module whose launcher runs these
    tensors (``triton_kernels`` or ``cpu_kernels``, the same launcher signatures), or None for the
    torch path. The CPU kernels take fp32/bf16/fp16 params and grads with fp32 state; anything else
    (fp64, say) goes to the torch path under 'auto' and is refused under 'cpu'."""
    which = resolve_backend(backend, params)
    if which == "triton":
        import triton_kernels

        return triton_kernels
    if which == "cpu":
        import cpu_kernels

        if cpu_kernels.accepts(params, grads, states):
            return cpu_kernels
        if backend == "cpu":
            raise ValueError(
                "backend='cpu' takes CPU params and grads in fp32/bf16/fp16 with fp32 state; got params "
                f"{sorted({str(p.dtype) for p in params})}"
            )
    return None


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

