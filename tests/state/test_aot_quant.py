"""The quantization helpers compiled for sm_80 and sm_90 without a GPU (triton_kernels._aot):
the standalone launchers of triton_kernels.quant and an int8-state Adam kernel built from
triton_kernels._quant (tests/state/_int8_adam_kernel.py), as real launches specialize them
(recorded under the interpreter or on CUDA, compiled at the GPU tile size).

Fails on any spill or local-memory access, or a per-element address computed in 32-bit
arithmetic from a value that can be large (the code-table gathers included: their offsets are
int64); and if the int8 kernel's full tiles lose their 128-bit accesses to the bf16 params and
fp32 grads."""

from __future__ import annotations

import functools

import pytest
import torch

import triton_kernels

triton = pytest.importorskip("triton")

from dist_optim.state import blockwise, codes, rounding  # noqa: E402

pytestmark = pytest.mark.skipif(not triton_kernels.supports(torch.device("cpu")) and not torch.cuda.is_available(),
                                reason="records launches under the Triton interpreter or on CUDA")


@functools.lru_cache(maxsize=1)
def recorded_specs() -> tuple:
    from tests.state._int8_adam_kernel import int8_adam_kernel
    from triton_kernels import _aot, _launch, quant

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    s_code, u_code = codes.SIGNED.to(device), codes.UNSIGNED.to(device)
    s_thr, u_thr = codes.thresholds(codes.SIGNED).to(device), codes.thresholds(codes.UNSIGNED).to(device)
    with _launch.recording() as calls:
        for n in (1000, 4096):
            x = torch.randn(n, device=device)
            for qblock in (64, 256):
                q, a = quant.quantize_blockwise(x, s_thr, qblock)
                quant.dequantize_blockwise(q, a, s_code, qblock)
            quant.stochastic_round_bf16(x, 2 ** 31 + 1, 2 ** 33)
        for n in (700, 4096):
            p, g = torch.randn(n, device=device).bfloat16(), torch.randn(n, device=device)
            mc, ma = blockwise.quantize_blockwise(torch.zeros(n), codes.SIGNED, 256)
            vc, va = blockwise.quantize_blockwise(torch.zeros(n), codes.UNSIGNED, 256)
            moved = [t.to(device) for t in (mc, ma, vc, va)]
            _launch.run(int8_adam_kernel, (triton.cdiv(n, 512),), device, p, g, *moved, s_code, s_thr, u_code, u_thr,
                        n, 1e-3, 0.9, 0.999, 1e-8, quant.seed_arg(rounding.stream_seed(0, 1, 0)), BLOCK=512,
                        QBLOCK=256, num_warps=4)
    return tuple(_aot.specs(calls))


@functools.lru_cache(maxsize=1)
def audit_rows() -> tuple:
    from triton_kernels import _aot

    return tuple(_aot.audit(list(recorded_specs())))


def test_specs_use_the_gpu_tile():
    from triton_kernels import quant

    specs = recorded_specs()
    kernels = {s["kernel"].split(":")[1] for s in specs}
    assert kernels == {"_quantize_kernel", "_dequantize_kernel", "_stochastic_round_kernel", "int8_adam_kernel"}
    for s in specs:
        names = list(s["signature"])
        sizes = {names[path[0]]: value for path, value in s["constexprs"]}
        assert sizes["BLOCK"] == quant.GPU_BLOCK  # what a CUDA launch passes, not the interpreter's tile
        if "QBLOCK" in sizes:
            assert sizes["BLOCK"] % sizes["QBLOCK"] == 0


def test_every_spec_compiles_for_both_archs():
    rows = audit_rows()
    assert len(rows) == 2 * len(recorded_specs()) and {r["arch"] for r in rows} == {"sm_80", "sm_90"}


def test_no_spills_and_no_local_memory():
    bad = [(r["name"], r["arch"], r["registers"], r["spill_stores"], r["spill_loads"], r["stack"], r["local"])
           for r in audit_rows() if r["spill_stores"] or r["spill_loads"] or r["stack"] or r["local"]]
    assert not bad


def test_addresses_are_int64():
    bad = [(r["name"], r["arch"], r["int32_addressing"][:3]) for r in audit_rows() if r["int32_addressing"]]
    assert not bad


def test_the_int8_kernel_keeps_128_bit_param_and_grad_accesses():
    rows = [r for r in audit_rows() if r["kernel"].endswith(":int8_adam_kernel")]
    assert rows and all(r["ld128"] > 0 and r["st128"] > 0 for r in rows), rows
