"""Adam (coupled L2 weight decay) and AdamW (decoupled): torch.optim's algorithms and defaults."""

from __future__ import annotations

from typing import Any

from .. import _checks
from ..functional import adam_step
from ..functional.adam import adam_state_keys
from .base import FusedOptimizer


class Adam(FusedOptimizer):
    r"""Adam (Kingma & Ba 2015); ``decoupled_weight_decay=True`` is AdamW (Loshchilov & Hutter 2019).

    .. math::
        g_t = \nabla f(\theta_{t-1}) + \lambda \theta_{t-1} \ \text{(coupled)}, \quad
        \theta_{t-1} \leftarrow (1 - \gamma\lambda)\theta_{t-1} \ \text{(decoupled)}, \\
        m_t = \beta_1 m_{t-1} + (1 - \beta_1) g_t, \quad v_t = \beta_2 v_{t-1} + (1 - \beta_2) g_t^2, \\
        \theta_t = \theta_{t-1} - \frac{\gamma}{1 - \beta_1^t}\,
            \frac{m_t}{\sqrt{v_t} / \sqrt{1 - \beta_2^t} + \epsilon}
        \quad (v_t \to \max_{s \le t} v_s \text{ with amsgrad})

    ``bf16_update`` ("nearest", "stochastic", "kahan") says how bf16 params store the fp32 result
    of a step (no fp32 master copy): rounded to nearest, stochastically (seeded by ``rounding_seed``,
    the param's position, the rank and the step), or through a bf16 compensation buffer (state
    ``kahan_comp``). It applies to bf16 params only: fp32 params are unaffected, fp16 params keep
    round-to-nearest (see dist_optim.optim.base).
    """

    def __init__(
        self,
        params,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        amsgrad: bool = False,
        *,
        decoupled_weight_decay: bool = False,
        maximize: bool = False,
        max_grad_norm: float | None = None,
        nonfinite: str = "skip",
        backend: str = "auto",
        process_group: Any = None,
        capturable: bool = False,
        state_dtype: str = "fp32",
        bf16_update: str = "nearest",
        rounding_seed: int = 0,
    ) -> None:
        defaults = dict(
            lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, amsgrad=amsgrad,
            decoupled_weight_decay=decoupled_weight_decay, maximize=maximize,
        )
        super().__init__(
            params, defaults, max_grad_norm=max_grad_norm, nonfinite=nonfinite, backend=backend, process_group=process_group,
            capturable=capturable, state_dtype=state_dtype, bf16_update=bf16_update, rounding_seed=rounding_seed,
        )

    def _check_group(self, group):
        _checks.non_negative("lr", group["lr"])
        _checks.betas(group["betas"])
        _checks.non_negative("eps", group["eps"])
        _checks.non_negative("weight_decay", group["weight_decay"])

    def _state_key_blocks(self, group):
        return [frozenset(adam_state_keys(group["amsgrad"]))]

    def _init_state(self, param, group):
        state = {"step": self._new_counter(param)}
        for k in adam_state_keys(group["amsgrad"])[1:]:
            state.update(self._new_moment(param, k))
        return state

    def _update_group(self, group, params, grads, grad_scale, skip):
        beta1, beta2 = group["betas"]
        keys = adam_state_keys(group["amsgrad"])[1:]
        for qps, qgs, quantized, mode in self._by_state_dtype(group, params, grads, "exp_avg"):
            for ps, gs, states, t, rounding in self._step_buckets(group, qps, qgs, self._with_absmax(keys, quantized),
                                                                  skip, mode):
                adam_step(
                    ps, gs, states, lr=group["lr"], beta1=beta1, beta2=beta2, eps=group["eps"],
                    weight_decay=group["weight_decay"], decoupled=group["decoupled_weight_decay"],
                    amsgrad=group["amsgrad"], step=t, grad_scale=grad_scale, skip=skip, backend=self.backend,
                    **rounding,
                )


class AdamW(Adam):
    """Adam with decoupled weight decay (default 1e-2), as torch.optim.AdamW."""

    def __init__(
        self,
        params,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        amsgrad: bool = False,
        *,
        maximize: bool = False,
        max_grad_norm: float | None = None,
        nonfinite: str = "skip",
        backend: str = "auto",
        process_group: Any = None,
        capturable: bool = False,
        state_dtype: str = "fp32",
        bf16_update: str = "nearest",
        rounding_seed: int = 0,
    ) -> None:
        super().__init__(
            params, lr, betas, eps, weight_decay, amsgrad, decoupled_weight_decay=True, maximize=maximize,
            max_grad_norm=max_grad_norm, nonfinite=nonfinite, backend=backend, process_group=process_group,
            capturable=capturable, state_dtype=state_dtype, bf16_update=bf16_update, rounding_seed=rounding_seed,
        )
