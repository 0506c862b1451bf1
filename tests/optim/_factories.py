"""One configured instance of every element-wise optimizer (and the Lookahead wrapper), by name."""

from __future__ import annotations

import dist_optim

CONFIGS = {
    "SGD": lambda ps, **kw: dist_optim.SGD(ps, lr=0.05, momentum=0.9, weight_decay=0.01, **kw),
    "Adagrad": lambda ps, **kw: dist_optim.Adagrad(ps, lr=0.05, lr_decay=0.01, **kw),
    "RMSprop": lambda ps, **kw: dist_optim.RMSprop(ps, lr=0.01, momentum=0.5, centered=True, **kw),
    "Adam": lambda ps, **kw: dist_optim.Adam(ps, lr=0.01, amsgrad=True, **kw),
    "AdamW": lambda ps, **kw: dist_optim.AdamW(ps, lr=0.01, **kw),
    "RAdam": lambda ps, **kw: dist_optim.RAdam(ps, lr=0.01, **kw),
    "Ranger": lambda ps, **kw: dist_optim.Ranger(ps, lr=0.01, k=3, alpha=0.3, **kw),
    "Lookahead(AdamW)": lambda ps, **kw: dist_optim.Lookahead(dist_optim.AdamW(ps, lr=0.01, **kw), k=3, alpha=0.3),
}


def snapshot(opt, params):
    """Deep copies of params and state, to compare byte for byte."""
    state = {i: {k: v.clone() for k, v in opt.state[p].items()} for i, p in enumerate(params) if p in opt.state}
    return [p.detach().clone() for p in params], state


def assert_identical(a, b):
    params_a, state_a = a
    params_b, state_b = b
    assert len(params_a) == len(params_b)
    for x, y in zip(params_a, params_b):
        assert torch_equal_bits(x, y)
    assert state_a.keys() == state_b.keys()
    for i in state_a:
        assert state_a[i].keys() == state_b[i].keys(), i
        for key in state_a[i]:
            assert torch_equal_bits(state_a[i][key], state_b[i][key]), (i, key)


def torch_equal_bits(x, y) -> bool:
    import torch

    if x.shape != y.shape or x.dtype != y.dtype:
        return False
    if x.numel() == 0:
        return True
    return torch.equal(x.contiguous().view(-1).view(torch.uint8), y.contiguous().view(-1).view(torch.uint8))
