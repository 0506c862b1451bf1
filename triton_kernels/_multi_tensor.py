"""One launch per (param dtype, grad dtype, device) bucket over many tensors, through pointer tables.

For a bucket the launcher has, on the device, one int64 table of data pointers per role (param,
grad, each state) and an int64 chunk table with one row per program: (tensor index, first element,
end element, fast). Program i handles elements [first, end) of its tensor, at most CHUNK of them,
in BLOCK-sized steps. Empty tensors get no program.

A chunk is *fast* when it is full (CHUNK elements) and every role's data pointer for its tensor is
16-byte aligned: the kernel then runs it without masks and tells the compiler the alignment, which
is what lets it use 128-bit loads and stores. Any other chunk (a tensor's tail, or a tensor that
is a view at an odd offset, e.g. a slice of a ZeRO flat buffer) runs masked with element-wise
accesses. Chunk starts are multiples of CHUNK, so an aligned tensor's full chunks are aligned too.
Addresses are int64: a chunk's base is pointer + int64 start, and offsets inside a chunk are
below CHUNK.

Some roles are per tensor, not per element: a one-element fp32 counter per tensor (its step count,
its Lookahead count), which a program reads once to derive its own scalars. They get a pointer
table like any role, and take no part in deciding which chunks are fast.

Tables depend only on the pointers and sizes, so they are cached (``TableCache``, bounded) under
exactly that key: a step over the same storage reuses them, and any storage change misses.

Block sizes are fixed rather than autotuned: the kernels update in place through pointer tables,
and triton.autotune's benchmarking would replay the update on the real tensors (its restore_value
sees the tables, not the data they point to). An element-wise, memory-bound kernel is insensitive
to the choice past 1024 elements x 4 warps.
"""

from __future__ import annotations

import contextlib
from collections import defaultdict
from operator import attrgetter, is_
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import NamedTuple

import torch

from . import _launch
from ._support import interpreting

# Interpreter sizes are small so that tests at a few thousand elements cross chunk and block edges.
GPU_CHUNK, GPU_BLOCK = 16384, 1024
CHUNK, BLOCK = (256, 64) if interpreting() else (GPU_CHUNK, GPU_BLOCK)
NUM_WARPS = 4
# The int8-state variants: each quantized moment adds a binary search (8 table gathers, int64
# offsets) per element, and at 4 warps over a 1024-element tile some specializations spilled (4-28
# bytes, sm_80/sm_90); 8 warps halve the elements per thread and compile spill-free, at the cost of
# 64-bit rather than 128-bit accesses for bf16 params and grads (fp32 keep 128-bit).
QUANT_NUM_WARPS = 8
ALIGN = 16  # bytes: one 128-bit access
CHUNK_ROW = 4  # int64 fields per chunk-table row: tensor index, first element, end element, fast


def tl_dtype(dtype: torch.dtype):
    import triton.language as tl

    try:
        return {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}[dtype]
    except KeyError:
        raise ValueError(f"unsupported dtype {dtype}: params and grads must be fp32, bf16 or fp16") from None


_numel, _data_ptr, _is_contiguous = torch.Tensor.numel, torch.Tensor.data_ptr, torch.Tensor.is_contiguous
_dtype, _device = attrgetter("dtype"), attrgetter("device")


def check(name: str, reference: Sequence[torch.Tensor], tensors: Sequence[torch.Tensor], *, fp32: bool,
          dtypes: tuple = (torch.float32,)) -> None:
    """Same count, sizes and device as ``reference``, contiguous; with ``fp32``, of one of ``dtypes``
    (the state dtypes a role may hold: fp32, or fp32/bf16/fp16 for slow weights)."""
    # The usual case in C-level passes (a step checks its grads every call); the loop below finds
    # and names the offending tensor otherwise.
    if (len(tensors) == len(reference) and list(map(_numel, tensors)) == list(map(_numel, reference))
            and all(map(_is_contiguous, tensors)) and len(devices := set(map(_device, tensors))) <= 1
            and devices == set(map(_device, reference)) and (not fp32 or set(map(_dtype, tensors)) <= set(dtypes))):
        return
    if len(tensors) != len(reference):
        raise ValueError(f"{name}: {len(tensors)} tensors for {len(reference)} params")
    for i, (r, t) in enumerate(zip(reference, tensors)):
        if t.numel() != r.numel():
            raise ValueError(f"{name}[{i}] has {t.numel()} elements, its param {r.numel()}")
        if t.device != r.device:
            raise ValueError(f"{name}[{i}] is on {t.device}, its param on {r.device}")
        if not t.is_contiguous():
            raise ValueError(f"{name}[{i}] is not contiguous")
        if fp32 and t.dtype not in dtypes:
            allowed = "fp32" if dtypes == (torch.float32,) else "one of " + ", ".join(map(str, dtypes))
            raise ValueError(f"{name}[{i}] is {t.dtype}; optimizer state must be {allowed}")


def check_counters(name: str, reference: Sequence[torch.Tensor], counters: Sequence[torch.Tensor]) -> None:
    """One one-element fp32 tensor per param, on its param's device (any shape: 0-dim is typical)."""
    if len(counters) != len(reference):
        raise ValueError(f"{name}: {len(counters)} tensors for {len(reference)} params")
    for i, (r, c) in enumerate(zip(reference, counters)):
        if not isinstance(c, torch.Tensor) or c.numel() != 1 or c.dtype != torch.float32 or c.device != r.device:
            raise ValueError(f"{name}[{i}] must be a one-element fp32 tensor on {r.device}")


def buckets(params: Sequence[torch.Tensor], grads: Sequence[torch.Tensor] | None = None) -> dict:
    """Indices of the non-empty tensors per (param dtype, grad dtype, device), in order."""
    numels = list(map(_numel, params))
    p_dtypes, devices = set(map(_dtype, params)), set(map(_device, params))
    g_set = {None} if grads is None else set(map(_dtype, grads))
    if len(p_dtypes) == len(g_set) == len(devices) == 1:  # one bucket: the usual case, in C-level passes
        idx = [i for i, n in enumerate(numels) if n]
        return {(*p_dtypes, *g_set, *devices): idx} if idx else {}
    out: dict = defaultdict(list)
    g_dtypes = [None] * len(params) if grads is None else [g.dtype for g in grads]
    for i, (p, g_dtype) in enumerate(zip(params, g_dtypes)):
        if p.numel():
            out[(p.dtype, g_dtype, p.device)].append(i)
    return out


def chunk_rows(numels: Sequence[int], aligned: Sequence[bool], chunk: int = CHUNK) -> list[int]:
    """The chunk table, flattened: (tensor index, first, end, fast) per chunk."""
    rows: list[int] = []
    for j, (n, ok) in enumerate(zip(numels, aligned)):
        for start in range(0, n, chunk):
            end = min(start + chunk, n)
            rows += (j, start, end, int(ok and end - start == chunk))
    return rows


class TableCache:
    """Device tables keyed on (device, pointers per role, sizes); least recently used out first."""

    def __init__(self, maxsize: int = 128):
        self.maxsize = maxsize
        # key -> [entry, last use]: a hit stamps its use instead of reordering, which would hash the
        # key (a tuple of every pointer of a launch) a second time per lookup
        self._tables: dict = {}
        self._clock = 0
        self._pinned: set = set()  # keys a captured CUDA graph reads: never evicted
        self.builds = 0  # tables built so far (tests count them)
        # Inside ``one_step``: the grads the step's last plan checked, as (the tensors, their
        # pointers, sizes, dtypes); None outside it, and until the step's first plan.
        self._checked_grads: tuple | None = None
        self._in_step = False

    @contextlib.contextmanager
    def one_step(self) -> Iterator[None]:
        """The launches of one optimizer step, between which no other code touches the grads: an
        update launch over the very grad tensors that the step's statistics launch checked (the same
        objects, in order) takes their pointers and checks from it instead of reading them again.
        Only within the block: between steps a grad may be given new storage (``.data =``, ``set_``)
        while staying the same object."""
        self._in_step, self._checked_grads = True, None
        try:
            yield
        finally:
            self._in_step, self._checked_grads = False, None

    def get(self, roles: Sequence[Sequence[torch.Tensor] | None], idx: Sequence[int], device: torch.device,
            elementwise: int | None = None, validate: Callable[[], None] | None = None):
        """(pointer table per role — the first role's stands in for absent ones, which the kernel's
        constexpr switches never read — chunk table, number of chunks). Roles past the first
        ``elementwise`` (default: all) are per-tensor counters: tabled, but a counter's address does
        not decide whether its tensor's chunks are fast. ``validate`` runs before a table is built:
        the tensors behind a cached table passed it (a step over the same storage is not checked
        again, which keeps a steady-state step's host work to the key)."""
        whole = len(idx) == len(roles[0])  # one bucket: every tensor, in order
        first = roles[0] if whole else [roles[0][i] for i in idx]
        ptrs = tuple(
            None if role is None else tuple(map(_data_ptr, role)) if whole else tuple(role[i].data_ptr() for i in idx)
            for role in roles
        )
        numels = tuple(map(_numel, first))
        key = (device, ptrs, numels)
        hit = self._lookup(key)
        if hit is not None:
            return hit
        if validate is not None:
            validate()
        filled = [p if p is not None else ptrs[0] for p in ptrs]
        aligned = [all(p[j] % ALIGN == 0 for p in filled[:elementwise]) for j in range(len(idx))]
        rows = chunk_rows(numels, aligned)
        return self._store(key, (
            [device_table(p, device) for p in filled],
            device_table(rows, device),
            len(rows) // CHUNK_ROW,
        ))

    def plan(self, roles: Sequence[Sequence[torch.Tensor] | None], checked: int, build: Callable[[], list]) -> list:
        """A whole launch's buckets with their tables, ``build()``'s list, cached under the roles'
        pointers and the first role's sizes. Role ``checked`` holds tensors that are not ours (the
        grads): they may sit at a cached address with another size, dtype or layout, so on a hit
        their sizes, contiguity and dtypes are compared with the cached ones (a few C-level passes;
        a mismatch builds again, through ``build``'s full checks). The first role's dtypes are
        compared too: the kernels' element size comes from them. Devices need no check: a
        pointer names its device (one virtual address space across host and GPUs)."""
        first, others = roles[0], roles[checked]
        numels = tuple(map(_numel, first))
        known = self._checked_grads
        if known is not None and not (len(known[0]) == len(others) and all(map(is_, known[0], others))):
            known = None
        ptrs = tuple(None if r is None else known[1] if known is not None and r is others else tuple(map(_data_ptr, r))
                     for r in roles)
        key = ("plan", ptrs, numels)
        first_dtypes = list(map(_dtype, first))
        dtypes = (first_dtypes, first_dtypes if checked == 0 else known[3] if known is not None
                  else list(map(_dtype, others)))
        hit = self._lookup(key)
        if hit is not None:
            built, cached_dtypes = hit
            if cached_dtypes == dtypes and (
                    (known is not None and known[2] == numels)  # checked by this step's statistics launch
                    or ((checked == 0 or tuple(map(_numel, others)) == numels) and all(map(_is_contiguous, others)))):
                self._note_checked(others, ptrs[checked], numels, dtypes[1])
                return built
        built = build()
        self._store(key, (built, dtypes))
        self._note_checked(others, ptrs[checked], numels, dtypes[1])
        return built

    def _note_checked(self, grads, ptrs, numels, dtypes) -> None:
        """In ``one_step``: the grads a plan has just checked (contiguous, of the kernels' dtypes,
        sized like the first role), for the step's next launches over them."""
        if self._in_step:  # a tuple: the caller's list may change after this
            self._checked_grads = (tuple(grads), ptrs, numels, dtypes)

    def pointers(self, tensors: Sequence[torch.Tensor], device: torch.device,
                 validate: Callable[[], None] | None = None) -> torch.Tensor:
        """An int64 device table of the tensors' data pointers (e.g. every step counter of a step).
        An empty list gets one null entry: a kernel argument needs an allocation behind it, though
        the kernel reads no entry. ``validate`` runs before a table is built (see ``get``)."""
        key = ("pointers", device, tuple(map(_data_ptr, tensors)))
        hit = self._lookup(key)
        if hit is not None:
            return hit
        if validate is not None:
            validate()
        return self._store(key, device_table(key[2] or (0,), device))

    def _lookup(self, key):
        hit = self._tables.get(key)
        if hit is None:
            return None
        self._clock += 1
        hit[1] = self._clock
        if capturing():
            self._pinned.add(key)
        return hit[0]

    def _store(self, key, built):
        self.builds += 1
        self._clock += 1
        self._tables[key] = [built, self._clock]
        if capturing():
            self._pinned.add(key)
        if len(self._tables) > self.maxsize:
            # The least recently used entry no CUDA graph reads: a captured graph holds the tables'
            # addresses, so an entry looked up during a capture stays for the life of the process.
            unpinned = [k for k in self._tables if k not in self._pinned]
            if unpinned:
                del self._tables[min(unpinned, key=lambda k: self._tables[k][1])]
        return built


def capturing() -> bool:
    """Whether a CUDA graph is being captured on the current stream."""
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


def device_table(values: Sequence[int], device: torch.device) -> torch.Tensor:
    """An int64 table on ``device``. On CUDA it goes through pinned memory with a non-blocking
    copy: a pageable copy would wait for the stream, a host sync on the step that builds a table
    (the pinned block is not reused before the copy has run: torch's host allocator records it)."""
    table = torch.tensor(values, dtype=torch.int64)
    if device.type != "cuda":
        return table.to(device)
    return table.pin_memory().to(device, non_blocking=True)


# Bounded (TableCache.maxsize entries): one entry per (bucket, set of storages) in use, and one plan
# per launch over them — ZeRO-3
# steps each sub-group separately, so a model has as many sets as sub-groups times dtypes. An entry
# holds only int64 tables, never the tensors.
TABLES = TableCache(maxsize=256)


def tables(roles: Sequence[Sequence[torch.Tensor] | None], idx: Sequence[int], device: torch.device,
           elementwise: int | None = None, validate: Callable[[], None] | None = None):
    return TABLES.get(roles, idx, device, elementwise, validate)


def device_scalar(name: str, value, device: torch.device):
    """A hyperparameter as the kernels take it: a Python number as a float (so ``lr=1`` compiles no
    other specialization than ``lr=0.5``), or a one-element fp32 tensor on the params' device, which
    the kernel reads there (no host sync; a new value needs no new launch arguments)."""
    if isinstance(value, torch.Tensor):
        if value.numel() != 1 or value.dtype != torch.float32 or value.device != device:
            raise ValueError(f"{name} must be a float or a one-element fp32 tensor on {device}; got "
                             f"{value.dtype} {tuple(value.shape)} on {value.device}")
        return value
    return float(value)


def skip_flag(skip, device: torch.device):
    """(pointer argument, HAS_SKIP) for an optional one-element device flag: nonzero skips the step."""
    if skip is None:
        return None, False
    if not isinstance(skip, torch.Tensor) or skip.numel() != 1 or skip.device != device:
        raise ValueError(f"skip must be a one-element tensor on {device}")
    return skip, True


def step_scalars(steps, values):
    """The launcher's step-derived scalars: placeholders when the kernel derives them from
    ``steps``, else the caller's (all of them required)."""
    if steps is None:
        if any(v is None for v in values):
            raise ValueError("without steps=, the step-derived scalars must be given")
        return values
    if any(v is not None for v in values):
        raise ValueError("with steps=, the kernel derives the step-derived scalars: pass None for them")
    return [0.0] * len(values)


def exact(value) -> float:
    """A float hyperparameter for an fp64 kernel argument (0.0 where it is a device tensor: the
    kernel reads that one)."""
    return 0.0 if isinstance(value, torch.Tensor) else float(value)


# ---------------------------------------------------------------------------------------------
# bf16 param stores (dist_optim.state.rounding; the kernels' side is _jit.store_param).

ROUNDING_MODES = ("nearest", "stochastic", "kahan")
SLOW_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


class Rounding(NamedTuple):
    """How a launch stores bf16 params: ``mode`` 0 nearest, 1 stochastic, 2 kahan; ``comp`` the
    Kahan buffers (kahan), ``seeds`` one 0-dim int64 stream base per param and ``sr_step`` the host
    flow's step count (stochastic; ``steps`` set instead: each tensor's count from its counter)."""

    mode: int = 0
    comp: Sequence | None = None
    seeds: Sequence | None = None
    sr_step: int = 0
    from_steps: bool = False


NEAREST = Rounding()


def rounding(bf16_update: str, states: Mapping[str, Sequence[torch.Tensor]], sr_seeds, sr_step, steps) -> Rounding:
    """A launcher's rounding arguments, checked: ``bf16_update`` one of ROUNDING_MODES; with
    "stochastic", ``sr_seeds`` and exactly one of ``sr_step`` (int) and ``steps`` (counters); with
    "kahan", ``states["kahan_comp"]``. Entries for params that are not bf16 are never read (may be None)."""
    if bf16_update not in ROUNDING_MODES:
        raise ValueError(f"Invalid bf16_update: {bf16_update!r} (must be one of {', '.join(map(repr, ROUNDING_MODES))})")
    if bf16_update == "nearest":
        return NEAREST
    if bf16_update == "kahan":
        if "kahan_comp" not in states:
            raise ValueError('bf16_update="kahan" needs the bf16 buffers in states["kahan_comp"]')
        return Rounding(2, comp=states["kahan_comp"])
    if sr_seeds is None:
        raise ValueError('bf16_update="stochastic" needs sr_seeds (one 0-dim int64 tensor per param)')
    if (sr_step is None) == (steps is None):
        raise ValueError('bf16_update="stochastic" takes its step count from sr_step (host flow) or steps= '
                         f'(device flow), exactly one of them; got sr_step={sr_step!r} and steps='
                         f'{"None" if steps is None else "counters"}')
    if sr_step is not None and (isinstance(sr_step, bool) or not isinstance(sr_step, int) or sr_step < 0):
        raise ValueError(f"Invalid sr_step: {sr_step!r} (must be a non-negative int)")
    return Rounding(1, seeds=sr_seeds, sr_step=0 if sr_step is None else sr_step, from_steps=steps is not None)


def _filled(role: Sequence, params: Sequence[torch.Tensor]) -> Sequence:
    # An entry a kernel never reads (a param that is not bf16) may be None: its param stands in.
    if not any(map(_is_none, role)):
        return role
    return [p if r is None else r for r, p in zip(role, params)]


def _is_none(x) -> bool:
    return x is None


def check_rounding(r: Rounding, params: Sequence[torch.Tensor]) -> None:
    """The Kahan buffers and seeds of the bf16 params."""
    if r.mode == 0:
        return
    role = r.comp if r.mode == 2 else r.seeds
    name = "kahan_comp" if r.mode == 2 else "sr_seeds"
    if len(role) != len(params):
        raise ValueError(f"{name}: {len(role)} tensors for {len(params)} params")
    for i, (p, x) in enumerate(zip(params, role)):
        if p.dtype != torch.bfloat16 or p.numel() == 0:
            continue
        if not isinstance(x, torch.Tensor) or x.device != p.device:
            raise ValueError(f"{name}[{i}] must be a tensor on {p.device}, got {type(x).__name__}")
        if r.mode == 2 and (x.dtype != torch.bfloat16 or x.numel() != p.numel() or not x.is_contiguous()):
            raise ValueError(f"kahan_comp[{i}] must be a contiguous bf16 tensor of {p.numel()} elements, got "
                             f"{x.dtype} {tuple(x.shape)}")
        if r.mode == 1 and (x.dtype != torch.int64 or x.numel() != 1):
            raise ValueError(f"sr_seeds[{i}] must be a one-element int64 tensor, got {x.dtype} {tuple(x.shape)}")


def slow_dtype(slow: Sequence[torch.Tensor], idx: Sequence[int]) -> torch.dtype:
    """The one dtype of a bucket's slow weights (fp32, bf16 or fp16)."""
    dtypes = set(map(_dtype, slow)) if len(idx) == len(slow) else {slow[i].dtype for i in idx}
    if len(dtypes) != 1 or not dtypes <= set(SLOW_DTYPES):
        raise ValueError(f"slow weights of one launch bucket must share one dtype of fp32, bf16, fp16; got "
                         f"{sorted(map(str, dtypes))}")
    return dtypes.pop()


def absmax_roles(states: Mapping[str, Sequence[torch.Tensor]], keys: Sequence[str | None]) -> list:
    """Per state role, its int8 absmax tensors (``<key>_absmax``, dist_optim.state.layout) or None
    for an fp32 role or an absent one."""
    return [states.get(k + "_absmax") if k else None for k in keys]


# Code maps and threshold tables per device: (signed code, signed thresholds, unsigned code, unsigned
# thresholds), made once (a steady-state step builds no tensor).
_CODE_TABLES: dict = {}


def code_tables(device: torch.device) -> tuple[torch.Tensor, ...]:
    tables_ = _CODE_TABLES.get(device)
    if tables_ is None:
        from dist_optim.state.codes import SIGNED, UNSIGNED, thresholds

        tables_ = _CODE_TABLES[device] = tuple(t.to(device) for t in (SIGNED, thresholds(SIGNED), UNSIGNED,
                                                                      thresholds(UNSIGNED)))
    return tables_


def quant_block() -> int:
    from dist_optim.state.layout import QBLOCK

    return QBLOCK


def check_int8(name: str, reference: Sequence[torch.Tensor], codes: Sequence[torch.Tensor],
               absmax: Sequence[torch.Tensor], qblock: int) -> None:
    check(name, reference, codes, fp32=False)
    if len(absmax) != len(reference):
        raise ValueError(f"{name} absmax: {len(absmax)} tensors for {len(reference)} params")
    for i, (r, c, a) in enumerate(zip(reference, codes, absmax)):
        if c.dtype != torch.uint8:
            raise ValueError(f"{name}[{i}] is {c.dtype}; int8 state codes must be uint8")
        blocks = -(-r.numel() // qblock)
        if a.dtype != torch.float32 or a.numel() != blocks or a.device != r.device or not a.is_contiguous():
            raise ValueError(f"{name}[{i}]'s absmax must be a contiguous fp32 tensor of {blocks} elements on "
                             f"{r.device}, got {a.dtype} {tuple(a.shape)} on {a.device}")


def launch(kernel, params, grads, states: Sequence[Sequence[torch.Tensor] | None], scalars: Sequence,
           compile_only: bool = False, skip: torch.Tensor | None = None,
           counters: Mapping[str, Sequence[torch.Tensor] | None] | None = None,
           absmax: Sequence[Sequence[torch.Tensor] | None] | None = None, rounding: Rounding | None = None,
           slow_role: int | None = None, **constexprs) -> None:
    """Run an update kernel ``kernel[(chunks,)](P, G, *states, *COUNTERS, CHUNKS, SKIP, *scalars, ...)``
    once per bucket. ``states`` and ``counters`` entries may be None (the kernel's switches say they
    are absent). ``counters``: per-tensor roles by name, in the kernel's order, each one one-element
    fp32 device tensor per param (step counts the kernel reads). Scalars are floats or one-element
    fp32 device tensors (``device_scalar``). ``skip``: a one-element device tensor; where it is nonzero the kernel
    changes nothing (a step skipped on the device, e.g. on a non-finite gradient, without a host
    sync). ``compile_only``: compile what this call would launch and change nothing (warm-up before
    a run, so no step compiles mid-training).

    ``absmax``: for a kernel with an int8-state variant, one entry per state role: None for fp32
    state, or the per-block absmax of int8 state (the role's tensors then being uint8 codes). Such a
    kernel takes the absmax tables after the states and the code tables after SKIP, with constexprs
    QUANT and QBLOCK; its quantized variant runs tiles of max(BLOCK, QBLOCK) so that a tile holds
    whole quantization blocks (only the interpreter's BLOCK is smaller than QBLOCK).

    ``rounding`` (update kernels with a param store, _jit.store_param): the kernel takes COMP (the
    Kahan buffers, an element-wise role) right after the states, SEEDS after the counters, the int
    ``sr_step`` after the scalars, and constexprs ROUNDING (0 for a bucket whose params are not bf16)
    and SR_STEPS. ``slow_role``: the index of the state role holding slow weights, which may be
    fp32, bf16 or fp16 (one dtype per bucket, the constexpr SLOW_DTYPE)."""
    counters = counters or {}
    quant = absmax is not None and any(a is not None for a in absmax)
    qblock = quant_block() if absmax is not None else 0
    rounded = rounding is not None and rounding.mode != 0
    comp = _filled(rounding.comp, params) if rounded and rounding.comp is not None else None
    seeds = _filled(rounding.seeds, params) if rounded and rounding.seeds is not None else None

    def validate() -> None:
        for i, s in enumerate(states):
            if s is None:
                continue
            if absmax is not None and absmax[i] is not None:
                check_int8("state", params, s, absmax[i], qblock)
            else:
                check("slow weights" if i == slow_role else "state", params, s, fp32=True,
                      dtypes=SLOW_DTYPES if i == slow_role else (torch.float32,))
        for name, c in counters.items():
            if c is not None:
                check_counters(name, params, c)
        if rounded:
            check_rounding(rounding, params)

    if absmax is not None:
        if len(absmax) != len(states):
            raise ValueError(f"absmax: {len(absmax)} entries for {len(states)} state roles")
    extra_roles = [comp] if rounding is not None else []
    roles = [params, grads, *states, *extra_roles, *(absmax or ()), *counters.values(),
             *([seeds] if rounding is not None else [])]
    if any(role is not None and len(role) != len(params) for role in roles):  # tables pair them by index
        validate()
    elementwise = 2 + len(states) + len(extra_roles)

    def build() -> list:
        # Grads are checked whenever they differ from a cached plan's: a new grad may sit at a
        # cached grad's address with another layout (a transposed view), which the table key cannot
        # see (TableCache.plan compares them). States and counters are ours and keep their
        # storage; they are checked when a table is built.
        check("grads", params, grads, fp32=False)
        return [(p_dtype, g_dtype, device, idx, *tables(roles, idx, device, elementwise, validate))
                for (p_dtype, g_dtype, device), idx in buckets(params, grads).items()]

    for p_dtype, g_dtype, device, idx, ptrs, chunks, n in TABLES.plan(roles, 1, build):
        values = [device_scalar(f"scalar {i}", s, device) for i, s in enumerate(scalars)]
        flag, has_skip = skip_flag(skip, device)
        block, warps, extra = BLOCK, NUM_WARPS, {}
        maps = ()
        if absmax is not None:
            maps = code_tables(device) if quant else (chunks,) * 4  # placeholders the fp32 variant never reads
            if quant:
                block, warps = max(BLOCK, qblock), QUANT_NUM_WARPS
            extra = dict(QUANT=quant, QBLOCK=qblock)
        if rounding is not None:
            mode = rounding.mode if p_dtype == torch.bfloat16 else 0
            values.append(rounding.sr_step)
            extra.update(ROUNDING=mode, SR_STEPS=mode == 1 and rounding.from_steps)
        if slow_role is not None:
            slow = states[slow_role]
            extra["SLOW_DTYPE"] = tl_dtype(torch.float32 if slow is None else slow_dtype(slow, idx))
        _launch.run(
            kernel, (n,), device, *ptrs, chunks, chunks if flag is None else flag, *maps, *values,
            compile_only=compile_only, P_DTYPE=tl_dtype(p_dtype), G_DTYPE=tl_dtype(g_dtype), CHUNK=CHUNK, BLOCK=block,
            num_warps=warps, HAS_SKIP=has_skip, **extra, **constexprs,
        )
