"""What the kernel tests share: random params, grads and states (optionally at unaligned offsets in
their buffers), offset-keeping copies, and the comparison of a backend's step with the torch path's
(the specification). Tolerances are argued in the test modules' docstrings."""

from __future__ import annotations

import torch

POSITIVE = ("exp_avg_sq", "max_exp_avg_sq", "sum", "square_avg")  # state kept >= 0 by its optimizer


# Adam's switches, for every backend's Adam test: coupled/decoupled decay, amsgrad, and a beta1
# that takes torch.lerp's other branch.
ADAM_CASES = [
    dict(beta1=0.9, beta2=0.999, weight_decay=0.0, decoupled=False, amsgrad=False),
    dict(beta1=0.9, beta2=0.99, weight_decay=0.1, decoupled=False, amsgrad=True),
    dict(beta1=0.9, beta2=0.999, weight_decay=0.1, decoupled=True, amsgrad=False),
    dict(beta1=0.3, beta2=0.9, weight_decay=0.01, decoupled=True, amsgrad=True),
]
ADAM_IDS = ["adam", "adam-l2-amsgrad", "adamw", "adamw-amsgrad-bigweight"]
# RMSprop's: plain, centered with momentum and decay, an alpha that takes lerp's other branch.
RMSPROP_CASES = [
    dict(alpha=0.99, momentum=0.0, centered=False, weight_decay=0.0),
    dict(alpha=0.9, momentum=0.5, centered=True, weight_decay=0.01),
    dict(alpha=0.3, momentum=0.9, centered=True, weight_decay=0.0),
    dict(alpha=0.99, momentum=0.9, centered=False, weight_decay=0.1),
]
RMSPROP_IDS = ["plain", "centered-momentum-wd", "centered-bigweight", "momentum-wd"]


def at_offset(t, offset):
    """A copy of t that starts ``offset`` elements into its own buffer (offset 0: a plain copy)."""
    view = torch.empty(offset + t.numel(), dtype=t.dtype, device=t.device)[offset:]
    return view.copy_(t)


def make(dtype, device, state_keys, *, sizes, grad_dtype=None, seed=0, offsets=None):
    """Params, grads and states of ``sizes``; ``offsets`` ({"params"|"grads"|"states": k}) puts
    that role's tensors k elements into a larger buffer (a view at an unaligned address)."""
    offsets = offsets or {}
    gen = torch.Generator().manual_seed(seed)
    params = [at_offset(torch.randn(n, generator=gen).to(device=device, dtype=dtype), offsets.get("params", 0)) for n in sizes]
    grads = [at_offset(torch.randn(n, generator=gen).to(device=device, dtype=grad_dtype or dtype), offsets.get("grads", 0))
             for n in sizes]
    states = {}
    for key in state_keys:
        values = [torch.randn(n, generator=gen) for n in sizes]
        if key in POSITIVE:
            values = [v.abs() for v in values]
        states[key] = [at_offset(v.to(device=device), offsets.get("states", 0)) for v in values]
    return params, grads, states


def clone(params, grads, states):
    """Copies that keep each tensor's offset in its buffer, hence its alignment."""
    copy = lambda t: at_offset(t, t.storage_offset())  # noqa: E731
    return [copy(p) for p in params], [copy(g) for g in grads], {k: [copy(t) for t in v] for k, v in states.items()}


def assert_match(ours, ref, state_rtol=2e-6):
    (p1, _, s1), (p2, _, s2) = ours, ref
    for a, b in zip(p1, p2):
        assert a.dtype == b.dtype
        if a.dtype == torch.float32:
            torch.testing.assert_close(a, b, rtol=2e-6, atol=1e-6)
        else:
            eps = torch.finfo(a.dtype).eps
            torch.testing.assert_close(a.float(), b.float(), rtol=eps, atol=eps * 1e-2)
    for key in s1:
        for a, b in zip(s1[key], s2[key]):
            assert a.dtype == torch.float32
            torch.testing.assert_close(a, b, rtol=state_rtol, atol=1e-6, msg=f"state {key!r}")


def compare(step_fn, dtype, device, state_keys, *, backend, sizes, steps=3, grad_dtype=None, data=None,
            state_rtol=2e-6):
    """``steps`` steps of ``backend`` against the torch path from the same data. Low-precision params
    restart from the reference's values each step: a one-ulp param difference feeds the next step."""
    data = make(dtype, device, state_keys, sizes=sizes, grad_dtype=grad_dtype) if data is None else data
    ref = clone(*data)
    for t in range(1, steps + 1):
        if dtype != torch.float32:
            data = clone(*ref)
        step_fn(*data, t=t, backend=backend)
        step_fn(*ref, t=t, backend="torch")
        if dtype != torch.float32:
            assert_match(data, ref, state_rtol)
    assert_match(data, ref, state_rtol)
