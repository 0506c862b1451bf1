"""Each optimizer class on the Triton backend equals itself on the torch backend over 10 steps, with
clipping on (so the fused sum-of-squares kernel decides the scale) and the awkward params of
tests/optim (size 1, odd sizes, empty, grad None on some steps, frozen, two groups).

Tolerance rtol 1e-5 / atol 1e-6: per-step differences of an ulp or two (see test_kernels) carried
through 10 steps and the clip coefficient.
"""

from __future__ import annotations

import pytest
import torch

import triton_kernels
from tests.optim._factories import CONFIGS
from tests.optim._setup import make_params, run

pytestmark = pytest.mark.skipif(not triton_kernels.supports(torch.device("cpu")), reason="needs the Triton interpreter")


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_triton_backend_equals_torch_backend(name):
    p_tri, p_ref = make_params(), make_params()
    tri = CONFIGS[name](p_tri, backend="triton", max_grad_norm=2.0)
    ref = CONFIGS[name](p_ref, backend="torch", max_grad_norm=2.0)
    run(tri, p_tri, 0, 10, scale=3.0)
    run(ref, p_ref, 0, 10, scale=3.0)
    assert tri.last_grad_norm == pytest.approx(ref.last_grad_norm, rel=1e-6)
    for a, b in zip(p_tri, p_ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    for a, b in zip(p_tri, p_ref):
        for key, value in tri.state.get(a, {}).items():
            torch.testing.assert_close(value, ref.state[b][key], rtol=1e-5, atol=1e-6, msg=key)
