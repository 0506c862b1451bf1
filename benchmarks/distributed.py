"""Collectives and step time of an optimizer step under each strategy, at world 2.

    python benchmarks/distributed.py [--params 4e6] [--repeats 10] [--out benchmarks/results]

For DDP, FSDP1 and FSDP2 it counts the collective calls and bytes issued inside the step (after
backward) and times the step, for: dist_optim.AdamW with fused global clipping (max_grad_norm, one
scalar all-reduce, no pass writing the gradients) against torch.nn.utils.clip_grad_norm_ followed
by torch.optim.AdamW (foreach) (FSDP1: its own ``clip_grad_norm_``). Ranks are gloo processes on CPU here (CUDA/NCCL when available).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.distributed.tensor.debug import CommDebugMode

class CollectiveCounter:
    """Collective calls (torch's CommDebugMode, which also sees those DTensor ops issue) and the
    bytes they carry (from the tensors handed to the eager and functional all-reduce entry points)."""

    def __init__(self) -> None:
        self.calls, self.bytes = 0, 0

    def __enter__(self):
        import torch.distributed._functional_collectives as funcol

        self._mode = CommDebugMode()
        self._mode.__enter__()
        self._patched = []
        for module, name in ((dist, "all_reduce"), (funcol, "all_reduce")):
            real = getattr(module, name)

            def counting(tensor, *args, _real=real, **kwargs):
                self.bytes += tensor.numel() * tensor.element_size()
                return _real(tensor, *args, **kwargs)

            setattr(module, name, counting)
            self._patched.append((module, name, real))
        return self

    def __exit__(self, *exc):
        for module, name, real in self._patched:
            setattr(module, name, real)
        self._mode.__exit__(*exc)
        self.calls = self._mode.get_total_counts()
        return False


def build(strategy: str, numel: int, device: torch.device):
    torch.manual_seed(0)
    width = int((numel / 4) ** 0.5)
    net = torch.nn.Sequential(*[torch.nn.Linear(width, width) for _ in range(4)]).to(device)
    if strategy == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        net = DistributedDataParallel(net)
    elif strategy == "fsdp1":
        from torch.distributed.fsdp import FullyShardedDataParallel

        net = FullyShardedDataParallel(net, use_orig_params=True, device_id=device)
    else:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh(device.type, (dist.get_world_size(),))
        for layer in net:
            fully_shard(layer, mesh=mesh)
        fully_shard(net, mesh=mesh)
    net(torch.randn(8, width, device=device)).square().mean().backward()
    return net


def measure(step, repeats: int, device: torch.device) -> tuple[float, int, int]:
    step()  # warm-up, lazily built state
    counter = CollectiveCounter()
    with counter:
        step()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        dist.barrier()
        start = time.perf_counter()
        step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times), counter.calls, counter.bytes


def worker(rank: int, world: int, init: str, numel: int, repeats: int, result_file: str) -> None:
    import dist_optim

    cuda = torch.cuda.is_available()
    device = torch.device("cuda", rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world))  # DeepSpeed checks them
    if not cuda:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    dist.init_process_group("nccl" if cuda else "gloo", init_method=f"file://{init}", rank=rank, world_size=world)
    rows = []
    for strategy in ("ddp", "fsdp1", "fsdp2"):
        net = build(strategy, numel, device)
        ours = dist_optim.AdamW(net.parameters(), lr=1e-4, max_grad_norm=1.0)
        theirs = torch.optim.AdamW(net.parameters(), lr=1e-4, foreach=True)

        def fused():
            ours.step()

        def separate():
            if strategy == "fsdp1":  # FSDP1's own method: torch.nn.utils' would clip by the local norm
                net.clip_grad_norm_(1.0)
            else:
                torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0, foreach=True)
            theirs.step()

        for label, step in (("dist_optim.AdamW(max_grad_norm) fused", fused), ("clip_grad_norm_ + torch.optim.AdamW", separate)):
            secs, calls, nbytes = measure(step, repeats, device)
            rows.append(dict(strategy=strategy, impl=label, ms=1e3 * secs, collectives=calls, bytes=nbytes))
    rows += zero_rows(numel, repeats, device)
    if rank == 0:
        Path(result_file).write_text(json.dumps(rows))
    dist.destroy_process_group()


def zero_rows(numel: int, repeats: int, device: torch.device) -> list[dict]:
    """ZeRO-1/2/3: engine.step() (norm, clipping, update, parameter all-gather) after an untimed
    backward, with our AdamW(max_grad_norm) against torch.optim.AdamW under DeepSpeed's clipping."""
    try:
        import deepspeed  # noqa: F401
    except ImportError:
        return []
    import dist_optim
    import dist_optim.deepspeed as dod

    width = int((numel / 4) ** 0.5)
    rows = []
    for stage in (1, 2, 3):
        for label, ours in (("dist_optim.AdamW(max_grad_norm) fused", True), ("DeepSpeed clipping + torch.optim.AdamW", False)):
            torch.manual_seed(0)
            net = torch.nn.Sequential(*[torch.nn.Linear(width, width) for _ in range(4)])
            config = {"train_micro_batch_size_per_gpu": 8, "zero_optimization": {"stage": stage}, "steps_per_print": 10**9}
            if ours:
                opt = dist_optim.AdamW(net.parameters(), lr=1e-4, max_grad_norm=1.0)
            else:
                opt = torch.optim.AdamW(net.parameters(), lr=1e-4, foreach=True)
                config.update(gradient_clipping=1.0, zero_allow_untested_optimizer=True)
            engine, *_ = dod.initialize(model=net, optimizer=opt, config=config)
            x = torch.randn(8, width, device=device)

            def backward():
                engine.backward(engine(x).square().mean())

            times, counter = [], None
            for i in range(repeats + 2):
                backward()
                dist.barrier()
                if i == 1:
                    counter = CollectiveCounter()
                    with counter:
                        engine.step()
                    continue
                start = time.perf_counter()
                engine.step()
                if i > 1:
                    times.append(time.perf_counter() - start)
            rows.append(dict(strategy=f"zero{stage}", impl=label, ms=1e3 * statistics.median(times),
                             collectives=counter.calls, bytes=counter.bytes))
            del engine
    return rows


def markdown(result: dict) -> str:
    lines = [
        f"# Optimizer step under each strategy, world {result['world']}, {result['device']}",
        "",
        f"{result['params']:,} fp32 params (4 Linear layers); the step after backward: clipping + update. "
        "Collectives and bytes are those issued inside the step on rank 0 (bytes: all-reduce payloads only). "
        "ZeRO rows time engine.step(), which also all-gathers the updated partitions.",
        "",
        "| strategy | implementation | ms/step | collectives | bytes |",
        "|---|---|---:|---:|---:|",
    ]
    for r in result["rows"]:
        lines.append(f"| {r['strategy']} | {r['impl']} | {r['ms']:.2f} | {r['collectives']} | {r['bytes']} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", type=float, default=4e6)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = parser.parse_args(argv)
    world = 2
    with tempfile.TemporaryDirectory() as tmp:
        result_file = os.path.join(tmp, "rows.json")
        mp.start_processes(
            worker, args=(world, os.path.join(tmp, "init"), int(args.params), args.repeats, result_file),
            nprocs=world, start_method="spawn",
        )
        rows = json.loads(Path(result_file).read_text())
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "CPU (gloo)"
    result = dict(world=world, device=device, params=int(args.params), rows=rows)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = "distributed_" + ("cuda" if torch.cuda.is_available() else "cpu")
    (out / f"{stem}.json").write_text(json.dumps(result, indent=1))
    (out / f"{stem}.md").write_text(markdown(result))
    print(markdown(result))


if __name__ == "__main__":
    main()
