"""L-BFGS: collectives and bytes per iteration against the textbook two-loop on sharded vectors,
time per iteration against torch.optim.LBFGS in one process, and host reads of tensor values per
iteration (each one a device-to-host copy and wait on a GPU), for history sizes 5, 20, 100.

    python benchmarks/lbfgs.py [--dim 200000] [--out benchmarks/results]

The textbook baseline (written here) runs the two-loop recursion on each rank's shard and
all-reduces every dot product as it is needed: 2m dependent dots for the recursion plus y.s, y.y,
g.d, the loss and the max-norms. Ours batches everything an evaluation needs into one all-reduce.

Host reads are counted as benchmarks/host_overhead.py counts them (item, int, float, bool, tolist,
cpu, to("cpu")) over one step of m + 10 iterations with a fixed step, so the history fills and wraps.
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

HISTORIES = (5, 20, 100)


def problem(dim: int, seed: int = 0):
    """Logistic regression with a ridge whose weights spread over four decades: the spread keeps
    y.s well above torch's 1e-10 curvature threshold for hundreds of iterations, so the history
    really fills (with a uniform 1e-3 ridge, fp32 progress stalls after ~5 pairs and a "history
    100" run would only ever hold 5)."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(512, dim, generator=gen) / dim**0.5
    y = (x @ torch.randn(dim, generator=gen) > 0).float()
    ridge = torch.logspace(-4, 0, dim)
    pull = 1e-2 * torch.randn(dim, generator=gen)
    return x, y, ridge, pull


def loss_fn(w, x, y, ridge, pull):
    return torch.nn.functional.binary_cross_entropy_with_logits(x @ w, y) + 0.5 * (ridge * w * w).sum() - pull @ w


class Counter:
    def __init__(self):
        self.calls = self.bytes = 0
        self._real = dist.all_reduce

    def __enter__(self):
        def counting(t, *a, **k):
            self.calls += 1
            self.bytes += t.numel() * t.element_size()
            return self._real(t, *a, **k)

        dist.all_reduce = counting
        return self

    def __exit__(self, *exc):
        dist.all_reduce = self._real


def naive_iteration(g, S, Y, d_prev_t, g_prev):
    """One textbook iteration on this rank's shard, every dot product all-reduced as needed."""

    def dot(a, b):
        t = (a @ b).reshape(1).double()
        dist.all_reduce(t)
        return float(t)

    loss = torch.zeros(1, dtype=torch.float64)
    dist.all_reduce(loss)  # the mean loss
    gmax = g.abs().max().reshape(1)
    dist.all_reduce(gmax, op=dist.ReduceOp.MAX)
    y, s = g - g_prev, d_prev_t
    ys, yy = dot(y, s), dot(y, y)
    S, Y = S[1:] + [s], Y[1:] + [y]
    q, al = -g, []
    for si, yi in zip(reversed(S), reversed(Y)):
        a = dot(si, q) / dot(si, yi)
        al.append(a)
        q = q - a * yi
    r = q * (ys / yy)
    for si, yi, a in zip(S, Y, reversed(al)):
        b = dot(yi, r) / dot(si, yi)
        r = r + (a - b) * si
    dot(g, r)  # g.d for the descent test
    return r


def collectives_worker(rank: int, world: int, init: str, dim: int, out_file: str) -> None:
    import dist_optim
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=world)
    data = problem(dim)
    mesh = init_device_mesh("cpu", (world,))
    rows = []
    for m in HISTORIES:
        w = torch.nn.Parameter(distribute_tensor(torch.zeros(dim), mesh, [Shard(0)]))
        opt = dist_optim.LBFGS([w], lr=1, max_iter=m + 5, history_size=m, tolerance_grad=0, tolerance_change=0)

        def closure():
            opt.zero_grad()
            loss = loss_fn(w.full_tensor(), *data)
            loss.backward()
            return loss

        with Counter() as ours:
            opt.step(closure)
        evals = opt.state[w]["func_evals"]
        iters = opt.state[w]["n_iter"]
        local = w.to_local().numel()
        gen = torch.Generator().manual_seed(1)
        S = [torch.randn(local, generator=gen) for _ in range(m)]
        Y = [torch.randn(local, generator=gen) for _ in range(m)]
        with Counter() as naive:
            naive_iteration(torch.randn(local, generator=gen), S, Y, torch.randn(local, generator=gen), torch.randn(local, generator=gen))
        # Ours: the all-reduces that L-BFGS itself issued (the closure's full_tensor all-gathers are not all-reduces).
        rows.append(dict(history=m, ours_calls_per_iter=ours.calls / iters, ours_calls_per_eval=ours.calls / evals,
                         ours_bytes_per_iter=ours.bytes / iters, naive_calls_per_iter=naive.calls,
                         naive_bytes_per_iter=naive.bytes))
    if rank == 0:
        Path(out_file).write_text(json.dumps(rows))
    dist.destroy_process_group()


def time_one_process(dim: int, repeats: int = 3) -> list[dict]:
    import dist_optim

    data = problem(dim)
    rows = []
    for m in HISTORIES:
        result = {"history": m}
        for label, cls in (("dist_optim", dist_optim.LBFGS), ("torch", torch.optim.LBFGS)):
            per_iter = []
            for _ in range(repeats):
                w = torch.zeros(dim, requires_grad=True)
                opt = cls([w], lr=1, max_iter=m + 10, history_size=m, tolerance_grad=0, tolerance_change=0)

                def closure():
                    opt.zero_grad()
                    loss = loss_fn(w, *data)
                    loss.backward()
                    return loss

                start = time.perf_counter()
                opt.step(closure)
                per_iter.append((time.perf_counter() - start) / opt.state[w]["n_iter"])
            result[f"{label}_ms_per_iter"] = 1e3 * statistics.median(per_iter)
        rows.append(result)
    return rows


def host_reads(dim: int) -> list[dict]:
    """Reads of tensor values on the host per iteration and per closure evaluation, one process."""
    from collections import Counter

    import dist_optim
    from host_overhead import counting_host_reads

    data = problem(dim)
    rows = []
    for m in HISTORIES:
        w = torch.zeros(dim, requires_grad=True)
        opt = dist_optim.LBFGS([w], lr=1, max_iter=m + 10, history_size=m, tolerance_grad=0, tolerance_change=0)

        def closure():
            opt.zero_grad()
            loss = loss_fn(w, *data)
            loss.backward()
            return loss

        counts: Counter = Counter()
        with counting_host_reads(counts):
            opt.step(closure)
        reads = sum(v for k, v in counts.items() if k != "torch.tensor")
        rows.append(dict(history=m, rows_filled=len(opt.state[w]["rows"]), iterations=opt.state[w]["n_iter"],
                         evaluations=opt.state[w]["func_evals"],
                         reads_per_iter=reads / opt.state[w]["n_iter"], reads_per_eval=reads / opt.state[w]["func_evals"],
                         reads={k: v for k, v in sorted(counts.items())}))
    return rows


def markdown(res: dict) -> str:
    lines = [
        f"# L-BFGS: collectives per iteration (world 2, gloo) and time per iteration (one process, {res['device']})",
        "",
        f"Logistic regression with a ridge spread over four decades, {res['dim']:,} params, fixed step, m + 10 "
        "iterations: the history is full after m (rows filled: the host-reads table). "
        "Ours: all-reduce calls L-BFGS issued over a step divided by its iterations (one per closure "
        "evaluation). Textbook: one iteration of the two-loop with each dot product all-reduced.",
        "",
        "| history | ours: all-reduces / iter | ours: bytes / iter | textbook: all-reduces / iter | textbook: bytes / iter | ours ms/iter | torch.optim.LBFGS ms/iter |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for c, t in zip(res["collectives"], res["timing"]):
        lines.append(f"| {c['history']} | {c['ours_calls_per_iter']:.2f} | {c['ours_bytes_per_iter']:.0f} | "
                     f"{c['naive_calls_per_iter']} | {c['naive_bytes_per_iter']} | {t['dist_optim_ms_per_iter']:.2f} | "
                     f"{t['torch_ms_per_iter']:.2f} |")
    lines += [
        "",
        "Host reads of tensor values during one step of m + 10 iterations (fixed step, one process): "
        "each is a device-to-host copy and wait on a GPU.",
        "",
        "| history | rows filled | iterations | closure evaluations | host reads / iter | host reads / evaluation | reads by kind |",
        "|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in res["host_reads"]:
        kinds = ", ".join(f"{k} {v}" for k, v in r["reads"].items()) or "none"
        lines.append(f"| {r['history']} | {r['rows_filled']} | {r['iterations']} | {r['evaluations']} | {r['reads_per_iter']:.2f} | "
                     f"{r['reads_per_eval']:.2f} | {kinds} |")
    lines += ["", f"CPU timings are indicative only; we quote GPU figures. {res['cores']} cores, 1-minute load average "
              f"{res['load_average'][0]:.1f} before the timings and {res['load_average'][1]:.1f} after."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dim", type=int, default=200_000)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        out_file = os.path.join(tmp, "rows.json")
        mp.start_processes(collectives_worker, args=(2, os.path.join(tmp, "init"), args.dim, out_file), nprocs=2,
                           start_method="spawn")
        collectives = json.loads(Path(out_file).read_text())
    load_before = os.getloadavg()[0]
    timing = time_one_process(args.dim)
    # Other work on the machine moves the timings; the 1-minute load average around them says how much.
    res = dict(dim=args.dim, device="CPU", cores=os.cpu_count(), load_average=[load_before, os.getloadavg()[0]],
               collectives=collectives, timing=timing, host_reads=host_reads(args.dim))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "lbfgs_cpu.json").write_text(json.dumps(res, indent=1))
    (out / "lbfgs_cpu.md").write_text(markdown(res))
    print(markdown(res))


if __name__ == "__main__":
    main()
