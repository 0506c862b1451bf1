"""Whether the kernels can run: triton importable, and a CUDA device or the Triton interpreter
(TRITON_INTERPRET=1, read by triton at import) for CPU tensors."""

from __future__ import annotations

import os

import torch

try:
    import triton  # noqa: F401

    HAVE_TRITON = True
except ImportError:  # not on this platform (macOS, Windows)
    HAVE_TRITON = False


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def supports(device: torch.device) -> bool:
    if not HAVE_TRITON:
        return False
    return device.type == "cuda" or (device.type == "cpu" and interpreting())
