"""The base of every element-wise optimizer: argument checks, fp32 state built lazily, gradient
clipping and non-finite handling folded into the update's grad scale, and validated state loading.

One ``step()`` takes one of two flows.

- **Device flow** (the Triton backend, once every stepped param has its state): nothing is read
  back to the host. One fused read of the grads gives [sum of squares, non-finite flag] (all-reduced
  over the group), one single-program launch (``step_control``) turns it into the clip scale and the
  skip flag and advances the step counters unless skipping, and each group's update kernel reads
  the scale, the skip flag and its tensors' step counts on the device (bias corrections, RAdam's
  rectification and Lookahead's sync are decided per tensor there). A skipped step changes nothing:
  the kernels see the flag and return. This is what ``capturable=True`` (CUDA graphs) relies on.
- **Host flow** (the torch and CPU backends, where a read is free or unavoidable, and any step that
  must build state): the statistics are read on the host, a non-finite step is skipped before
  anything changes (so a skipped first step creates no state), the counters advance on the host and
  the updates take float scalars. The first host-flow step of a Triton optimizer also compiles the
  device flow's kernels, so nothing compiles mid-run.

The two flows give the same bits (the kernels compute the bias corrections in fp64 from the device
counts, as the host does in Python floats).

bf16 params without fp32 masters (``bf16_update``): "nearest" rounds the fp32 result to nearest
(torch's behaviour); "stochastic" rounds it up or down at random, in proportion (unbiased), with
bits that depend only on (``rounding_seed``, the param's position in the param groups, the rank,
its step count, the element's index in the local shard): reproducible, and independent of launch
order or bucketing; "kahan" keeps a bf16 compensation buffer per param (state ``kahan_comp``) that
carries what rounding dropped into later steps. The mode applies to bf16 params only: fp32 params
are unaffected and fp16 params keep round-to-nearest. SGD, whose update needs no step count, keeps
a "step" counter for its bf16 params under "stochastic" (the streams are per step).
"""

from __future__ import annotations

import math
import weakref
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from itertools import chain, repeat
from operator import attrgetter, is_not, itemgetter, le
from typing import Any

import torch
import torch.distributed as dist
from torch.optim import Optimizer

from .. import _checks
from ..distributed.collectives import active
from ..distributed.grad_stats import GradLayout, fsdp1_group, global_grad_stats
from ..distributed.shard import any_dtensor, is_dtensor, local_tensor, local_tensors, new_state_like
from ..functional import compiling, grad_sumsq_and_flag, one_step, resolve_backend, step_control
from ..functional.control import CLIP_EPS
from ..state import quantizes
from ..state.layout import absmax_key, check_state_dtype, quantize_state, zero_state
from ..state import rounding
from ..state.report import MemoryReport, memory_report
from . import _state_dict

_KERNEL_DTYPES = frozenset({torch.float32, torch.bfloat16, torch.float16})
_dtype = attrgetter("dtype")
_grad, _is_sparse, _get_device = attrgetter("grad"), attrgetter("is_sparse"), torch.Tensor.get_device
_step_of = itemgetter("step")

# The device-flow control vector: [scale, skip, norm, skipped steps so far, -scale (for maximize)].
_SCALE, _SKIP, _NORM, _SKIPPED, _NEG_SCALE = range(5)


# State of the bf16 update modes: Kahan's compensation buffer (bf16, laid out like its param), and
# the step counter that SGD keeps only for stochastic rounding's streams.
KAHAN_KEY = "kahan_comp"
_KAHAN_KEYS, _STEP_KEYS = frozenset({KAHAN_KEY}), frozenset({"step"})


def _new_control(device: torch.device) -> torch.Tensor:
    return torch.zeros(_NEG_SCALE + 1, dtype=torch.float32, device=device)


class NonFiniteGradientError(FloatingPointError):
    """Raised by ``step()`` with ``nonfinite="raise"`` when a gradient holds inf or NaN."""


class FusedOptimizer(Optimizer):
    """Shared machinery; subclasses define ``_check_group``, ``_state_key_blocks``, ``_init_state``
    and ``_update_group``."""

    def __init__(
        self,
        params: Iterable[Any],
        defaults: dict[str, Any],
        *,
        max_grad_norm: float | None,
        nonfinite: str,
        backend: str,
        process_group: Any,
        capturable: bool = False,
        state_dtype: str = "fp32",
        bf16_update: str = "nearest",
        rounding_seed: int = 0,
    ) -> None:
        self.state_dtype = check_state_dtype(state_dtype)
        self.bf16_update = _checks.bf16_update(bf16_update)
        self.rounding_seed = _checks.rounding_seed(rounding_seed)
        # Each param's stochastic-rounding stream base, as (int, 0-dim int64 tensor on its device),
        # built on first use. Not state: it depends on the rank, and is not checkpointed.
        self._stream_bases: dict[torch.Tensor, tuple[int, torch.Tensor]] = {}
        if isinstance(params, torch.Tensor):
            raise ValueError(f"params must be an iterable of tensors or dicts, got a {torch.typename(params)}")
        params = list(params)
        if not params:
            raise ValueError("params: optimizer got an empty parameter list")
        self.max_grad_norm = _checks.max_grad_norm(max_grad_norm)
        self.nonfinite = _checks.one_of("nonfinite", nonfinite, _checks.NONFINITE_MODES)
        self.backend = _checks.one_of("backend", backend, _checks.BACKENDS)
        if not isinstance(capturable, bool):
            raise ValueError(f"capturable must be True or False, got {capturable!r}")
        if capturable and self.nonfinite == "raise":
            raise ValueError("capturable=True cannot take nonfinite='raise': raising needs the host to read the "
                             "gradients' statistics every step; use 'skip' (decided on the device) or 'apply'")
        if capturable and self.backend in ("torch", "cpu"):
            raise ValueError(f"capturable=True needs the Triton backend (CUDA params), not backend={self.backend!r}")
        self.capturable = capturable
        self._check_group(defaults)
        # The params we were given, held weakly and matched by identity: a plain param that is not
        # among them was swapped in by a wrapper (ZeRO's flat partitions, fp32 master copies).
        self._given_params: weakref.WeakValueDictionary[int, torch.Tensor] = weakref.WeakValueDictionary()
        self._binding_pending = False
        super().__init__(params, defaults)
        self.process_group = process_group if process_group is not None else fsdp1_group(self.param_groups)
        self._grad_layout = GradLayout()
        # A runner that reduces the grads' global norm itself before stepping ours (see
        # use_norm_from): a callable giving that norm for the step being taken, or None.
        self._norm_source: Callable[[], float | torch.Tensor | None] | None = None
        self._skipped_on_host = 0
        self._last_norm: float | torch.Tensor | None = None
        # One control vector per device, made on the first device-flow step; it also counts the
        # steps skipped on the device.
        self._controls: dict[torch.device, torch.Tensor] = {}
        self._device_flow_warmed = False
        # Params whose state compile_kernels() built and no step has used yet: their first step takes
        # the host flow, which knows a fresh state from a running one (SGD's first momentum step).
        self._prebuilt: set[int] = set()
        # A device-flow step's (states, step counters or None), per params list (see _device_plan).
        self._planned: dict[int, tuple[list, list | None]] = {}

    # --- what subclasses define -------------------------------------------------------------
    # Whether the family's state has a "step" counter of its own (SGD's has not).
    _KEEPS_STEP = True

    def _check_group(self, group: Mapping[str, Any]) -> None:
        raise NotImplementedError

    def _state_key_blocks(self, group: Mapping[str, Any]) -> Sequence[frozenset[str]]:
        raise NotImplementedError

    def _init_state(self, param: torch.Tensor, group: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def _update_group(
        self, group: dict[str, Any], params: list[torch.Tensor], grads: list[torch.Tensor], grad_scale,
        skip: torch.Tensor | None,
    ) -> None:
        """Update one group. Host flow: ``grad_scale`` is a float, ``skip`` None, and the counters
        are advanced here. Device flow: ``grad_scale`` and ``skip`` are one-element device tensors
        and the counters were advanced by ``step_control``."""
        raise NotImplementedError

    # --- public state ----------------------------------------------------------------------------
    @property
    def skipped_steps(self) -> int:
        """Steps skipped on a non-finite gradient (reading it waits for the device)."""
        return self._skipped_on_host + sum(int(c[_SKIPPED]) for c in self._controls.values())

    def count_skips_as_one(self, skips: int) -> None:
        """A runner that stepped ours once per param group on one skipped step counts it once."""
        self._skipped_on_host -= skips - 1

    @property
    def last_grad_norm(self) -> float | None:
        """The global gradient norm (x grad_scale) of the last step that computed it, else None
        (reading it waits for the device)."""
        norm = self._last_norm
        return float(norm) if isinstance(norm, torch.Tensor) else norm

    # --- torch.optim.Optimizer protocol -------------------------------------------------------
    def add_param_group(self, param_group: dict[str, Any]) -> None:
        # Whether no param or grad stepped is a DTensor (then neither are their states, and taking
        # local tensors is a list copy): unknown until the next step's _flow_device looks.
        self._all_plain = False
        super().add_param_group(param_group)
        try:
            for p in self.param_groups[-1]["params"]:
                if p.is_complex():  # the kernels and the fp32 state are real: the imaginary part would be lost
                    raise ValueError(f"Invalid params: a {p.dtype} tensor of shape {tuple(p.shape)} (complex params "
                                     "are not supported; optimize torch.view_as_real(p) as a real parameter)")
            self._check_group(self.param_groups[-1])
        except ValueError:
            self.param_groups.pop()
            raise
        self._given_params.update((id(p), p) for p in self.param_groups[-1]["params"])

    def bind_params(self, process_group: Any) -> None:
        """For an integration that has replaced the params with its own (DeepSpeed's flat fp32
        partitions or master copies): the grad statistics of the params now in ``param_groups``
        reduce over ``process_group`` (their partitions are disjoint across it), or stay local with
        None (the new params are replicas, identical on every rank)."""
        self.process_group = process_group
        self._given_params.update((id(p), p) for g in self.param_groups for p in g["params"])
        self._binding_pending = False
        # the replaced params' stream bases would keep them alive; the new ones number afresh
        self._stream_bases.clear()

    def expect_binding(self) -> None:
        """An integration is about to wrap us and will call ``bind_params``; until then statistics
        stay local (DeepSpeed's fp16/bf16 wrappers swap the params and step once on zero grads
        while they are built)."""
        self._binding_pending = True

    @torch.no_grad()
    def step(self, closure=None, *, grad_scale: float | torch.Tensor = 1.0):
        """One optimizer step. ``grad_scale`` multiplies the gradients inside the update (gradient
        accumulation passes 1/N here instead of scaling the loss; a one-element fp32 device tensor
        is read on the device); clipping sees the scaled norm."""
        return self._step(closure, grad_scale)[0]

    @torch.no_grad()
    def compile_kernels(self) -> None:
        """Compile every kernel that steps on the current grads will launch, now rather than
        during the first steps (call after a backward pass, on every rank: it builds the state of
        the params that have grads, at zero as a first step would, and runs no update)."""
        work = self._collect_grads()
        device = self._flow_device(work)
        for group, params, _ in work:
            blocks = self._state_key_blocks(group)
            self._prebuilt.update(id(p) for p in params if blocks and not blocks[-1] <= self.state[p].keys())
            self._states_for(group, params)
            self._prepare_device_state(group, params)
        if device is not None:
            self._control(device)
            self._warm_device_flow(work, device)
            self._warm_host_flow(work)

    def _warm_host_flow(self, work) -> None:
        """Compile the updates of the first step after compile_kernels() (a host-flow step, see
        ``_prebuilt``) without running them; the host flow advances counters as it goes, so they
        are put back."""
        counters = [v for _, params, _ in work for p in params for k, v in self.state[p].items()
                    if k in _state_dict.COUNTER_KEYS]
        saved = [c.clone() for c in counters]
        with compiling():
            for group, params, grads in work:
                self._update_group(group, params, grads, 1.0, None)
        for c, value in zip(counters, saved):
            c.copy_(value)

    @torch.no_grad()
    def warm_step(self, counters: Sequence[torch.Tensor]) -> None:
        """Compile (and table) a device-flow step on the current grads that also advances
        ``counters`` (a wrapper's, e.g. Lookahead's), without running it."""
        work = self._collect_grads()
        device = self._flow_device(work)
        if device is not None and self._device_plan(work) is not None:
            self._control(device)
            self._warm_device_flow(work, device, counters)

    def memory_report(self) -> "MemoryReport":
        """Bytes of optimizer state on this rank: ``total``, ``int8`` (codes and absmax), ``fp32``,
        ``bf16`` and ``fp16`` (state tensors by dtype: Kahan buffers are bf16), ``counters``; how
        many params hold int8 or fp32 moments
        (``params_int8``, ``params_fp32``), their local elements (``numel``) and
        ``bytes_per_element``; ``per_entry`` by state key (dist_optim.state.report)."""
        return memory_report(self.state)

    def state_dict(self) -> dict[str, Any]:
        """torch's state_dict, with int8 moments in their checkpoint form (codes + absmax where the
        param's shape lets DCP reshard them, else fp32; see ``_state_dict``)."""
        return _state_dict.checkpoint_form([p for g in self.param_groups for p in g["params"]], super().state_dict())

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        _state_dict.load_into(
            self, state_dict,
            lambda sd: _state_dict.restore(self, sd, self._load_key_blocks, self._check_group, self.counter_device,
                                           self._stored_form),
        )

    def _stored_form(self, param: torch.Tensor, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """A loaded state as this optimizer keeps it: moments quantized where ``_quantizes(param)``,
        the Kahan buffer in bf16 (the load restores every state tensor in fp32; bf16 -> fp32 -> bf16
        is exact)."""
        if KAHAN_KEY in state and state[KAHAN_KEY].dtype != torch.bfloat16:
            state = {**state, KAHAN_KEY: state[KAHAN_KEY].to(torch.bfloat16)}
        return _state_dict.quantized_form(param, state) if self._quantizes(param) else state

    def _load_key_blocks(self, group: Mapping[str, Any]) -> list[frozenset[str]]:
        """The key blocks a loaded param state may hold: the family's, and the bf16 update's
        (present on bf16 params only, so optional; refused under another mode)."""
        return [*self._state_key_blocks(group), *self._rounding_key_blocks()]

    def _rounding_key_blocks(self) -> list[frozenset[str]]:
        if self.bf16_update == "kahan":
            return [_KAHAN_KEYS]
        if self.bf16_update == "stochastic" and not self._KEEPS_STEP:
            return [_STEP_KEYS]
        return []

    # --- bf16 updates -----------------------------------------------------------------------------
    def _rounding_mode(self, param: torch.Tensor) -> str:
        """The bf16 update mode ``param``'s writes take: ``bf16_update`` for bf16 params, else nearest."""
        return self.bf16_update if param.dtype == torch.bfloat16 else "nearest"

    def _rounding_keys(self, param: torch.Tensor) -> frozenset[str]:
        """The state keys ``param`` needs for its bf16 update mode."""
        mode = self._rounding_mode(param)
        if mode == "kahan":
            return _KAHAN_KEYS
        if mode == "stochastic" and not self._KEEPS_STEP:
            return _STEP_KEYS
        return frozenset()

    def _rounding_state(self, param: torch.Tensor) -> dict[str, torch.Tensor]:
        """The state of ``param``'s bf16 update mode, fresh: a zero compensation, a zero count."""
        keys = self._rounding_keys(param)
        state = {}
        if KAHAN_KEY in keys:
            state[KAHAN_KEY] = new_state_like(param, dtype=torch.bfloat16)
        if "step" in keys:
            state["step"] = self._new_counter(param)
        return state

    def _rounding_kwargs(self, params: Sequence[torch.Tensor], mode: str) -> dict[str, Any]:
        """The functional entries' rounding arguments for ``params`` (all of one mode)."""
        if mode != "stochastic":
            return {} if mode == "nearest" else {"bf16_update": mode}
        cache = self._stream_bases
        if any(p not in cache for p in params):
            self._make_stream_bases()
        pairs = [cache[p] for p in params]
        return {"bf16_update": mode, "sr_seeds": [t for _, t in pairs], "sr_bases": [b for b, _ in pairs]}

    def _make_stream_bases(self) -> None:
        """Stream bases of the params that lack one: ``rounding.param_base(rounding_seed, position in
        the param groups flattened, global rank)``, the int and a 0-dim int64 tensor on the device."""
        rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
        for index, p in enumerate(p for g in self.param_groups for p in g["params"]):
            if p not in self._stream_bases:
                base = rounding.param_base(self.rounding_seed, index, rank)
                device = local_tensor(p).device
                self._stream_bases[p] = (base, torch.tensor(base, dtype=torch.int64, device=device))

    # --- the step ---------------------------------------------------------------------------------
    def _step(self, closure, grad_scale, counters: Sequence[torch.Tensor] = (), *, host: bool = False):
        """(loss, control): ``control`` is the device-flow control vector (its ``[1]`` is the skip
        flag), or a bool saying whether the host flow skipped. ``counters`` (Lookahead's) advance
        with the step counters; ``host`` forces the host flow (a wrapper about to build state)."""
        grad_scale = _checks.grad_scale(grad_scale)
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        work = self._collect_grads()
        device = self._flow_device(work)
        self._check_lr_tensors(work)
        device_flow = device is not None and not host
        # Unlaunchable grads are refused before anything moves. On the device flow the statistics
        # launch validates them first where there is one; where not, they are refused here, before
        # the plan keeps this step's states (a refusal leaves nothing behind).
        refused_first = not device_flow or not self._checks_grads() or self._norm_source is not None
        if refused_first:
            self._refuse_unlaunchable(work)
        plan = self._device_plan(work, keep=True) if device_flow else None
        if plan is not None:
            return loss, self._device_step(work, device, grad_scale, [*plan, *counters])
        self._planned = {}
        if not refused_first:
            self._refuse_unlaunchable(work)
        if isinstance(grad_scale, torch.Tensor):
            grad_scale = float(grad_scale)
        scale = self._clip_scale(work, grad_scale)
        if scale is None:
            self._skipped_on_host += 1
            return loss, True
        for group, params, grads in work:
            self._update_group(group, params, grads, -scale if group.get("maximize") else scale, None)
        for c in counters:
            c += 1
        if self._prebuilt:
            self._prebuilt.difference_update(id(p) for _, params, _ in work for p in params)
        if device is not None:
            # What a CUDA graph captured at the next step must find made: its control vector and
            # its compiled kernels and tables.
            self._control(device)
            if not self._device_flow_warmed:
                self._warm_device_flow(work, device, counters)
        return loss, False

    def _device_step(self, work, device: torch.device, grad_scale, counters: Sequence[torch.Tensor]) -> torch.Tensor:
        control = self._control(device)
        try:
            with one_step():  # the launches below check the grads once
                stats = self._grad_stats(work)
                if stats is not None and self.nonfinite == "raise":  # raising needs the host: one read
                    sumsq, flag = stats.tolist()
                    self._raise_if_nonfinite(flag > 0 or not math.isfinite(sumsq), math.sqrt(sumsq) * float(grad_scale))
                if stats is not None and stats.device != device:  # e.g. reduced over a gloo group on the CPU
                    stats = stats.to(device)
                step_control(
                    control[:_NEG_SCALE], stats=stats, grad_scale=grad_scale, max_grad_norm=self.max_grad_norm,
                    skip_nonfinite=self.nonfinite == "skip", counters=counters, backend=self.backend,
                )
                self._last_norm = control[_NORM] if stats is not None else None
                scale, skip = control[_SCALE:_SCALE + 1], control[_SKIP:_SKIP + 1]
                if any(group.get("maximize") for group, _, _ in work):
                    torch.neg(scale, out=control[_NEG_SCALE:])
                for group, params, grads in work:
                    self._update_group(group, params, grads, control[_NEG_SCALE:] if group.get("maximize") else scale,
                                       skip)
        finally:
            self._planned = {}
        return control

    def _warm_device_flow(self, work, device: torch.device, counters: Sequence[torch.Tensor] = ()) -> None:
        """Compile the device flow's kernels without running them (its launches take device
        scalars and counter tables, other specializations than the host flow's)."""
        control = _new_control(device)
        with compiling():
            stats = None
            if self._checks_grads():
                grad_sumsq_and_flag(self._locals(g for _, _, gs in work for g in gs), backend=self.backend)
                stats = torch.zeros(2, dtype=torch.float32, device=device)
            step_control(
                control[:_NEG_SCALE], stats=stats, grad_scale=1.0, max_grad_norm=self.max_grad_norm,
                skip_nonfinite=self.nonfinite == "skip", counters=[*(self._device_plan(work) or ()), *counters],
                backend=self.backend,
            )
            for group, params, grads in work:
                self._update_group(group, params, grads, control[_SCALE:_SCALE + 1], control[_SKIP:_SKIP + 1])
        self._device_flow_warmed = True

    def warm_control(self, params: Sequence[torch.Tensor]) -> torch.Tensor | None:
        """A scratch control vector on the device the device flow would run ``params`` on (for a
        wrapper compiling its own device-flow launches under ``compiling()``), or None when their
        steps take the host flow."""
        all_plain = self._all_plain  # about the step's params, not these
        device = self._flow_device([(None, list(params), [])])
        self._all_plain = all_plain
        return None if device is None else _new_control(device)

    def _control(self, device: torch.device) -> torch.Tensor:
        control = self._controls.get(device)
        if control is None:
            control = self._controls[device] = _new_control(device)
        return control

    def _check_lr_tensors(self, work) -> None:
        """A tensor lr that the step cannot use is refused before anything changes (the Triton
        kernels read a one-element fp32 tensor on the params' device; the other paths read any
        one-element tensor on the host)."""
        for group, params, _ in work:
            lr = group["lr"]
            if not isinstance(lr, torch.Tensor) or not params:
                continue
            local = local_tensor(params[0])
            on_device = resolve_backend(self.backend, [local]) == "triton"
            if lr.numel() != 1 or (on_device and (lr.dtype != torch.float32 or lr.device != local.device)):
                where = f"a one-element fp32 tensor on {local.device}" if on_device else "a one-element tensor"
                raise ValueError(f"lr must be a float or {where}; got a {lr.dtype} tensor of shape "
                                 f"{tuple(lr.shape)} on {lr.device}")

    def _refuse_unlaunchable(self, work) -> None:
        """What the Triton launchers would refuse only after the step counters moved (a grad that is
        not contiguous, a dtype they do not take), refused first: a refused step changes nothing."""
        for _, params, grads in work:
            if not params or resolve_backend(self.backend, [local_tensor(params[0])]) != "triton":
                continue
            grads = self._locals(grads)
            if not all(map(torch.Tensor.is_contiguous, grads)):
                i = next(i for i, g in enumerate(grads) if not g.is_contiguous())
                raise ValueError(f"{type(self).__name__}: the Triton kernels need contiguous grads; grad {i} of "
                                 f"this step has shape {tuple(grads[i].shape)} and strides {grads[i].stride()}")
            dtypes = set(map(_dtype, self._locals(params))) | set(map(_dtype, grads))
            if not dtypes <= _KERNEL_DTYPES:
                raise ValueError(f"{type(self).__name__}: the Triton kernels take fp32, bf16 and fp16 params and "
                                 f"grads; this step has {sorted(map(str, dtypes - _KERNEL_DTYPES))}")

    def _flow_device(self, work) -> torch.device | None:
        """The device whose Triton kernels run every update of this step (the device flow), or
        None for the host flow (another backend, or params on several devices)."""
        stepped = _params_of(work)
        # The grads too: a plain param may be given a DTensor grad (torch allows the assignment), which
        # has no storage of its own for a kernel to read.
        self._all_plain = not any_dtensor(stepped) and not any_dtensor(_grads_of(work))
        if not stepped:
            return None
        local = local_tensor(stepped[0])
        device = local.device
        if resolve_backend(self.backend, [local]) != "triton":
            if self.capturable:
                raise ValueError(f"capturable=True needs the Triton backend; the params are on {device}")
            return None
        # get_device: an int per tensor (-1 on the CPU), cheaper than building a device object each
        devices = set(map(_get_device, stepped if self._all_plain else local_tensors(stepped)))
        return device if len(devices) == 1 else None

    def counter_device(self, param: torch.Tensor) -> torch.device:
        """Where a param's step counters live: on its device when the Triton kernels read them
        there, else on the CPU (torch.optim's place for them)."""
        local = local_tensor(param)
        return local.device if resolve_backend(self.backend, [local]) == "triton" else torch.device("cpu")

    def _new_counter(self, param: torch.Tensor) -> torch.Tensor:
        """A per-param step count, as torch.optim keeps it (0-dim fp32), where the kernels read it."""
        return torch.zeros((), dtype=torch.float32, device=self.counter_device(param))

    def _device_plan(self, work, keep: bool = False) -> list[torch.Tensor] | None:
        """The counters a device-flow step advances (each stepped param's "step"), or None when
        some param stepped lacks state (the step then takes the host flow). One pass over the
        states: a lookup is a Python-level tensor hash."""
        # .get: asking must not create entries in the state's defaultdict (a refused first step
        # leaves the state as it was)
        counters, lookup = [], self.state.get
        if self._prebuilt and any(id(p) in self._prebuilt for _, params, _ in work for p in params):
            return None
        planned = {}
        for group, params, _ in work:
            blocks = self._state_key_blocks(group)
            keys = blocks[-1] if blocks else frozenset()
            states = list(map(lookup, params))
            if not all(map(is_not, states, repeat(None))):
                return None
            if self.bf16_update != "nearest" and not all(self._rounding_keys(p) <= s.keys()
                                                         for p, s in zip(params, states)):
                return None
            if not all(map(le, repeat(keys), map(dict.keys, states))):
                return None
            steps = None
            if "step" in keys:
                steps = list(map(_step_of, states))
                counters += steps
            else:
                counters += (state["step"] for state in states if "step" in state)
            planned[id(params)] = (states, steps)
        if keep:
            # The step's updates look the same states up again (``_states_for``): a tensor's hash
            # is a Python call, so the lists are kept for this step (``_device_step`` drops them).
            self._planned = planned
        return counters

    def _prepare_device_state(self, group, params) -> None:
        """Hook for state a subclass keeps beside the last key block (Ranger's slow weights)."""

    def _checks_grads(self) -> bool:
        return self.max_grad_norm is not None or self.nonfinite != "apply"

    # --- int8 state -------------------------------------------------------------------------------
    def _quantizes(self, param: torch.Tensor) -> bool:
        """Whether ``param``'s moments are int8: ``state_dtype="int8"`` and at least
        ``dist_optim.state.MIN_QUANTIZED_NUMEL`` elements in the whole param (a DTensor's global
        count, so every rank and every shard layout decides alike; a ZeRO partition's own count)."""
        return self.state_dtype == "int8" and quantizes(param.numel())

    def _new_moment(self, param: torch.Tensor, key: str, fill: float = 0.0) -> dict[str, torch.Tensor]:
        """A moment of ``fill`` for ``param``: fp32 like the param, or int8 codes and absmax over the
        local shard (plain tensors: their blocks are laid out over this rank's shard, so they are not
        slices of one global tensor; checkpoints lay them out per param, see ``state_dict``)."""
        if self._quantizes(param):
            local = local_tensor(param)
            if fill == 0.0:
                return zero_state(local.numel(), key, local.device)
            codes, absmax = quantize_state(torch.full((local.numel(),), float(fill), device=local.device), key)
            return {key: codes, absmax_key(key): absmax}
        return {key: new_state_like(param, fill=fill)}

    def _by_state_dtype(self, group, params, grads, key: str):
        """(params, grads, quantized, bf16 update mode) for each kind of launch among the params:
        fp32 or int8 moments (``key``: a moment every state of the family has) and the mode their
        writes take; the non-empty ones: a launch takes one kind."""
        if self.state_dtype == "fp32" and self.bf16_update == "nearest":
            # nothing to tell apart: spare a steady-state step the state pass
            if params:
                yield params, grads, False, "nearest"
            return
        if self.state_dtype == "fp32":
            quant = [False] * len(params)
        else:
            quant = [absmax_key(key) in s for s in self._states_for(group, params)]
        modes = [self._rounding_mode(p) for p in params]
        for kind in sorted(set(zip(quant, modes))):
            idx = [i for i, k in enumerate(zip(quant, modes)) if k == kind]
            yield [params[i] for i in idx], [grads[i] for i in idx], *kind

    @staticmethod
    def _with_absmax(keys: Sequence[str], quantized: bool) -> tuple[str, ...]:
        return tuple(keys) + (tuple(absmax_key(k) for k in keys) if quantized else ())

    # --- helpers --------------------------------------------------------------------------------
    def _collect_grads(self) -> list[tuple[dict[str, Any], list[torch.Tensor], list[torch.Tensor]]]:
        work = []
        for gi, group in enumerate(self.param_groups):
            params = group["params"]
            grads = list(map(_grad, params))
            # The usual case (every param has a dense grad) in C-level passes: a step's host time
            # over hundreds of params is mostly such per-tensor work.
            if all(map(is_not, grads, repeat(None))) and not any(map(_is_sparse, grads)):
                work.append((group, list(params), grads))
                continue
            params, grads = [], []
            for pi, p in enumerate(group["params"]):
                g = p.grad
                if g is None:
                    continue
                if g.is_sparse:
                    raise ValueError(
                        f"{type(self).__name__} does not support sparse gradients "
                        f"(param {pi} of param group {gi} has a {g.layout} grad)"
                    )
                params.append(p)
                grads.append(g)
            work.append((group, params, grads))
        return work

    def use_norm_from(self, source: Callable[[], float | torch.Tensor | None] | None) -> None:
        """Clip and skip on a global gradient norm that the runner has already reduced, instead of
        reading the grads again: ``source()`` gives the norm of the grads about to be stepped (inf
        or NaN when any is non-finite), or None, which makes the step compute its own. For runners
        that step ours one param group at a time (DeepSpeed ZeRO-1/2), where statistics computed
        per call would clip and skip each group on its own."""
        self._norm_source = source

    def _grad_stats(self, work) -> torch.Tensor | None:
        """The all-reduced [sum of squares, non-finite flag] when clipping or the non-finite check
        needs them, else None."""
        if not self._checks_grads():
            return None
        norm = self._norm_source() if self._norm_source is not None else None
        if norm is not None:
            norm = torch.as_tensor(norm, dtype=torch.float32)
            return torch.stack([norm * norm, (~torch.isfinite(norm) | (norm < 0)).float()])  # < 0: DeepSpeed's mark
        grads = _grads_of(work)
        if self.process_group is None and active():
            self._refuse_unknown_shards(work, grads)
        return global_grad_stats(grads, self.process_group, backend=self.backend, layout=self._grad_layout,
                                 plain=self._all_plain)

    def _raise_if_nonfinite(self, bad: bool, norm) -> None:
        """``nonfinite="raise"``: a step whose statistics (read on the host) are bad raises."""
        if bad and self.nonfinite == "raise":
            raise NonFiniteGradientError(f"{type(self).__name__}: a gradient holds inf or NaN (norm {float(norm)})")

    def _clip_scale(self, work, grad_scale: float) -> float | None:
        """Host flow: the scale the update applies to the raw gradients (``grad_scale`` times the
        clip coefficient), or None when the step is to be skipped."""
        stats = self._grad_stats(work)
        if stats is None:
            return grad_scale
        sumsq, flag = stats.to(device="cpu", dtype=torch.float32)  # the one host sync of a step
        bad = bool(flag > 0) or not bool(torch.isfinite(sumsq))
        # fp32 throughout, grad_scale as an fp32 value: the arithmetic step_control does on the
        # device (a Python float would make torch multiply in double on a CPU tensor), and
        # torch.nn.utils.clip_grad_norm_'s coefficient.
        scale32 = torch.tensor(grad_scale, dtype=torch.float32)
        norm = sumsq.sqrt() * scale32
        self._last_norm = float(norm)
        self._raise_if_nonfinite(bad, norm)
        if bad and self.nonfinite == "skip":
            return None
        if self.max_grad_norm is None:
            return grad_scale
        coef = torch.clamp(self.max_grad_norm / (norm + CLIP_EPS), max=1.0)
        return float(coef * scale32)

    def _refuse_unknown_shards(self, work, grads: Sequence[torch.Tensor]) -> None:
        """Plain params we were not given, with several ranks and no group, are some wrapper's
        partitions: local statistics would clip and skip per rank, so refuse instead."""
        if self._binding_pending or any(is_dtensor(g) for g in grads):
            return
        swapped = sum(self._given_params.get(id(p)) is not p for _, params, _ in work for p in params)
        if swapped:
            raise ValueError(
                f"process_group=None: {type(self).__name__} steps {swapped} tensor(s) it was not given "
                "(a wrapper such as DeepSpeed ZeRO replaced the params with its partitions) and cannot "
                "tell which ranks share them, so clipping and non-finite skipping would be decided per "
                "rank. Import dist_optim before deepspeed.initialize (it binds the data-parallel group), "
                "or pass process_group= (the group the partitions are split over)"
            )

    def _states_for(self, group: Mapping[str, Any], params: Sequence[torch.Tensor]) -> list[dict[str, torch.Tensor]]:
        """The params' states, each one's own key block (the last one) built on first use. A switch
        turned on after the first step (amsgrad, centered, momentum) adds its state at its initial
        value and keeps the rest: the step count and the existing moments run on (torch.optim raises a
        KeyError there; resetting them all would silently restart the bias corrections)."""
        planned = self._planned.get(id(params))
        if planned is not None:
            return planned[0]
        blocks = self._state_key_blocks(group)
        states = list(map(self.state.__getitem__, params))
        if blocks:
            keys = blocks[-1]
            for p, state in zip(params, states):
                if not keys <= state.keys():
                    state.update({k: v for k, v in self._init_state(p, group).items() if k not in state})
        if self.bf16_update != "nearest":
            for p, state in zip(params, states):
                if not self._rounding_keys(p) <= state.keys():
                    state.update(self._rounding_state(p))
        return states

    def _locals(self, tensors: Iterable[torch.Tensor]) -> list[torch.Tensor]:
        return list(tensors) if self._all_plain else local_tensors(tensors)

    def _states_of(self, states: Sequence[dict[str, torch.Tensor]], keys: Iterable[str]) -> dict[str, list[torch.Tensor]]:
        return {k: self._locals(map(itemgetter(k), states)) for k in keys}

    def _step_buckets(self, group: Mapping[str, Any], params: list[torch.Tensor], grads: list[torch.Tensor],
                      keys: Sequence[str], skip: torch.Tensor | None, mode: str = "nearest"):
        """Yield (params, grads, states, t, rounding) as local tensors for the families whose update
        depends on the step count t (and any params under stochastic rounding, whose streams do).
        Host flow: the counts advance here and each distinct count is one bucket (params whose grad
        was None on some steps lag). Device flow: one bucket, t being the list of the (already
        advanced) device counters, read by the kernels. ``mode``: the params' bf16 update mode;
        ``rounding`` the functional call's keyword arguments for it, and Kahan's buffers join
        ``keys``."""
        states = self._states_for(group, params)
        keys = tuple(keys) + ((KAHAN_KEY,) if mode == "kahan" else ())
        if skip is not None:
            steps = self._planned.get(id(params), (None, None))[1]
            yield (self._locals(params), self._locals(grads), self._states_of(states, keys),
                   list(map(_step_of, states)) if steps is None else steps, self._rounding_kwargs(params, mode))
            return
        for t, idx in advance(states).items():
            yield (
                self._locals(params[i] for i in idx),
                self._locals(grads[i] for i in idx),
                self._states_of([states[i] for i in idx], keys),
                t,
                self._rounding_kwargs([params[i] for i in idx], mode),
            )


def _params_of(work) -> list[torch.Tensor]:
    """A step's params over every group, in C-level passes (no per-element Python frame)."""
    return list(chain.from_iterable(map(itemgetter(1), work)))


def _grads_of(work) -> list[torch.Tensor]:
    return list(chain.from_iterable(map(itemgetter(2), work)))


def advance(states: Sequence[dict[str, torch.Tensor]], key: str = "step") -> dict[int, list[int]]:
    """Increment each state's counter and group the indices by the new count, so that one launch
    serves every tensor sharing bias corrections (params whose grad was None on some steps lag)."""
    buckets: dict[int, list[int]] = defaultdict(list)
    for i, state in enumerate(states):
        state[key] += 1
        buckets[int(state[key])].append(i)
    return buckets
