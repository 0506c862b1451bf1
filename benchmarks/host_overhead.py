"""Host work of one optimizer step on the Triton path, with the kernel launches stubbed out.

    python benchmarks/host_overhead.py [--steps 30] [--out benchmarks/results]

This runs on a CPU: the Triton launchers build their tables on CPU tensors (TRITON_INTERPRET=1 for
the device check), and every launch is replaced by a no-op. What is left is the Python and ATen
work a GPU step would queue: table building, per-param loops, step counters, bias corrections,
grad-statistics handling. The layout is a 1.01B-param GPT's 220 tensors. Element counts are scaled
down (``--scale``), because the host work depends on how many tensors there are, not on their size,
once the launch tables are cached.

Its time per step is the CPU time of the fastest batch of 10 steps (medians beside it). It counts the host reads of tensor values (``.item()``,
``int()``, ``float()``, ``bool()``, ``.tolist()``, ``.cpu()``, ``.to("cpu")``) and the
``torch.tensor(...)`` calls (a table built from a Python list is a blocking host-to-device copy on
CUDA), with ``dist_optim.host_work`` (the same counters tests/kernels/test_sync_free.py asserts on).
``compile_kernels()`` builds the state first and one step is taken, so every measured step is a
steady-state (device flow) step. The figures are a lower bound for a GPU host, where each launch also costs the driver's
few microseconds.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from collections import Counter
from pathlib import Path

os.environ.setdefault("TRITON_INTERPRET", "1")  # the launchers' device check, before triton_kernels loads

import torch  # noqa: E402

import dist_optim  # noqa: E402
import triton_kernels  # noqa: E402
from dist_optim.host_work import counting_host_reads, stubbed_launches  # noqa: E402

LAYERS, D_MODEL, VOCAB = 24, 1792, 50304  # 220 tensors, 1.01B params


def gpt_layout() -> list[tuple[int, ...]]:
    """A GPT block's 9 tensors (two norms with bias, fused qkv and output projection, MLP in with
    bias and out) x LAYERS, plus the token and position embeddings and the final norm."""
    d, shapes = D_MODEL, [(VOCAB, D_MODEL), (2048, D_MODEL)]
    for _ in range(LAYERS):
        shapes += [(d,), (d,), (3 * d, d), (d, d), (d,), (d,), (4 * d, d), (4 * d,), (d, 4 * d)]
    shapes += [(d,), (d,)]
    return shapes


def scaled(shape: tuple[int, ...], scale: int) -> tuple[int, ...]:
    return (max(1, shape[0] // scale), *shape[1:]) if len(shape) > 1 else (max(1, shape[0] // scale),)


BATCH = 10


def measure(name: str, steps: int, scale: int, batch_count: int = 40, **opt_kw) -> dict:
    torch.manual_seed(0)
    params = [torch.zeros(scaled(s, scale), dtype=torch.bfloat16, requires_grad=True) for s in gpt_layout()]
    for p in params:
        p.grad = torch.randn_like(p)
    opt = getattr(dist_optim, name)(params, backend="triton", **opt_kw)
    opt.compile_kernels()  # builds the state and compiles: the steps after the first are steady-state ones
    launches: Counter = Counter()
    with stubbed_launches(launches):
        # The first step takes the host flow and reads the grad statistics: stubbed as zeros, so
        # that it is applied rather than skipped on the uninitialised output of a stubbed kernel.
        real_sumsq = triton_kernels.sumsq_nonfinite
        triton_kernels.sumsq_nonfinite = lambda grads: torch.zeros(2, dtype=torch.float32)
        try:
            opt.step()
        finally:
            triton_kernels.sumsq_nonfinite = real_sumsq
        for _ in range(3):  # tables cached
            opt.step()
        launches.clear()
        times, counts = [], Counter()
        for _ in range(steps):
            with counting_host_reads(counts):
                start = time.perf_counter()
                opt.step()
                times.append(time.perf_counter() - start)
        launched = {k: v / steps for k, v in sorted(launches.items())}
        # CPU time of batches of BATCH steps, uncounted: the fastest batch is the host work when no
        # other tenant of a shared machine slowed it (its wall-clock median can double within the
        # hour there, for the same code)
        batches = []
        for _ in range(batch_count):
            start = time.process_time()
            for _ in range(BATCH):
                opt.step()
            batches.append((time.process_time() - start) / BATCH)
    per_step = {k: v / steps for k, v in sorted(counts.items())}
    return {
        "optimizer": name, "options": {k: str(v) for k, v in opt_kw.items()}, "tensors": len(params),
        "host_ms_per_step": min(batches) * 1e3,
        "host_ms_per_step_median_batch": statistics.median(batches) * 1e3,
        "wall_ms_per_step_median": statistics.median(times) * 1e3,
        "host_reads_per_step": per_step, "launches_per_step": launched,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batches", type=int, default=40, help=f"timed batches of {BATCH} steps")
    parser.add_argument("--scale", type=int, default=1024, help="divide each tensor's first dim by this")
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args()
    torch.set_num_threads(1)
    cases = [
        ("AdamW", dict(nonfinite="apply")),
        ("AdamW", dict()),
        ("AdamW", dict(max_grad_norm=1.0)),
        ("SGD", dict(lr=0.1, momentum=0.9, nonfinite="apply")),
        ("Ranger", dict(max_grad_norm=1.0)),
    ]
    rows = [measure(name, args.steps, args.scale, args.batches, **kw) for name, kw in cases]
    n_params = sum(torch.Size(s).numel() for s in gpt_layout())
    header = (f"# Host work per optimizer step, Triton path, launches stubbed\n\n"
              f"{platform.processor() or platform.machine()}, torch {torch.__version__}, 1 thread; a GPT layout of "
              f"{len(gpt_layout())} tensors ({n_params / 1e9:.2f}B params at full size; element counts / "
              f"{args.scale} here), bf16 params, after 3 warm-up steps. `host ms/step`: CPU time per step of the "
              f"fastest of {args.batches} batches of {BATCH} steps (the host work undisturbed; on a shared machine "
              f"the other figures move with the neighbours' load); `median batch`: their median; `wall median`: "
              f"the median wall time of {args.steps} single steps. Load average {os.getloadavg()[0]:.1f} at the end. "
              "`host reads`: reads of a tensor's value on the host (item, int, float, bool, tolist, cpu, to(\"cpu\")); "
              "each would be a device-to-host copy and wait on a GPU; "
              "`torch.tensor`: tables or scalars built from Python values. Goal (issue 10): <= 0.5 ms and no "
              "host reads for AdamW.\n\n"
              "| optimizer | options | host ms/step | median batch | wall median | host reads/step | torch.tensor/step "
              "| launches/step |\n"
              "|---|---|---:|---:|---:|---:|---:|---:|\n")
    lines = []
    for r in rows:
        reads = {k: v for k, v in r["host_reads_per_step"].items() if k != "torch.tensor"}
        lines.append(f"| {r['optimizer']} | {', '.join(f'{k}={v}' for k, v in r['options'].items()) or 'defaults'} | "
                     f"{r['host_ms_per_step']:.2f} | {r['host_ms_per_step_median_batch']:.2f} | "
                     f"{r['wall_ms_per_step_median']:.2f} | {sum(reads.values()):.0f} "
                     f"({', '.join(f'{k} {v:.0f}' for k, v in reads.items()) or 'none'}) | "
                     f"{r['host_reads_per_step'].get('torch.tensor', 0):.0f} | {sum(r['launches_per_step'].values()):.0f} |")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "host_overhead_cpu.md").write_text(header + "\n".join(lines) + "\n")
    (out / "host_overhead_cpu.json").write_text(json.dumps(rows, indent=1) + "\n")
    print(header + "\n".join(lines))


if __name__ == "__main__":
    main()
