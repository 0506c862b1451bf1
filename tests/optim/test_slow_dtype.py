"""Lookahead's and Ranger's slow weights: in each param's dtype by default, or in ``slow_dtype``;
the sync computes in fp32, stores the slow weights rounded to nearest and gives the params the
stored value. Checked bit for bit against the plain reference of test_bf16_update (torch path)."""

from __future__ import annotations

import io

import pytest
import torch

import dist_optim
from tests.optim._factories import torch_equal_bits
from tests.optim._setup import set_grads
from tests.optim.test_bf16_update import STEPS, TRITON, Reference, grads_of, mixed_params

WRAPPERS = ("Ranger", "Lookahead(AdamW)")


def build(name, params, slow_dtype, **kw):
    if name == "Ranger":
        return dist_optim.Ranger(params, lr=0.01, k=3, alpha=0.3, slow_dtype=slow_dtype, **kw)
    return dist_optim.Lookahead(dist_optim.AdamW(params, lr=0.01, **kw), k=3, alpha=0.3, slow_dtype=slow_dtype)


@pytest.mark.parametrize("name", WRAPPERS)
def test_slow_weights_default_to_the_param_dtype(name):
    params = mixed_params()
    opt = build(name, params, None, backend="torch")
    set_grads(params, 0)
    opt.step()
    for p in params:
        if p.requires_grad:
            assert opt.state[p]["slow_buffer"].dtype == p.dtype
        else:  # frozen: not a Lookahead member
            assert "slow_buffer" not in opt.state.get(p, {})


@pytest.mark.parametrize("slow_dtype, dtype", [(torch.float32, torch.float32), ("fp32", torch.float32),
                                               ("bf16", torch.bfloat16), (torch.float16, torch.float16)])
@pytest.mark.parametrize("name", WRAPPERS)
def test_slow_dtype_applies_to_every_param(name, slow_dtype, dtype):
    params = mixed_params()
    opt = build(name, params, slow_dtype, backend="torch")
    set_grads(params, 0)
    opt.step()
    assert {opt.state[p]["slow_buffer"].dtype for p in params if p.requires_grad} == {dtype}


@pytest.mark.parametrize("backend", ["torch", TRITON])
@pytest.mark.parametrize("slow_dtype", [None, torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("name", WRAPPERS)
def test_sync_equals_the_plain_reference(name, slow_dtype, backend):
    params = mixed_params()
    opt = build(name, params, slow_dtype, backend=backend)
    ref = Reference(name, params, "nearest", k=3, alpha=0.3, slow_dtype=slow_dtype)
    for step in range(STEPS):
        set_grads(params, step)
        ref.step(grads_of(params))
        opt.step()
    for i, (p, r) in enumerate(zip(params, ref.params)):
        slow = opt.state[p]["slow_buffer"] if p.requires_grad else None
        if backend == "torch":
            assert torch_equal_bits(p.detach(), r), i
            if slow is not None:
                assert torch_equal_bits(slow, ref.state[i]["slow"]), i
        else:  # an fp32 ulp of the kernels' math can move a rounding by one ulp of the narrower dtype
            torch.testing.assert_close(p.detach().float(), r.float(), rtol=2**-7, atol=1e-5)
            if slow is not None:
                torch.testing.assert_close(slow.float(), ref.state[i]["slow"].float(), rtol=2**-7, atol=1e-5)


@pytest.mark.parametrize("name", WRAPPERS)
def test_fp32_slow_weights_keep_what_bf16_ones_round_away(name):
    """The choice matters: for bf16 params, fp32 slow weights give other params than bf16 ones."""
    runs = {}
    for slow_dtype in ("fp32", "bf16"):
        params = mixed_params()
        opt = build(name, params, slow_dtype, backend="torch")
        for step in range(STEPS):
            set_grads(params, step)
            opt.step()
        runs[slow_dtype] = [p.detach().clone() for p in params]
    assert any(not torch.equal(a, b) for a, b in zip(runs["fp32"], runs["bf16"]))


@pytest.mark.parametrize("name", WRAPPERS)
def test_bf16_slow_weights_survive_a_state_dict_round_trip(name):
    params = mixed_params()
    opt = build(name, params, None, backend="torch")
    for step in range(4):
        set_grads(params, step)
        opt.step()
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    buf.seek(0)
    copies = [p.detach().clone().requires_grad_(p.requires_grad) for p in params]
    resumed = build(name, copies, None, backend="torch")
    resumed.load_state_dict(torch.load(buf))
    for a, b in zip(params, copies):
        if a.requires_grad:
            assert torch_equal_bits(opt.state[a]["slow_buffer"], resumed.state[b]["slow_buffer"])
    for step in range(4, 8):
        set_grads(params, step)
        set_grads(copies, step)
        opt.step()
        resumed.step()
    for a, b in zip(params, copies):
        assert torch_equal_bits(a.detach(), b.detach())


def test_memory_report_counts_slow_weights_by_dtype():
    p = torch.zeros(1000, dtype=torch.bfloat16, requires_grad=True)
    for slow_dtype, field, nbytes in ((None, "bf16", 2000), ("fp32", "fp32", 4000)):
        opt = build("Lookahead(AdamW)", [p], slow_dtype, backend="torch")
        p.grad = torch.ones_like(p)
        opt.step()
        report = opt.memory_report()
        assert report.per_entry["slow_buffer"] == nbytes
        assert getattr(report, field) >= nbytes


@pytest.mark.parametrize("bad", ["fp64", "float32", torch.float64, torch.int8, 16, True])
def test_bad_slow_dtype_is_a_value_error(bad):
    params = mixed_params()
    with pytest.raises(ValueError, match="slow_dtype"):
        dist_optim.Lookahead(dist_optim.AdamW(params), slow_dtype=bad)
    with pytest.raises(ValueError, match="slow_dtype"):
        dist_optim.Ranger(params, slow_dtype=bad)
