"""``optimizer.memory_report()``: bytes of state per mode, measured on AdamW."""

from __future__ import annotations

import pytest
import torch

import dist_optim
from dist_optim.state import MIN_QUANTIZED_NUMEL

N = 1 << 20  # a large weight: absmax and counters are a negligible share


def _stepped(state_dtype, numel=N, extra=()):
    params = [torch.zeros(numel, requires_grad=True), *extra]
    opt = dist_optim.AdamW(params, lr=1e-3, backend="torch", state_dtype=state_dtype)
    for p in params:
        p.grad = torch.ones_like(p)
    opt.step()
    return opt


def test_adamw_state_bytes_per_element_fp32_and_int8():
    fp32 = _stepped("fp32").memory_report()
    int8 = _stepped("int8").memory_report()
    # fp32: two 4-byte moments; int8: two 1-byte codes and an fp32 absmax per 256 elements each
    assert fp32.total == 8 * N + 4 and fp32.fp32 == 8 * N and fp32.int8 == 0 and fp32.counters == 4
    assert int8.total == 2 * N + 2 * 4 * (N // 256) + 4 and int8.int8 == 2 * N + 8 * (N // 256) and int8.fp32 == 0
    assert fp32.bytes_per_element == pytest.approx(8.0, abs=1e-5)
    assert int8.bytes_per_element == pytest.approx(2.03125, abs=1e-5)  # 2 + 8 / 256
    assert (fp32.params_fp32, fp32.params_int8, int8.params_fp32, int8.params_int8) == (1, 0, 0, 1)
    assert int8.per_entry["exp_avg"] == N and int8.per_entry["exp_avg_absmax"] == 4 * (N // 256)


def test_small_params_count_as_fp32_under_int8():
    bias = torch.zeros(MIN_QUANTIZED_NUMEL - 1, requires_grad=True)
    report = _stepped("int8", extra=(bias,)).memory_report()
    assert report.params_int8 == 1 and report.params_fp32 == 1
    assert report.fp32 == 8 * bias.numel()
    assert report.numel == N + bias.numel()


def test_lookahead_reports_the_wrapped_state_with_its_slow_weights():
    params = [torch.zeros(N, requires_grad=True)]
    opt = dist_optim.Lookahead(dist_optim.AdamW(params, backend="torch", state_dtype="int8"), k=2)
    params[0].grad = torch.ones_like(params[0])
    opt.step()
    report = opt.memory_report()
    assert report.fp32 == 4 * N  # the slow weights
    assert report.counters == 8  # step and lookahead_step
