"""Counting the host work of an optimizer step, for the sync-free test and the host-overhead benchmark.

On a GPU a step is sync-free when the host never waits for the device: no read of a tensor's value
(``.item()``, ``int()``, ``float()``, ``bool()``, ``.tolist()``, ``.cpu()``, ``.to("cpu")``) and no
table built from a Python list (``torch.tensor(list)`` is a blocking host-to-device copy on CUDA).
These context managers count exactly those calls, and replace every Triton launch by a counted
no-op so that the Python and ATen work around the kernels can be timed on a CPU.
"""

from __future__ import annotations

import contextlib
from collections import Counter
from collections.abc import Iterator

import torch

# torch.Tensor methods whose call reads a value back to the host.
HOST_READS = ("item", "__int__", "__float__", "__bool__", "tolist", "cpu")


@contextlib.contextmanager
def counting_host_reads(counts: Counter) -> Iterator[Counter]:
    """Count the host reads and ``torch.tensor`` calls made inside the block, by name, into ``counts``."""
    originals = {}

    def wrap(owner, name, key, predicate=None):
        original = getattr(owner, name)
        originals[(owner, name)] = original

        def counted(*args, **kwargs):
            if predicate is None or predicate(*args, **kwargs):
                counts[key] += 1
            return original(*args, **kwargs)

        setattr(owner, name, counted)

    def to_cpu(self, *args, **kwargs):
        target = kwargs.get("device", args[0] if args else None)
        return isinstance(target, (str, torch.device)) and torch.device(target).type == "cpu"

    for name in HOST_READS:
        wrap(torch.Tensor, name, name)
    wrap(torch.Tensor, "to", 'to("cpu")', to_cpu)
    wrap(torch, "tensor", "torch.tensor")
    try:
        yield counts
    finally:
        for (owner, name), original in originals.items():
            setattr(owner, name, original)


@contextlib.contextmanager
def stubbed_launches(launches: Counter) -> Iterator[Counter]:
    """Replace every Triton launch (``triton_kernels._launch.run``, the one launch path) by a no-op
    that counts it by kernel name."""
    from triton_kernels import _launch

    real_run = _launch.run

    def run(kernel, grid, device, *args, compile_only=False, **kwargs):
        launches[getattr(kernel, "__name__", str(kernel))] += 1

    _launch.run = run
    try:
        yield launches
    finally:
        _launch.run = real_run
