"""Bad input is a ValueError that names the argument and the value, raised before any state exists."""

from __future__ import annotations

import pytest
import torch

import dist_optim


def _p():
    return [torch.zeros(3, requires_grad=True)]


BAD = [
    (lambda: dist_optim.SGD(_p(), lr=-0.1), "lr: -0.1"),
    (lambda: dist_optim.Adam(_p(), lr=-1e-3), "lr: -0.001"),
    (lambda: dist_optim.AdamW(_p(), eps=-1e-8), "eps: -1e-08"),
    (lambda: dist_optim.RMSprop(_p(), eps=-1.0), "eps: -1.0"),
    (lambda: dist_optim.Adam(_p(), weight_decay=-0.1), "weight_decay: -0.1"),
    (lambda: dist_optim.SGD(_p(), weight_decay=-1), "weight_decay: -1"),
    (lambda: dist_optim.Adam(_p(), betas=(1.0, 0.999)), r"betas\[0\]: 1.0"),
    (lambda: dist_optim.AdamW(_p(), betas=(0.9, -0.1)), r"betas\[1\]: -0.1"),
    (lambda: dist_optim.RAdam(_p(), betas=(0.9,)), r"betas: \(0.9,\)"),
    (lambda: dist_optim.Ranger(_p(), betas=(0.95, 1.5)), r"betas\[1\]: 1.5"),
    (lambda: dist_optim.SGD(_p(), momentum=-0.5), "momentum: -0.5"),
    (lambda: dist_optim.RMSprop(_p(), momentum=-0.5), "momentum: -0.5"),
    (lambda: dist_optim.SGD(_p(), nesterov=True), "nesterov: True requires momentum > 0"),
    (lambda: dist_optim.SGD(_p(), momentum=0.9, dampening=0.1, nesterov=True), "dampening=0.1"),
    (lambda: dist_optim.RMSprop(_p(), alpha=1.5), "alpha: 1.5"),
    (lambda: dist_optim.Adagrad(_p(), lr_decay=-1.0), "lr_decay: -1.0"),
    (lambda: dist_optim.Adagrad(_p(), initial_accumulator_value=-1.0), "initial_accumulator_value: -1.0"),
    (lambda: dist_optim.RAdam(_p(), rho_threshold=3.0), "rho_threshold: 3.0"),
    (lambda: dist_optim.Lookahead(dist_optim.SGD(_p()), k=0), "k: 0"),
    (lambda: dist_optim.Lookahead(dist_optim.SGD(_p()), k=2.5), "k: 2.5"),
    (lambda: dist_optim.Lookahead(dist_optim.SGD(_p()), alpha=1.5), "alpha: 1.5"),
    (lambda: dist_optim.Lookahead(dist_optim.SGD(_p()), alpha=-0.1), "alpha: -0.1"),
    (lambda: dist_optim.Lookahead(torch.optim.SGD(_p()), k=5), "optimizer must be a dist_optim optimizer, got SGD"),
    (lambda: dist_optim.Lookahead(dist_optim.Ranger(_p())), "already does Lookahead"),
    (lambda: dist_optim.Ranger(_p(), k=0), "k: 0"),
    (lambda: dist_optim.Ranger(_p(), alpha=2.0), "alpha: 2.0"),
    (lambda: dist_optim.Adam([]), "params: optimizer got an empty parameter list"),
    (lambda: dist_optim.Adam(torch.zeros(3)), "params must be an iterable"),
    (lambda: dist_optim.Adam(_p(), backend="cuda"), "backend: 'cuda'"),
    (lambda: dist_optim.Adam(_p(), nonfinite="ignore"), "nonfinite: 'ignore'"),
    (lambda: dist_optim.Adam(_p(), max_grad_norm=0.0), "max_grad_norm: 0.0"),
    (lambda: dist_optim.Adam(_p(), lr=float("nan")), "lr must not be NaN"),
    (lambda: dist_optim.Adam(_p(), lr="0.1"), "lr must be a real number"),
    (lambda: dist_optim.Adam([{"params": _p()}, {"params": _p(), "lr": -1.0}]), "lr: -1.0"),
    # real kernels and fp32 state: a complex param would lose its imaginary part
    (lambda: dist_optim.SGD([torch.zeros(2, dtype=torch.complex64, requires_grad=True)]),
     r"params: a torch.complex64 tensor of shape \(2,\)"),
    (lambda: dist_optim.Adam(_p()).add_param_group({"params": [torch.zeros(2, dtype=torch.complex128, requires_grad=True)]}),
     "params: a torch.complex128 tensor"),
]


@pytest.mark.parametrize("make,message", BAD, ids=[m for _, m in BAD])
def test_bad_argument_raises_value_error(make, message):
    with pytest.raises(ValueError, match=message):
        make()


def test_bad_param_group_added_later_is_refused_and_not_kept():
    opt = dist_optim.Adam(_p())
    with pytest.raises(ValueError, match="weight_decay: -1.0"):
        opt.add_param_group({"params": _p(), "weight_decay": -1.0})
    assert len(opt.param_groups) == 1


UNKNOWN = [(name, "weight_decy") for name in ("SGD", "Adagrad", "RMSprop", "Adam", "AdamW", "RAdam", "Ranger", "LBFGS")]
UNKNOWN += [(name, "k") for name in ("SGD", "Adam", "RAdam", "LBFGS")]  # Lookahead's, not theirs


@pytest.mark.parametrize("name,keyword", UNKNOWN)
def test_unknown_keyword_is_refused(name, keyword):
    """A misspelt argument (a ds_config's optimizer params arrive as keywords) is an error, never a
    group entry nothing reads (RAdam took any keyword, so a ds_config's typo or Lookahead's k and
    alpha given to RAdam ran as plain RAdam)."""
    with pytest.raises(TypeError, match=keyword):
        getattr(dist_optim, name)(_p(), **{keyword: 2})


@pytest.mark.parametrize("name", ["SGD", "Adagrad", "RMSprop", "Adam", "AdamW", "RAdam", "Ranger"])
def test_sparse_gradient_raises_value_error_and_changes_nothing(name):
    dense, sparse_param = torch.ones(3, requires_grad=True), torch.ones(4, requires_grad=True)
    opt = getattr(dist_optim, name)([dense, sparse_param], lr=0.1)
    dense.grad = torch.ones(3)
    sparse_param.grad = torch.sparse_coo_tensor([[0]], [1.0], (4,))
    with pytest.raises(ValueError, match="param 1 of param group 0 has a torch.sparse_coo grad"):
        opt.step()
    assert torch.equal(dense, torch.ones(3)) and not opt.state


def test_triton_backend_without_support_is_a_clear_error(monkeypatch):
    import triton_kernels

    monkeypatch.setattr(triton_kernels, "supports", lambda device: False)
    p = torch.zeros(3, requires_grad=True)
    p.grad = torch.ones(3)
    with pytest.raises(RuntimeError, match="backend='triton' cannot run on cpu"):
        dist_optim.Adam([p], backend="triton").step()
