"""Launchers: bucket the tensors by (param dtype, grad dtype), build the pointer tables, pass the
step's scalars as fp32 (as torch casts a Python scalar for an fp32 op) and call the library once
per bucket.

A moment held as int8 (dist_optim.state.layout: the moment's key holds uint8 codes, ``<key>_absmax``
the fp32 absmax per 256-element block) is passed as its codes plus an absmax table; each launcher
names which of its roles are signed (first moments) and which unsigned (second moments), the code
map the kernel then quantizes against."""

from __future__ import annotations

import ctypes
import functools
import struct
from collections import defaultdict
from collections.abc import Mapping, Sequence

import torch

from ._build import library
from ._threads import kernel_threads

Tensors = Sequence[torch.Tensor]

DTYPES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
SGD, ADAGRAD, RMSPROP, ADAM, RADAM, LOOKAHEAD = range(6)
# How a state role is stored (kernels.cpp StateKind): fp32, int8 against the signed / unsigned map,
# or (slow weights) bf16 / fp16.
FP32_STATE, SIGNED_INT8, UNSIGNED_INT8, BF16_STATE, F16_STATE = range(5)
FLOAT_KINDS = {torch.float32: FP32_STATE, torch.bfloat16: BF16_STATE, torch.float16: F16_STATE}
# How bf16 params are written (kernels.cpp RoundMode; dist_optim.state.rounding).
ROUND_MODES = {"nearest": 0, "stochastic": 1, "kahan": 2}
STOCHASTIC, KAHAN = ROUND_MODES["stochastic"], ROUND_MODES["kahan"]
KAHAN_KEY = "kahan_comp"  # dist_optim's state key of the Kahan compensation buffers
SLOW_KEY = "slow_buffer"
ABSMAX_SUFFIX = "_absmax"  # dist_optim.state.layout.ABSMAX_SUFFIX
QBLOCK = 256  # elements per absmax, fixed in kernels.cpp; code_tables checks it against the format


def f32(x: float) -> float:
    """x rounded to fp32, as the kernel will see it."""
    return struct.unpack("f", struct.pack("f", x))[0]


def lerp_coeffs(weight: float) -> tuple[float, float, bool]:
    """(w, w - 1, |w| < 0.5) in fp32 for torch's two-branch lerp with scalar weight w."""
    w = f32(weight)
    return w, f32(w - 1.0), abs(w) < 0.5


def accepts(params: Tensors, grads: Tensors | None = None, states: Mapping[str, Tensors] | None = None) -> bool:
    """Whether these tensors are for the CPU kernels: on the CPU, params and grads fp32/bf16/fp16,
    states fp32, or uint8 codes for a moment whose ``<key>_absmax`` (fp32) is present; slow weights
    fp32/bf16/fp16, Kahan buffers bf16. (Sizes are checked by the launcher, which reads them anyway.)"""
    ok = DTYPES.__contains__
    if not all(t.is_cpu and ok(t.dtype) for t in params):
        return False
    if grads is not None and not all(t.is_cpu and ok(t.dtype) for t in grads):
        return False
    states = states or {}
    for key, ts in states.items():
        if key == SLOW_KEY:
            allowed = FLOAT_KINDS.keys()
        elif key == KAHAN_KEY:
            allowed = (torch.bfloat16,)
        else:
            allowed = (torch.uint8 if key + ABSMAX_SUFFIX in states else torch.float32,)
        if not all(t.is_cpu and t.dtype in allowed for t in ts):
            return False
    return True


@functools.cache
def code_tables():
    """The kernels' code tables (ctypes fp32 [4 x 256]): the signed map, its thresholds, the unsigned
    map, its thresholds, from dist_optim.state.codes (the format's definition, read once)."""
    from dist_optim.state.codes import SIGNED, UNSIGNED, thresholds
    from dist_optim.state.layout import QBLOCK as FORMAT_QBLOCK

    if FORMAT_QBLOCK != QBLOCK:
        raise RuntimeError(f"cpu_kernels quantize {QBLOCK}-element blocks, the state format has {FORMAT_QBLOCK}")
    values = torch.cat([SIGNED, thresholds(SIGNED), UNSIGNED, thresholds(UNSIGNED)]).float()
    return (ctypes.c_float * values.numel())(*values.tolist())


class Role:
    """One state role of a launch: its tensors (fp32 or, for slow weights, bf16/fp16; or uint8 codes
    with ``absmax`` beside them) and the code map an int8 role uses (SIGNED_INT8 for first moments,
    UNSIGNED_INT8 for second)."""

    __slots__ = ("tensors", "absmax", "code")

    def __init__(self, tensors: Tensors, absmax: Tensors | None, code: int):
        self.tensors = tensors
        self.absmax = absmax
        self.code = code

    @property
    def quantized(self) -> bool:
        return self.absmax is not None


def role(states: Mapping[str, Tensors], key: str, code: int) -> Role:
    return Role(states[key], states.get(key + ABSMAX_SUFFIX), code)


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


def _buckets(params: Tensors, grads: Tensors | None, kinds=None) -> dict[tuple, list[int]]:
    """Tensor indices per (param dtype, grad dtype[, state kinds]); ``kinds``: per tensor, its state
    roles' StateKinds (one kernel call takes one storage per role)."""
    buckets: dict[tuple, list[int]] = defaultdict(list)
    for i, p in enumerate(params):
        if p.numel() > 0:
            g = p if grads is None else grads[i]
            key = (DTYPES[p.dtype], DTYPES[g.dtype])
            buckets[key if kinds is None else key + (kinds[i],)].append(i)
    return buckets


def _num_blocks(n: int) -> int:
    return -(-n // QBLOCK)


def _step_tables(ptrs, numels, absmax_ptrs, absmax_numels, comp_ptrs, kinds, params: Tensors, grads: Tensors | None):
    """[(param dtype, grad dtype, tensors, numel table, P, G, S, A, kinds, C, indices)] per bucket.
    ptrs: per role, params first, then grads when present, then every state slot (None where
    absent); numels: per role present; absmax_ptrs / absmax_numels: per state slot, None unless it
    is int8; comp_ptrs: the Kahan buffers' or None; kinds: per tensor, its state slots' StateKinds."""
    sizes = numels[0]
    if any(ns != sizes for ns in numels[1:]):
        raise ValueError("cpu_kernels: every grad and state tensor must match its param's size")
    for ns in absmax_numels:
        if ns is not None and list(ns) != [_num_blocks(n) for n in sizes]:
            raise ValueError(f"cpu_kernels: an int8 state's absmax must hold one value per {QBLOCK} elements of "
                             f"its param: got {list(ns)} for params of {list(sizes)} elements")
    has_grads = grads is not None
    states = ptrs[2 if has_grads else 1:]
    out = []
    for key, idx in _buckets(params, grads, kinds).items():
        pd, gd = key[0], key[1]
        pp = [ptrs[0][i] for i in idx]
        gp = pp if not has_grads else [ptrs[1][i] for i in idx]
        # Absent optional states (layout None) are null rows the kernel's switches never read.
        sp = [None if role is None else role[i] for role in states for i in idx]
        ap = [None if role is None else role[i] for role in absmax_ptrs for i in idx]
        role_kinds = kinds[idx[0]]
        out.append((pd, gd, len(idx), (ctypes.c_int64 * len(idx))(*[sizes[i] for i in idx]),
                    _ptr_array(pp), _ptr_array(gp), _ptr_array(sp) if sp else None,
                    _ptr_array(ap) if any(ap) else None, (ctypes.c_int * max(1, len(role_kinds)))(*role_kinds),
                    None if comp_ptrs is None else _ptr_array([comp_ptrs[i] for i in idx]), idx))
    return out


def _tensor_kinds(roles: Sequence[Role | None], n: int) -> tuple:
    """Per tensor, the StateKind of each state slot (a float role's from its tensor's dtype)."""
    per_role = []
    for r in roles:
        if r is None:
            per_role.append((FP32_STATE,) * n)
        elif r.quantized:
            per_role.append((r.code,) * n)
        else:
            per_role.append(tuple(FLOAT_KINDS[d] for d in map(_DTYPE, r.tensors)))
    return tuple(zip(*per_role)) if per_role else ((),) * n


def _rounding(params: Tensors, states, bf16_update: str, sr_seeds, sr_step, steps, sync: bool = False):
    """(mode, per-param stream seeds or None, Kahan buffers or None) of a call: the write rule of
    dist_optim.state.rounding for its bf16 params. A Lookahead sync writes the slow weights to the
    params (to nearest) whatever the mode, leaving the Kahan buffers as they are."""
    if bf16_update not in ROUND_MODES:
        raise ValueError(f"Invalid bf16_update: {bf16_update!r} (must be one of "
                         f"{', '.join(map(repr, ROUND_MODES))})")
    mode = ROUND_MODES[bf16_update]
    if mode == 0 or sync or not any(p.dtype == torch.bfloat16 for p in params):
        return 0, None, None
    if mode == KAHAN:
        comps = states.get(KAHAN_KEY)
        if comps is None or len(comps) != len(params):
            raise ValueError("bf16_update='kahan' needs states['kahan_comp'], one bf16 buffer per param")
        for p, c in zip(params, comps):
            if p.dtype == torch.bfloat16 and (c.dtype != torch.bfloat16 or c.numel() != p.numel()):
                raise ValueError(f"kahan_comp must be bf16 like its param ({p.numel()} elements), got "
                                 f"{c.dtype} with {c.numel()}")
        return mode, None, comps
    if sr_seeds is None or len(sr_seeds) != len(params):
        raise ValueError(f"bf16_update='stochastic' needs sr_seeds, one per param ({len(params)}), got "
                         f"{None if sr_seeds is None else len(sr_seeds)}")
    if sr_step is None and steps is None:
        raise ValueError("bf16_update='stochastic' needs the step count of the streams (sr_step= or steps=)")
    from dist_optim.state.rounding import step_stream

    ts = [sr_step] * len(params) if sr_step is not None else [int(c.reshape(())) for c in steps]
    return mode, [step_stream(int(seed), t) for seed, t in zip(sr_seeds, ts)], None


def _launch(family: int, params: Tensors, grads: Tensors | None, states: Sequence[Role | None],
            scalars: Sequence[float], flags: Sequence[int], rounding=(0, None, None)) -> None:
    lib = library()
    sc = (ctypes.c_float * max(1, len(scalars)))(*scalars)
    fl = (ctypes.c_int * max(1, len(flags)))(*[int(f) for f in flags])
    mode, streams, comps = rounding
    maps = code_tables() if any(r is not None and r.quantized for r in states) else None
    nthreads = kernel_threads()
    for ts in ([grads] if grads is not None else []) + [r.tensors for r in states if r is not None] + \
            [r.absmax for r in states if r is not None and r.absmax is not None]:
        if len(ts) != len(params):
            raise ValueError("cpu_kernels: every grad and state tensor must match its param's size")
    fix = _Contiguous()
    ps = fix.role(params, True)
    gs = None if grads is None else fix.role(grads, False)
    ss = [None if r is None else fix.role(r.tensors, True) for r in states]
    aa = [None if r is None or r.absmax is None else fix.role(r.absmax, True) for r in states]
    cs = None if comps is None else fix.role(comps, True)
    roles = [ps] + ([gs] if gs is not None else []) + [ts for ts in ss if ts is not None]
    numels = tuple(tuple(map(_T.numel, ts)) for ts in roles)
    if cs is not None and tuple(map(_T.numel, cs)) != numels[0]:
        raise ValueError("cpu_kernels: every Kahan buffer must match its param's size")
    ptrs = [tuple(map(_T.data_ptr, ts)) for ts in roles]
    # Absent states keep their place (None) so that S's rows stay where the kernel looks for them.
    it = iter(ptrs[2 if gs is not None else 1:])
    ptrs = ptrs[:2 if gs is not None else 1] + [None if ts is None else next(it) for ts in ss]
    absmax_ptrs = tuple(None if ts is None else tuple(map(_T.data_ptr, ts)) for ts in aa)
    absmax_numels = tuple(None if ts is None else tuple(map(_T.numel, ts)) for ts in aa)
    comp_ptrs = None if cs is None else tuple(map(_T.data_ptr, cs))
    fixed = [None if r is None else Role(t, a, r.code) for r, t, a in zip(states, ss, aa)]
    state_dtypes = tuple(None if ts is None else tuple(map(_DTYPE, ts)) for ts in ss)
    build = lambda: _step_tables(ptrs, numels, absmax_ptrs, absmax_numels, comp_ptrs,  # noqa: E731
                                 _tensor_kinds(fixed, len(ps)), ps, gs)
    if fix.copied:  # fresh copies: their pointers say nothing about the next call
        tables = build()
    else:
        key = (family, gs is None, tuple(ptrs), numels, absmax_ptrs, absmax_numels, comp_ptrs, state_dtypes,
               tuple(map(_DTYPE, ps)), None if gs is None else tuple(map(_DTYPE, gs)))
        tables = TABLES.get(key, build)
    for pd, gd, n, numel, P, G, S, A, kinds, C, idx in tables:
        bucket_streams = None
        if mode == STOCHASTIC and pd == DTYPES[torch.bfloat16]:
            bucket_streams = (ctypes.c_uint32 * n)(*[streams[i] for i in idx])
        rc = lib.dist_optim_step(family, pd, gd, n, numel, P, G, S, A, kinds, maps, len(states), mode,
                                 bucket_streams, C, sc, fl, nthreads)
        if rc != 0:
            raise RuntimeError(f"cpu_kernels: step of family {family} failed with code {rc}")
    fix.finish()
    # The library writes through raw pointers: bump the version counters as an in-place torch op
    # would, so autograd still catches a saved param changed before its backward.
    written = [t for r in states if r is not None for ts in (r.tensors, r.absmax or ()) for t in ts]
    torch.autograd.graph.increment_version(list(params) + written + list(comps or ()))


def sgd_step(params, grads, states, *, lr, momentum, dampening, weight_decay, nesterov, first_step, grad_scale,
             bf16_update="nearest", sr_seeds=None, sr_step=None, steps=None) -> None:
    has_momentum = momentum != 0.0
    bufs = [role(states, "momentum_buffer", SIGNED_INT8)] if has_momentum else []
    _launch(SGD, params, grads, bufs, [grad_scale, weight_decay, momentum, 1.0 - dampening, -lr],
            [weight_decay != 0.0, has_momentum, first_step, nesterov],
            _rounding(params, states, bf16_update, sr_seeds, sr_step, steps))


def adagrad_step(params, grads, states, *, clr, weight_decay, eps, grad_scale, bf16_update="nearest", sr_seeds=None,
                 sr_step=None, steps=None) -> None:
    _launch(ADAGRAD, params, grads, [role(states, "sum", UNSIGNED_INT8)], [grad_scale, weight_decay, eps, -clr],
            [weight_decay != 0.0], _rounding(params, states, bf16_update, sr_seeds, sr_step, steps))


def rmsprop_step(params, grads, states, *, lr, alpha, eps, weight_decay, momentum, centered, grad_scale,
                 bf16_update="nearest", sr_seeds=None, sr_step=None, steps=None) -> None:
    has_momentum = momentum > 0.0
    w, wm1, small = lerp_coeffs(1.0 - alpha)
    roles = [role(states, "square_avg", UNSIGNED_INT8),
             role(states, "momentum_buffer", SIGNED_INT8) if has_momentum else None,
             role(states, "grad_avg", SIGNED_INT8) if centered else None]
    # int8 moments: v - m^2 is clamped at 0 before its sqrt, as on the torch path
    clamp = centered and any(r.quantized for r in roles if r is not None)
    _launch(RMSPROP, params, grads, roles, [grad_scale, weight_decay, alpha, w, eps, momentum, -lr, wm1],
            [weight_decay != 0.0, centered, has_momentum, small, clamp],
            _rounding(params, states, bf16_update, sr_seeds, sr_step, steps))


def adam_step(params, grads, states, *, lr, beta1, beta2, eps, weight_decay, decoupled, amsgrad, step_size,
              bias_correction2_sqrt, grad_scale, bf16_update="nearest", sr_seeds=None, sr_step=None,
              steps=None) -> None:
    w, wm1, small = lerp_coeffs(1.0 - beta1)
    roles = [role(states, "exp_avg", SIGNED_INT8), role(states, "exp_avg_sq", UNSIGNED_INT8),
             role(states, "max_exp_avg_sq", UNSIGNED_INT8) if amsgrad else None]
    _launch(ADAM, params, grads, roles,
            [grad_scale, weight_decay, 1.0 - lr * weight_decay, w, wm1, beta2, 1.0 - beta2, eps, -step_size,
             bias_correction2_sqrt, 0.0],
            [weight_decay != 0.0, decoupled, small, amsgrad],
            _rounding(params, states, bf16_update, sr_seeds, sr_step, steps))


def radam_step(params, grads, states, *, lr, beta1, beta2, eps, weight_decay, decoupled, rectified, step_size,
               lookahead_alpha, grad_scale, bf16_update="nearest", sr_seeds=None, sr_step=None, steps=None) -> None:
    w, wm1, small = lerp_coeffs(1.0 - beta1)
    sync = lookahead_alpha is not None
    # The slow weights are never quantized: a float role (fp32/bf16/fp16) beside the moments.
    roles = [role(states, "exp_avg", SIGNED_INT8), role(states, "exp_avg_sq", UNSIGNED_INT8),
             Role(states[SLOW_KEY], None, FP32_STATE) if sync else None]
    _launch(RADAM, params, grads, roles,
            [grad_scale, weight_decay, 1.0 - lr * weight_decay, w, wm1, beta2, 1.0 - beta2, eps, -step_size,
             1.0, lookahead_alpha if sync else 0.0],
            [weight_decay != 0.0, decoupled, small, rectified, sync],
            _rounding(params, states, bf16_update, sr_seeds, sr_step, steps, sync=sync))


def lookahead_sync(params, slow_buffers, *, alpha) -> None:
    _launch(LOOKAHEAD, params, None, [Role(slow_buffers, None, FP32_STATE)], [alpha], [])


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
    nthreads = kernel_threads()
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
