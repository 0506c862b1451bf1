"""Fused CPU optimizer kernels: each family's whole step in one pass over memory, multi-threaded
(``torch.get_num_threads()`` OpenMP threads, at most this rank's share of the host's cores where a
launcher started several ranks and set no ``OMP_NUM_THREADS``: ``_threads``; over fixed 32K-element chunks) and vectorized, over all
tensors of a (param dtype, grad dtype) bucket per call. The launchers have the Triton launchers'
signatures (``triton_kernels``): tensors and Python scalars in, nothing of optimizers or
torch.distributed. The kernels are a small C++ library (``kernels.cpp``, no torch headers) built on
first use — about 4 s of compiler CPU time, once per machine, cached by source, flags, compiler and
CPU (see ``_build``); loading it afterwards takes ~20 ms. ``supports`` says whether it can run here.

Why C++ rather than torch's own fused CPU kernels or Inductor: torch's ``_fused_adamw_`` and friends
keep state in the param dtype (no bf16/fp16 params with fp32 state), divide by the grad scale where
we multiply, and cover four of the eight families; a ``torch.compile``d per-tensor function matches
them on AdamW but costs seconds of compilation per family, dtype, switch and tensor layout. One
library covers every family, dtype pair and switch, and follows the torch path's roundings
operation by operation (see the header of ``kernels.cpp``).

Params and grads may be fp32, bf16 or fp16 (independently); state is fp32, or int8 for moments
(``state_dtype="int8"``, dist_optim.state's format: uint8 codes beside ``<key>_absmax``, one fp32
absmax per 256 elements), dequantized, updated and quantized again block by block inside the same
pass (``QUANTIZED_STATE``). bf16 params may be written by stochastic rounding or through a Kahan
buffer (``bf16_update``, dist_optim.state.rounding's rules bit for bit: ``ROUNDING_MODES``), and slow
weights may be fp32, bf16 or fp16 (``SLOW_DTYPES``). Non-contiguous tensors run on contiguous copies
written back afterwards.
Everything else (fp64, a state in another dtype) is for the torch path: ``accepts`` tells the
dispatcher.
"""

from __future__ import annotations

import torch

from ._build import BuildError, available
from .launch import (
    accepts,
    adagrad_step,
    adam_step,
    lookahead_sync,
    radam_step,
    rmsprop_step,
    sgd_step,
    sumsq_nonfinite,
)

# The launchers take int8 moments (codes + absmax) as the Triton launchers do; the functional layer
# sends int8 state here only when this is True.
QUANTIZED_STATE = True
# The bf16 write modes (dist_optim.state.rounding: stochastic rounding on the same hash, Kahan
# compensation) and the slow-weight dtypes the launchers implement, bit for bit as the torch path.
ROUNDING_MODES = ("nearest", "stochastic", "kahan")
SLOW_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

__all__ = [
    "QUANTIZED_STATE",
    "ROUNDING_MODES",
    "SLOW_DTYPES",
    "BuildError",
    "accepts",
    "adagrad_step",
    "adam_step",
    "lookahead_sync",
    "radam_step",
    "rmsprop_step",
    "sgd_step",
    "sumsq_nonfinite",
    "supports",
]


def supports(device) -> bool:
    """True for CPU tensors when the kernels build and load on this machine."""
    return getattr(device, "type", device) == "cpu" and available()
