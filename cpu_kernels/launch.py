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
        self.copied = False

    def role(self, ts: Tensors, written: bool) -> Tensors:
        if all(map(torch.Tensor.is_contiguous, ts)):
            return ts
        self.copied = True
        out = []
        for t in ts:
            if t.is_contiguous():
                out.append(t)
                continue
            c = t.contiguous()
            if written:
                self.back.append((t, c))
            out.append(c)
        return out

    def finish(self) -> None:
        for t, c in self.back:
            t.copy_(c)


class TableCache:
    """The per-call pointer and size tables (ctypes arrays, one set per dtype bucket), keyed on
    everything they are built from: the pointers and sizes of every role's tensors, the params' and
    grads' dtypes and which optional states are present. A steady-state step (same storages every
    step) then builds nothing from Python lists; computing the key costs a few C-level ``map``s.
    Oldest entry out first (a hit does not reorder: that would hash the long key a second time,
    and a run's working set fits anyway); an entry holds only integers, never a tensor."""

    def __init__(self, maxsize: int = 64):
        self.maxsize = maxsize
        self._tables: dict = {}
        self.builds = 0  # tables built so far (tests count them)

    def get(self, key, build):
        hit = self._tables.get(key)
        if hit is not None:
            return hit
        self.builds += 1
        built = build()
        self._tables[key] = built
        if len(self._tables) > self.maxsize:
            del self._tables[next(iter(self._tables))]
        return built


# Bounded: one entry per (family's role layout, set of storages) in use — a ZeRO-3 run steps each
# sub-group separately, and the check pass keys on the grads alone.
TABLES = TableCache()

_T = torch.Tensor
_DTYPE = _T.dtype.__get__


def _ptr_array(ptrs: Sequence[int]):
    return (ctypes.c_void_p * len(ptrs))(*ptrs)


def _buckets(params: Tensors, grads: Tensors | None) -> dict[tuple[int, int], list[int]]:
    buckets: dict[tuple[int, int], list[int]] = defaultdict(list)
    for i, p in enumerate(params):
        if p.numel() > 0:
            g = p if grads is None else grads[i]
            buckets[(DTYPES[p.dtype], DTYPES[g.dtype])].append(i)
    return buckets


def _step_tables(ptrs, numels, params: Tensors, grads: Tensors | None):
    """[(param dtype, grad dtype, tensors, numel table, P, G, S)] per bucket. ptrs: per role, params
    first, then grads when present, then every state slot (None where absent); numels: per role
    present."""
    sizes = numels[0]
    if any(ns != sizes for ns in numels[1:]):
        raise ValueError("cpu_kernels: every grad and state tensor must match its param's size")
    has_grads = grads is not None
    states = ptrs[2 if has_grads else 1:]
    out = []
    for (pd, gd), idx in _buckets(params, grads).items():
        pp = [ptrs[0][i] for i in idx]
        gp = pp if not has_grads else [ptrs[1][i] for i in idx]
        # Absent optional states (layout None) are null rows the kernel's switches never read.
        sp = [None if role is None else role[i] for role in states for i in idx]
        out.append((pd, gd, len(idx), (ctypes.c_int64 * len(idx))(*[sizes[i] for i in idx]),
                    _ptr_array(pp), _ptr_array(gp), _ptr_array(sp) if sp else None))
    return out


def _launch(family: int, params: Tensors, grads: Tensors | None, states: Sequence[Tensors | None],
            scalars: Sequence[float], flags: Sequence[int]) -> None:
    lib = library()
    sc = (ctypes.c_float * max(1, len(scalars)))(*scalars)
    fl = (ctypes.c_int * max(1, len(flags)))(*[int(f) for f in flags])
    nthreads = max(1, torch.get_num_threads())
    for role in ([grads] if grads is not None else []) + [ts for ts in states if ts is not None]:
        if len(role) != len(params):
            raise ValueError("cpu_kernels: every grad and state tensor must match its param's size")
    fix = _Contiguous()
    ps = fix.role(params, True)
    gs = None if grads is None else fix.role(grads, False)
    ss = [None if ts is None else fix.role(ts, True) for ts in states]
    roles = [ps] + ([gs] if gs is not None else []) + [ts for ts in ss if ts is not None]
    numels = tuple(tuple(map(_T.numel, ts)) for ts in roles)
    ptrs = [tuple(map(_T.data_ptr, ts)) for ts in roles]
    # Absent states keep their place (None) so that S's rows stay where the kernel looks for them.
    it = iter(ptrs[2 if gs is not None else 1:])
    ptrs = ptrs[:2 if gs is not None else 1] + [None if ts is None else next(it) for ts in ss]
    build = lambda: _step_tables(ptrs, numels, ps, gs)  # noqa: E731
    if fix.copied:  # fresh copies: their pointers say nothing about the next call
        tables = build()
    else:
        key = (family, gs is None, tuple(ptrs), numels, tuple(map(_DTYPE, ps)),
               None if gs is None else tuple(map(_DTYPE, gs)))
        tables = TABLES.get(key, build)
    for pd, gd, n, numel, P, G, S in tables:
        rc = lib.dist_optim_step(family, pd, gd, n, numel, P, G, S, len(states), sc, fl, nthreads)
        if rc != 0:
            raise RuntimeError(f"cpu_kernels: step of family {family} failed with code {rc}")
    fix.finish()
    # The library writes through raw pointers: bump the version counters as an in-place torch op
    # would, so autograd still catches a saved param changed before its backward.
    torch.autograd.graph.increment_version(list(params) + [t for ts in states if ts is not None for t in ts])


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


def _sumsq_tables(ptrs, grads: Tensors):
    out = []
    for gd, idx in sorted(_buckets(grads, None).items()):
        n = len(idx)
        out.append((gd[0], n, (ctypes.c_int64 * n)(*[grads[i].numel() for i in idx]),
                    _ptr_array([ptrs[i] for i in idx])))
    return out


# Sums of squares at or above this round to inf in fp32 (FLT_MAX plus half an ulp).
_F32_OVERFLOW = 2.0**128 - 2.0**103


def sumsq_nonfinite(grads: Tensors) -> torch.Tensor:
    """[sum of squares, 1.0 if any element is inf/NaN or the fp32 sum overflowed else 0.0], fp32.
    Partial sums per fixed chunk in fp64, added in chunk order: the same bits at any thread count."""
    lib = library()
    total, bad = ctypes.c_double(0.0), ctypes.c_int(0)
    nthreads = max(1, torch.get_num_threads())
    fix = _Contiguous()
    gs = fix.role(grads, False)
    ptrs = tuple(map(_T.data_ptr, gs))
    build = lambda: _sumsq_tables(ptrs, gs)  # noqa: E731
    if fix.copied:
        tables = build()
    else:
        tables = TABLES.get(("sumsq", ptrs, tuple(map(_T.numel, gs)), tuple(map(_DTYPE, gs))), build)
    for gd, n, numel, G in tables:
        if lib.dist_optim_sumsq(gd, n, numel, G, ctypes.byref(total), ctypes.byref(bad), nthreads) != 0:
            raise RuntimeError("cpu_kernels: sum of squares failed")
    # The comparison is False for NaN too; the kernel flags an inf/NaN element by a non-finite total.
    flag = bool(bad.value) or not total.value < _F32_OVERFLOW
    return torch.tensor([total.value, float(flag)], dtype=torch.float32)
