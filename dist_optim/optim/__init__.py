"""torch.optim.Optimizer subclasses: argument checks, param groups, fp32 state, Lookahead/Ranger."""

from .adagrad import Adagrad
from .adam import Adam, AdamW
from .base import FusedOptimizer, NonFiniteGradientError
from .lbfgs import LBFGS
from .lookahead import Lookahead, fused_core
from .radam import RAdam
from .ranger import Ranger
from .rmsprop import RMSprop
from .sgd import SGD

__all__ = [
    "SGD", "Adagrad", "RMSprop", "Adam", "AdamW", "RAdam", "Lookahead", "Ranger", "LBFGS",
    "FusedOptimizer", "NonFiniteGradientError", "fused_core",
]
