"""Persistent gloo worker processes for distributed tests.

A test module starts its world once (a module-scoped fixture), then runs module-level functions on
every rank and gets each rank's result back, or the rank's traceback as an AssertionError. A call
that does not finish in time (a hung collective) kills the world and fails the test instead of
hanging CI. Workers use one thread each and the Triton interpreter when there is no GPU.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import tempfile
import traceback
from typing import Any, Callable

import pytest

CALL_TIMEOUT_S = 180


def _serve(rank: int, world: int, init_file: str, conn) -> None:
    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    # What a launcher would set (DeepSpeed checks for LOCAL_RANK).
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        while True:
            msg = conn.recv()
            if msg is None:
                break
            fn, args, kwargs = msg
            try:
                conn.send(("ok", fn(*args, **kwargs)))
            except BaseException:  # noqa: BLE001 (reported to the test, which fails)
                conn.send(("error", traceback.format_exc()))
    finally:
        dist.destroy_process_group()


class World:
    """``world_size`` gloo ranks, alive until ``close()``."""

    def __init__(self, world_size: int) -> None:
        self.world_size = world_size
        self._tmp = tempfile.TemporaryDirectory()
        ctx = mp.get_context("spawn")
        self._conns, self._procs = [], []
        for rank in range(world_size):
            parent, child = ctx.Pipe()
            proc = ctx.Process(target=_serve, args=(rank, world_size, os.path.join(self._tmp.name, "init"), child), daemon=True)
            proc.start()
            self._conns.append(parent)
            self._procs.append(proc)
        self.broken: str | None = None

    def run(self, fn: Callable, *args: Any, **kwargs: Any) -> list[Any]:
        """``fn(*args, **kwargs)`` on every rank; the per-rank results, rank order."""
        if self.broken:
            pytest.fail(f"the world of {self.world_size} is down after an earlier failure: {self.broken}")
        for conn in self._conns:
            conn.send((fn, args, kwargs))
        results, errors = [], []
        for rank, conn in enumerate(self._conns):
            if not conn.poll(CALL_TIMEOUT_S):
                self.broken = f"rank {rank} did not answer {fn.__name__} within {CALL_TIMEOUT_S} s"
                self.close()
                pytest.fail(self.broken)
            status, value = conn.recv()
            (results if status == "ok" else errors).append(value if status == "ok" else f"rank {rank}:\n{value}")
        if errors:
            raise AssertionError("\n".join(errors))
        return results

    def close(self) -> None:
        for conn in self._conns:
            try:
                conn.send(None)
            except (BrokenPipeError, OSError):
                pass
        for proc in self._procs:
            proc.join(timeout=10)
            if proc.is_alive():
                proc.kill()
        self._tmp.cleanup()


def world_fixture(world_size: int):
    """A module-scoped pytest fixture yielding a World of ``world_size`` ranks."""

    @pytest.fixture(scope="module")
    def _world():
        world = World(world_size)
        yield world
        if not world.broken:
            world.close()

    return _world
