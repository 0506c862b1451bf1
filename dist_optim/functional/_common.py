"""Shared plumbing of the torch path: backend choice, fp32 views of low-precision params, scaled grads."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch

from .._checks import bf16_update as check_bf16_update
from ..state import rounding as _rounding

Tensors = Sequence[torch.Tensor]

# A step count: an int shared by the tensors of a call (host flow), or one counter tensor per
# tensor, already advanced for this step, read where it lives (device flow).
Step = int | Sequence[torch.Tensor]


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


def fused_kernels(backend: str, params: Tensors, grads: Tensors | None = None, states=None,
                  bf16_update: str = "nearest"):
    """The one place a step's implementation is chosen: the kernel module whose launcher runs these
    tensors (``triton_kernels`` or ``cpu_kernels``, the same launcher signatures), or None for the
    torch path. The CPU kernels take fp32/bf16/fp16 params and grads with fp32 state; anything else
    (fp64, say) goes to the torch path under 'auto' and is refused under 'cpu'. A bf16 update mode
    or a slow-weight dtype that a module does not list (``ROUNDING_MODES``, ``SLOW_DTYPES``) takes
    the torch path under any backend."""
    which = resolve_backend(backend, params)
    if which != "torch" and not _kernels_take(which, params, states, bf16_update):
        return None
    if which == "cpu" and states is not None and quantized_keys(states):
        import cpu_kernels

        if not getattr(cpu_kernels, "QUANTIZED_STATE", False):  # no int8 kernels there: the torch path
            return None
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


def _kernels_take(which: str, params: Tensors, states, bf16_update: str) -> bool:
    """Whether the kernel module ``which`` lists this call's bf16 update mode (``bf16_update``, an
    effective mode: "nearest" unless bf16 params are given) and its slow weights' dtypes."""
    if which == "triton":
        import triton_kernels as kernels
    else:
        import cpu_kernels as kernels
    if bf16_update != "nearest" and bf16_update not in getattr(kernels, "ROUNDING_MODES", ("nearest",)):
        return False
    slows = states.get("slow_buffer") if states else None
    if slows:
        listed = getattr(kernels, "SLOW_DTYPES", (torch.float32,))
        return all(s.dtype in listed for s in slows)
    return True


def quantized_keys(states: Mapping[str, Tensors]) -> list[str]:
    """The moments of ``states`` held as int8 codes (their ``<key>_absmax`` is present)."""
    from ..state.layout import ABSMAX_SUFFIX

    return [k[: -len(ABSMAX_SUFFIX)] for k in states if k.endswith(ABSMAX_SUFFIX)]


def dequantized(params: Tensors, states: Mapping[str, Tensors]):
    """The torch path of int8 state: (states with each quantized moment as fp32 tensors shaped like
    its param, a function writing them back as codes and absmax), or (states, None) when nothing is
    quantized. The fp32 math in between is the fp32-state path's, so the two modes differ only by
    the rounding of the stored moments."""
    qkeys = quantized_keys(states)
    if not qkeys:
        return states, None
    from ..state.layout import ABSMAX_SUFFIX, absmax_key, dequantize_state, quantize_state

    fp32 = {k: v for k, v in states.items() if not k.endswith(ABSMAX_SUFFIX)}
    for k in qkeys:
        fp32[k] = [dequantize_state(c, a, k, p.shape) for c, a, p in zip(states[k], states[absmax_key(k)], params)]

    def requantize() -> None:
        for k in qkeys:
            for codes, absmax, x in zip(states[k], states[absmax_key(k)], fp32[k]):
                new_codes, new_absmax = quantize_state(x, k)
                codes.copy_(new_codes)
                absmax.copy_(new_absmax)

    return fp32, requantize


def fp32_views(params: Tensors) -> list[torch.Tensor]:
    """fp32 tensors to do the math in: fp32 params themselves, fp32 copies of bf16/fp16 ones."""
    return [p if p.dtype == torch.float32 else p.float() for p in params]


@dataclass(frozen=True)
class Rounding:
    """How a call stores its bf16 params' fp32 results (``dist_optim.state.rounding``): ``mode``, and
    under "stochastic" each tensor's stream base (``rounding.param_base``) as a 0-dim int64 tensor on
    its device (``seeds``, what the kernels read) and/or as an int (``bases``, the torch path's)."""

    mode: str = "nearest"
    seeds: Sequence[torch.Tensor] | None = None
    bases: Sequence[int] | None = None

    def pick(self, idx: Sequence[int]) -> "Rounding":
        if self.mode != "stochastic":
            return self
        return Rounding(self.mode, None if self.seeds is None else [self.seeds[i] for i in idx],
                        None if self.bases is None else [self.bases[i] for i in idx])

    def base(self, i: int) -> int:
        return self.bases[i] if self.bases is not None else int(self.seeds[i])

    def kwargs(self) -> dict:
        """The functional entries' keyword arguments that rebuild this."""
        return dict(bf16_update=self.mode, sr_seeds=self.seeds, sr_bases=self.bases)

    def for_kernels(self, *, sr_step: int | None = None, steps: Tensors | None = None) -> dict:
        """A launcher's rounding keyword arguments (none for "nearest", so that modules without
        the rounding contract see the calls they always saw); ``steps`` for the families whose
        launchers take no counters otherwise (SGD, RMSprop)."""
        if self.mode == "nearest":
            return {}
        kw: dict = {"bf16_update": self.mode}
        if self.mode == "stochastic":
            kw["sr_seeds"] = list(self.seeds)
            if sr_step is not None:
                kw["sr_step"] = sr_step
            if steps is not None:
                kw["steps"] = steps
        return kw


NEAREST = Rounding()


def rounding_of(bf16_update: str, params: Tensors, sr_seeds: Sequence | None = None,
                sr_bases: Sequence[int] | None = None) -> Rounding:
    """A call's rounding, checked: "nearest" when no param is bf16 (the modes apply to bf16 params
    only; fp16 ones keep round-to-nearest), seeds or bases of every param under "stochastic"."""
    mode = check_bf16_update(bf16_update)
    if mode == "nearest" or not any(p.dtype == torch.bfloat16 for p in params):
        return NEAREST
    if mode == "stochastic":
        given = sr_seeds if sr_seeds is not None else sr_bases
        if given is None or len(given) != len(params):
            raise ValueError(f"bf16_update='stochastic' needs sr_seeds or sr_bases, one per param ({len(params)}), "
                             f"got {None if given is None else len(given)}")
        if sr_seeds is None:  # kernels read the bases on the device
            device = params[0].device
            sr_seeds = [torch.tensor(b, dtype=torch.int64, device=device) for b in sr_bases]
    return Rounding(mode, sr_seeds, sr_bases)


def write_back(params: Tensors, views: Tensors, rounding: Rounding = NEAREST, *, step: int | None = None,
               comps: Tensors | None = None) -> None:
    """Store the fp32 results ``views`` into their params (fp32 params were updated in place): round
    to nearest, or for bf16 params per ``rounding.mode``: "stochastic" rounds each element with the
    stream ``step_stream(base, step)`` at its row-major index in the tensor; "kahan" adds the update
    (result minus the old param, in fp32) through the bf16 compensation buffer ``comps[i]``."""
    special = rounding.mode != "nearest"
    pairs = [(p, v) for p, v in zip(params, views) if p is not v and not (special and p.dtype == torch.bfloat16)]
    if pairs:
        torch._foreach_copy_([p for p, _ in pairs], [v for _, v in pairs])
    if not special:
        return
    if rounding.mode == "stochastic" and step is None:
        raise ValueError("bf16_update='stochastic' needs the step count t of the streams (step=)")
    for i, (p, v) in enumerate(zip(params, views)):
        if p.dtype != torch.bfloat16 or p.numel() == 0:
            continue
        if rounding.mode == "stochastic":
            stream = _rounding.step_stream(rounding.base(i), step)
            p.copy_(_rounding.stochastic_round_bf16(v, stream, _rounding.element_indices(v)))
        else:
            new, comp = _rounding.kahan_add_bf16(p, comps[i], v - p.float())
            p.copy_(new)
            comps[i].copy_(comp)


def scaled_grads(grads: Tensors, grad_scale: float) -> list[torch.Tensor]:
    """fp32 gradients times ``grad_scale`` (clip coefficient x accumulation divisor, negative for
    ``maximize``). The user's ``.grad`` tensors are never written."""
    g32 = [g if g.dtype == torch.float32 else g.float() for g in grads]
    if grad_scale == 1.0:
        return list(g32)
    return list(torch._foreach_mul(g32, grad_scale))



def reads_device_values(kernels) -> bool:
    """Whether a kernel module reads step counters, the grad scale, the skip flag and Lookahead's
    sync decision on the device (the Triton launchers do; the CPU kernels take host values)."""
    return getattr(kernels, "READS_DEVICE_VALUES", False)


def host_number(value) -> float:
    """A hyperparameter as a Python float (a tensor lr is read: free on the CPU, a sync elsewhere)."""
    return float(value) if isinstance(value, torch.Tensor) else value


class HostCall(NamedTuple):
    params: list
    grads: list
    states: dict
    t: int | None
    grad_scale: float
    sync: bool | None
    rounding: Rounding


def on_host(params: Tensors, grads: Tensors, states: Mapping[str, Tensors], step: Step | None, grad_scale,
            skip: torch.Tensor | None, lookahead_steps: Tensors | None = None, k: int | None = None,
            rounding: Rounding = NEAREST) -> Iterator[HostCall]:
    """Device-flow arguments for a path that takes host values (torch, CPU kernels): read them and
    yield a ``HostCall`` per distinct (count, Lookahead due) pair; nothing when the step is skipped.
    ``t`` is None without counters, ``sync`` None without Lookahead counters."""
    if skip is not None and bool(skip.reshape(())):
        return
    scale = host_number(grad_scale)
    counts = [int(c) for c in step] if step is not None and not isinstance(step, int) else None
    due = [int(c) % k == 0 for c in lookahead_steps] if lookahead_steps is not None else None
    buckets: dict = defaultdict(list)
    for i in range(len(params)):
        buckets[(step if counts is None else counts[i], None if due is None else due[i])].append(i)
    for (t, sync), idx in buckets.items():
        pick = (lambda ts: [ts[i] for i in idx])
        yield HostCall(pick(params), pick(grads), {key: pick(v) for key, v in states.items()}, t, scale, sync,
                       rounding.pick(idx))


def warming() -> bool:
    """Inside ``compiling()``: launches only compile, and the torch path, which has nothing to
    compile, must not run either (a warm-up changes no tensor)."""
    try:
        from triton_kernels import _launch
    except ImportError:
        return False
    return _launch._COMPILING[0] > 0


def one_step():
    """A context around one optimizer step's launches, in which the Triton launchers check the
    grads once for all of them (``TableCache.one_step``); a no-op context without triton."""
    try:
        from triton_kernels import _multi_tensor
    except ImportError:
        import contextlib

        return contextlib.nullcontext()
    return _multi_tensor.TABLES.one_step()


def compiling():
    """A context in which the Triton launchers compile what they would launch and run nothing
    (warm-up); a no-op context without triton."""
    try:
        from triton_kernels import _launch
    except ImportError:
        import contextlib

        return contextlib.nullcontext()
    return _launch.compiling()
