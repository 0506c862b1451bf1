"""The one place every kernel launch goes through: under the tensors' device guard, and seen by a
recorder when one is active (``recording()``), so that the ahead-of-time compile test and audit
(``triton_kernels._aot``) compile exactly the specializations real ``step()`` calls launch."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

# The recorders that are listening; empty outside ``recording()`` (a stack, not a cache).
_RECORDERS: list[list] = []
# Depth of nested ``compiling()`` blocks: inside one, every launch compiles and runs nothing.
_COMPILING = [0]


@contextlib.contextmanager
def compiling() -> Iterator[None]:
    """Inside the block every launch is ``compile_only``: an optimizer compiles the specializations
    its later steps launch (the device flow's, during a host-flow step) without running them."""
    _COMPILING[0] += 1
    try:
        yield
    finally:
        _COMPILING[0] -= 1


@contextlib.contextmanager
def recording() -> Iterator[list]:
    """Collect ``(kernel, args, kwargs)`` of every launch inside the block, in order. Tensor
    arguments are kept as (dtype, data_ptr) so nothing stays alive."""
    calls: list = []
    _RECORDERS.append(calls)
    try:
        yield calls
    finally:
        _RECORDERS.remove(calls)


def _abstract(arg):
    return _TensorSpec(arg.dtype, arg.data_ptr()) if isinstance(arg, torch.Tensor) else arg


class _TensorSpec:
    """What Triton specializes a tensor argument on: its dtype and its address's alignment."""

    __slots__ = ("dtype", "_ptr")

    def __init__(self, dtype: torch.dtype, ptr: int):
        self.dtype, self._ptr = dtype, ptr

    def data_ptr(self) -> int:
        return self._ptr


def run(kernel, grid: tuple, device: torch.device, *args, compile_only: bool = False, **kwargs) -> None:
    """``kernel[grid](*args, **kwargs)`` on ``device``; with ``compile_only``, compile that
    specialization and launch nothing (``JITFunction.warmup``; a no-op under the interpreter)."""
    compile_only = compile_only or _COMPILING[0] > 0
    for calls in _RECORDERS:
        calls.append((kernel, tuple(_abstract(a) for a in args), dict(kwargs)))
    with torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext():
        if compile_only:
            kernel.warmup(*args, grid=grid, **kwargs)
        else:
            kernel[grid](*args, **kwargs)
