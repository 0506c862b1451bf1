"""Launchers: bucket the tensors by (param dtype, grad dtype), build the pointer tables, pass the
step's scalars as fp32 (as torch casts a Python scalar for an fp32 op) and call the library once
per bucket."""

from __future__ import annotations

import ctypes
import struct
from collections import defaultdict
from collections.abc import Mapping, Sequence

import torch

from ._build import library

Tensors = Sequence[torch.Tensor]

DTYPES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
SGD, ADAGRAD, RMSPROP, ADAM, RADAM, LOOKAHEAD = range(6)


def f32(x: float) -> float:
    """x rounded to fp32, as the kernel will see it."""
    return struct.unpack("f", struct.pack("f", x))[0]


def lerp_coeffs(weight: float) -> tuple[float, float, bool]:
    """(w, w - 1, |w| < 0.5) in fp32 for torch's two-branch lerp with scalar weight w."""
    w = f32(weight)
    return w, f32(w - 1.0), abs(w) < 0.5


def accepts(params: Tensors, grads: Tensors | None = None, states: Mapping[str, Tensors] | None = None) -> bool:
    """Whether these tensors are for the CPU kernels: on the CPU, params and grads fp32/bf16/fp16,
    states fp32. (Sizes are checked by the launcher, which reads them anyway.)"""
    ok = DTYPES.__contains__
    if not all(t.is_cpu and ok(t.dtype) for t in params):
        return False
    if grads is not None and not all(t.is_cpu and ok(t.dtype) for t in grads):
        return False
    f32 = torch.float32
    return all(t.is_cpu and t.dtype == f32 for ts in (states or {}).values() for t in ts)


class _Contiguous:
    """Contiguous stand-ins for the tensors of one call; ``finish`` writes the outputs back."""

    def __init__(self) -> None:
        self.back: list[tuple[torch.Tensor, torch.Tensor]] = []

    def __call__(self, t: torch.Tensor, written: bool) -> torch.Tensor:
        if t.is_contiguous():
            return t
        c = t.contiguous()
        if written:
            self.back.append((t, c))
        return c

    def finish(self) -> None:
        for t, c in self.back:
            t.copy_(c)


def _ptrs(tensors: Sequence[torch.Tensor | None]):
    return (ctypes.c_void_p * len(tensors))(*[None if t is None else t.data_ptr() for t in tensors])


def _launch(family: int, params: Tensors, grads: Tensors | None, states: Sequence[Tensors | None],
            scalars: Sequence[float], flags: Sequence[int]) -> None:
    lib = library()
    sc = (ctypes.c_float * max(1, len(scalars)))(*scalars)
    fl = (ctypes.c_int * max(1, len(flags)))(*[int(f) for f in flags])
    nthreads = max(1, torch.get_num_threads())
    buckets: dict[tuple[int, int], list[int]] = defaultdict(list)
    sizes = [p.numel() for p in params]
    for role in ([grads] if grads is not None else []) + [ts for ts in states if ts is not None]:
        if len(role) != len(params) or any(t.numel() != n for t, n in zip(role, sizes)):
            raise ValueError("cpu_kernels: every grad and state tensor must match its param's size")
    for i, p in enumerate(params):
        if sizes[i] > 0:
            g = p if grads is None else grads[i]
            buckets[(DTYPES[p.dtype], DTYPES[g.dtype])].append(i)
    fix = _Contiguous()
    written: list[torch.Tensor] = []
    for (pd, gd), idx in buckets.items():
        ps = [fix(params[i], True) for i in idx]
        gs = ps if grads is None else [fix(grads[i], False) for i in idx]
        ss = [None if ts is None else fix(ts[i], True) for ts in states for i in idx]
        n = len(idx)
        numel = (ctypes.c_int64 * n)(*[sizes[i] for i in idx])
        rc = lib.dist_optim_step(family, pd, gd, n, numel, _ptrs(ps), _ptrs(gs), _ptrs(ss) if ss else None,
                                 len(states), sc, fl, nthreads)
        if rc != 0:
            raise RuntimeError(f"cpu_kernels: step of family {family} failed with code {rc}")
        written += [params[i] for i in idx] + [ts[i] for ts in states if ts is not None for i in idx]
    fix.finish()
    # The library writes through raw pointers: bump the version counters as an in-place torch op
    # would, so autograd still catches a saved param changed before its backward.
    torch.autograd.graph.increment_version(written)


def sgd_step(params, grads, states, *, lr, momentum, dampening, weight_decay, nesterov, first_step, grad_scale) -> None:
    has_momentum = momentum != 0.0
    bufs = [states["momentum_buffer"]] if has_momentum else []
    _launch(SGD, params, grads, bufs, [grad_scale, weight_decay, momentum, 1.0 - dampening, -lr],
            [weight_decay != 0.0, has_momentum, first_step, nesterov])


def adagrad_step(params, grads, states, *, clr, weight_decay, eps, grad_scale) -> None:
    _launch(ADAGRAD, params, grads, [states["sum"]], [grad_scale, weight_decay, eps, -clr], [weight_decay != 0.0])


def rmsprop_step(params, grads, states, *, lr, alpha, eps, weight_decay, momentum, centered, grad_scale) -> None:
    has_momentum = momentum > 0.0
    w, wm1, small = lerp_coeffs(1.0 - alpha)
    sq = states["square_avg"]
    roles = [sq, states["momentum_buffer"] if has_momentum else None, states["grad_avg"] if centered else None]
    _launch(RMSPROP, params, grads, roles, [grad_scale, weight_decay, alpha, w, eps, momentum, -lr, wm1],
            [weight_decay != 0.0, centered, has_momentum, small])


def adam_step(params, grads, states, *, lr, beta1, beta2, eps, weight_decay, decoupled, amsgrad, step_size,
              bias_correction2_sqrt, grad_scale) -> None:
    w, wm1, small = lerp_coeffs(1.0 - beta1)
    m, v = states["exp_avg"], states["exp_avg_sq"]
    roles = [m, v, states["max_exp_avg_sq"] if amsgrad else None]
    _launch(ADAM, params, grads, roles,
            [grad_scale, weight_decay, 1.0 - lr * weight_decay, w, wm1, beta2, 1.0 - beta2, eps, -step_size,
             bias_correction2_sqrt, 0.0],
            [weight_decay != 0.0, decoupled, small, amsgrad])


def radam_step(params, grads, states, *, lr, beta1, beta2, eps, weight_decay, decoupled, rectified, step_size,
               lookahead_alpha, grad_scale) -> None:
    w, wm1, small = lerp_coeffs(1.0 - beta1)
    m, v = states["exp_avg"], states["exp_avg_sq"]
    sync = lookahead_alpha is not None
    roles = [m, v, states["slow_buffer"] if sync else None]
    _launch(RADAM, params, grads, roles,
            [grad_scale, weight_decay, 1.0 - lr * weight_decay, w, wm1, beta2, 1.0 - beta2, eps, -step_size,
             1.0, lookahead_alpha if sync else 0.0],
            [weight_decay != 0.0, decoupled, small, rectified, sync])


def lookahead_sync(params, slow_buffers, *, alpha) -> None:
    _launch(LOOKAHEAD, params, None, [slow_buffers], [alpha], [])


def sumsq_nonfinite(grads: Tensors) -> torch.Tensor:
    """[sum of squares, 1.0 if any element is inf/NaN or the fp32 sum overflowed else 0.0], fp32.
    Partial sums per fixed chunk in fp64, added in chunk order: the same bits at any thread count."""
    lib = library()
    total, bad = ctypes.c_double(0.0), ctypes.c_int(0)
    nthreads = max(1, torch.get_num_threads())
    buckets: dict[int, list[torch.Tensor]] = defaultdict(list)
    for g in grads:
        if g.numel() > 0:
            buckets[DTYPES[g.dtype]].append(g.contiguous())
    for gd, gs in sorted(buckets.items()):
        numel = (ctypes.c_int64 * len(gs))(*[g.numel() for g in gs])
        if lib.dist_optim_sumsq(gd, len(gs), numel, _ptrs(gs), ctypes.byref(total), ctypes.byref(bad), nthreads) != 0:
            raise RuntimeError("cpu_kernels: sum of squares failed")
    sumsq = torch.tensor(total.value, dtype=torch.float32)
    flag = bool(bad.value) or not bool(torch.isfinite(sumsq))
    return torch.stack([sumsq, torch.tensor(float(flag))])
