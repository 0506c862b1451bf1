"""Fused Triton optimizer kernels: each family's whole step in one pass over memory, over many
tensors per launch through pointer tables (cached per set of storages). Thin launchers take
tensors and scalars; they know nothing of optimizers, param groups or torch.distributed.
Importable without triton (``supports`` then says no).

The update launchers (``sgd_step`` ... ``lookahead_sync``) also take, optionally:
- per-step values (lr, step_size, bias corrections, grad_scale, clr) as one-element fp32 tensors on
  the params' device instead of floats: the kernel reads them there (no host sync, no recompile);
  values that pick a kernel variant (weight_decay != 0, momentum > 0, betas) stay floats;
- ``skip``: a one-element device tensor; nonzero makes the launch change nothing;
- ``compile_only=True``: compile what the call would launch, change nothing (warm-up);
- ``steps`` (adam, radam, adagrad): per-param one-element fp32 step counts on the device, from which
  each tensor's step-derived scalars are computed in the kernel (fp64, as the host does);
- ``la_steps``, ``k`` (radam, lookahead_sync): per-param Lookahead counts; a tensor syncs when its
  count is a multiple of k;
- ``bf16_update`` ("nearest", "stochastic", "kahan"), ``sr_seeds``, ``sr_step`` (every update
  launcher; ``steps`` too for sgd and rmsprop): how bf16 params store the fp32 result
  (dist_optim.state.rounding), in registers in the same pass; slow weights (radam_step's
  ``slow_buffer``, lookahead_sync's) may be fp32, bf16 or fp16.

``step_control`` decides a step's scale (grad_scale times the clip coefficient), its non-finite skip
and its gradient norm on the device, and advances the step counters unless the step is skipped: with
it and ``sumsq_nonfinite``, a step needs no host sync.

Full chunks of 16-byte-aligned tensors run unmasked with 128-bit accesses, tails and unaligned
tensors masked; ``_aot`` checks the machine code of every specialization (tests/kernels/test_aot.py,
benchmarks/aot_audit.py)."""

import torch

from ._support import supports

__all__ = ["supports"]

# The update launchers read step counters, the grad scale, the skip flag and Lookahead's sync
# decision on the device (dist_optim.functional dispatches its device flow on this).
READS_DEVICE_VALUES = True
# The bf16 update modes and slow-weight dtypes the launchers implement (dist_optim.functional sends
# a call with another to the torch path).
ROUNDING_MODES = ("nearest", "stochastic", "kahan")
SLOW_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

try:
    import triton  # noqa: F401
except ImportError:  # the launchers need triton; supports() is all there is without it
    pass
else:
    from .adagrad import adagrad_step
    from .adam import adam_step
    from .control import step_control
    from .norm import sumsq_nonfinite
    from .radam import lookahead_sync, radam_step
    from .rmsprop import rmsprop_step
    from .sgd import sgd_step

    __all__ += ["adagrad_step", "adam_step", "lookahead_sync", "radam_step", "rmsprop_step", "sgd_step", "step_control",
                "sumsq_nonfinite"]
