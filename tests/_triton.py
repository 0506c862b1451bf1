"""The devices the Triton kernel tests run on: the interpreter on CPU always, a GPU with the cuda mark.
Test modules import ``device`` (a fixture) from here."""

from __future__ import annotations

import pytest
import torch

import triton_kernels

DEVICES = [pytest.param("cpu", id="interpreter"), pytest.param("cuda", marks=pytest.mark.cuda, id="cuda")]


@pytest.fixture(params=DEVICES)
def device(request):
    dev = torch.device(request.param)
    if not triton_kernels.supports(dev):
        pytest.skip(f"Triton cannot run on {dev} in this process")
    return dev
