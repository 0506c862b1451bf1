"""Functional layer: one ``xxx_step(params, grads, states, *, hyperparams, grad_scale, backend)`` per
family. The torch path (foreach ops, fp32 math) is the executable specification and runs on CPU; the
Triton path (``triton_kernels``) must match it."""

from ._common import compiling, one_step, resolve_backend
from .adagrad import adagrad_step
from .adam import adam_step
from .control import step_control
from .grad_norm import grad_sumsq_and_flag
from .lookahead import lookahead_sync
from .radam import radam_rho, radam_step, radam_step_size
from .rmsprop import rmsprop_step
from .sgd import sgd_step

__all__ = [
    "adagrad_step",
    "compiling",
    "adam_step",
    "grad_sumsq_and_flag",
    "lookahead_sync",
    "one_step",
    "radam_rho",
    "radam_step",
    "radam_step_size",
    "resolve_backend",
    "rmsprop_step",
    "sgd_step",
    "step_control",
]
