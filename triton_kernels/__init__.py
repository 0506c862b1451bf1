"""Fused Triton optimizer kernels: each family's whole step in one pass over memory, over many
tensors per launch through pointer tables. Thin launchers take tensors and Python scalars; they know
nothing of optimizers, param groups or torch.distributed. Importable without triton (``supports``
then says no)."""

from ._support import supports

__all__ = ["supports"]

try:
    import triton  # noqa: F401
except ImportError:  # the launchers need triton; supports() is all there is without it
    pass
else:
    from .adagrad import adagrad_step
    from .adam import adam_step
    from .norm import sumsq_nonfinite
    from .radam import lookahead_sync, radam_step
    from .rmsprop import rmsprop_step
    from .sgd import sgd_step

    __all__ += ["adagrad_step", "adam_step", "lookahead_sync", "radam_step", "rmsprop_step", "sgd_step", "sumsq_nonfinite"]
