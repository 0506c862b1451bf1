"""The GPU machine code of the int8-state kernel variants (test_aot's audit, for what
``state_dtype="int8"`` launches): every family's QUANT specializations, recorded from real steps
under the interpreter (host flow and device flow, fp32 and bf16 params, and bf16 params under
``bf16_update="stochastic"`` and ``"kahan"``), compiled for sm_80/sm_90.

Fails on: any int32 per-element address arithmetic; an fp32-param variant without 128-bit global
loads and stores (the params and grads; bf16 ones get 64-bit accesses at the 8 warps these
variants run with, see triton_kernels._multi_tensor.QUANT_NUM_WARPS); more than 16 bytes of spill
in any specialization, or spills in more than one of them. At the time of writing one
specialization (AdamW, bf16, device flow, sm_90) spills 12 bytes, which ptxas's register choice
decides, not the kernel's working set (the fp32 and sm_80 forms of the same kernel do not spill).
"""

from __future__ import annotations

import functools

import pytest
import torch

import triton_kernels

triton = pytest.importorskip("triton")
pytestmark = pytest.mark.skipif(not triton_kernels.supports(torch.device("cpu")) and not torch.cuda.is_available(),
                                reason="records launches under the Triton interpreter or on CUDA")

RUNS = [("SGD", dict(lr=0.1, momentum=0.9), 2), ("Adagrad", dict(lr=0.1), 1),
        ("RMSprop", dict(lr=0.01, momentum=0.5, centered=True), 1), ("Adam", dict(lr=0.01, amsgrad=True), 1),
        ("AdamW", dict(lr=0.01), 1), ("RAdam", dict(lr=0.01), 7), ("Ranger", dict(lr=0.01, k=2), 7)]
# int8 moments with bf16 params under bf16_update="stochastic" and "kahan" (every family but Adam's
# amsgrad and RAdam without Lookahead, whose param stores are those of AdamW and Ranger).
BF16_UPDATE_RUNS = [(name, dict(kw, bf16_update=mode), steps) for mode in ("stochastic", "kahan")
                    for name, kw, steps in RUNS if name not in ("Adam", "RAdam")]


@functools.lru_cache(maxsize=None)
def audit_rows() -> tuple:
    import dist_optim
    from dist_optim.state import MIN_QUANTIZED_NUMEL
    from triton_kernels import _aot, _launch

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    with _launch.recording() as calls:
        runs = [(name, kw, steps, dtype) for name, kw, steps in RUNS for dtype in (torch.float32, torch.bfloat16)]
        runs += [(name, kw, steps, torch.bfloat16) for name, kw, steps in BF16_UPDATE_RUNS]
        for name, kw, steps, dtype in runs:
            gen = torch.Generator().manual_seed(0)
            params = [torch.randn(MIN_QUANTIZED_NUMEL + 300, generator=gen).to(device=device, dtype=dtype)
                      .requires_grad_()]
            opt = getattr(dist_optim, name)(params, backend="triton", max_grad_norm=1.0, state_dtype="int8", **kw)
            for _ in range(steps):
                params[0].grad = torch.randn(params[0].shape, generator=gen).to(device=device, dtype=dtype)
                opt.step()
    specs = []
    for spec in _aot.specs(calls):
        names = list(spec["signature"])
        if any(names[path[0]] == "QUANT" and value is True for path, value in spec["constexprs"]):
            specs.append(spec)
    return tuple(_aot.audit(specs))


def test_every_family_has_quantized_specializations():
    kernels = {row["kernel"].split(":")[1] for row in audit_rows()}
    assert kernels == {"_sgd_kernel", "_adagrad_kernel", "_rmsprop_kernel", "_adam_kernel", "_radam_kernel"}


def test_bf16_update_variants_are_audited():
    names = [row["name"] for row in audit_rows()]
    for kernel in ("_sgd_kernel", "_adagrad_kernel", "_rmsprop_kernel", "_adam_kernel", "_radam_kernel"):
        for rounding in ("ROUNDING=1", "ROUNDING=2"):
            assert any(n.startswith(f"{kernel}[bf16") and rounding in n.split(",") for n in names), (kernel, rounding)


def test_no_int32_addressing():
    bad = [(row["name"], row["arch"], row["int32_addressing"]) for row in audit_rows() if row["int32_addressing"]]
    assert not bad


def test_fp32_params_get_128_bit_accesses():
    rows = [row for row in audit_rows() if "[fp32,fp32" in row["name"]]
    assert rows
    assert all(row["ld128"] > 0 and row["st128"] > 0 for row in rows), [r["name"] for r in rows if not r["ld128"]]


def test_spills_are_rare_and_small():
    spilling = [(row["name"], row["arch"], row["spill_stores"]) for row in audit_rows() if row["spill_stores"]]
    assert len(spilling) <= 1 and all(n <= 16 for _, _, n in spilling), spilling
