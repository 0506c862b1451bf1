"""Byte accounting of optimizer state (dist_optim.state.accounting)."""

from __future__ import annotations

import torch

from dist_optim.state import accounting, blockwise, codes


def test_state_bytes_of_fp32_and_int8_state():
    p_big, p_small = torch.zeros(10_000), torch.zeros(100)
    m_codes, m_absmax = blockwise.quantize_blockwise(torch.randn(10_000), codes.SIGNED, 256)
    v_codes, v_absmax = blockwise.quantize_blockwise(torch.rand(10_000), codes.UNSIGNED, 256)
    state = {
        p_big: {"step": 3, "exp_avg": {"codes": m_codes, "absmax": m_absmax},
                "exp_avg_sq": {"codes": v_codes, "absmax": v_absmax}},
        p_small: {"step": torch.tensor(3.0), "exp_avg": torch.zeros(100), "exp_avg_sq": torch.zeros(100)},
    }
    report = accounting.state_bytes(state)
    big = 2 * (10_000 + 4 * 40)  # codes + fp32 absmax per 256-element block (40 blocks), twice
    assert report.per_param[p_big] == big == 2 * accounting.int8_state_bytes(10_000, 256)
    assert report.per_param[p_small] == 4 + 2 * 400
    assert report.total == big + 804
    assert report.per_entry["exp_avg.codes"] == 10_000 and report.per_entry["exp_avg.absmax"] == 160
    assert report.per_entry["exp_avg"] == 400 and report.per_entry["step"] == 4
    # int8 moments: ~2.03 bytes per param instead of 8
    assert big / 10_000 < 2.04


def test_a_tensor_referenced_twice_counts_once_and_views_count_their_elements():
    flat = torch.zeros(1000)
    state = {0: {"a": flat, "b": flat}, 1: {"c": flat[:100], "d": flat[100:300]}}
    report = accounting.state_bytes(state)
    assert report.per_param == {0: 4000, 1: 1200} and report.total == 5200


def test_empty_tensors_and_state_dict_form():
    sd = {"state": {0: {"exp_avg": torch.zeros(0), "exp_avg_sq": torch.zeros(0)}, 1: {}}}
    report = accounting.state_bytes(sd["state"])
    assert report.total == 0 and report.per_param == {0: 0, 1: 0}


def test_the_small_tensor_rule():
    assert accounting.MIN_QUANTIZED_NUMEL == 4096
    assert not accounting.quantizes(4095) and accounting.quantizes(4096)
    assert accounting.quantizes(100, min_numel=64)
