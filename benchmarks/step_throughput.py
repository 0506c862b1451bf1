"""Optimizer step throughput: dist-optim (torch path; Triton on CUDA; the fused CPU kernels on CPU)
against torch.optim (foreach, and fused where it exists) and a device-to-device copy, all measured in
the same run.

    python benchmarks/step_throughput.py [--sizes 1e6,4e6,16e6] [--repeats 7] [--out benchmarks/results]

Each size is the total number of fp32 params, split over a few tensors of uneven sizes as in a real
model. Reported: median step time, GB/s (bytes one step must move / time), and ratios to torch.optim
foreach measured in the same run.

On CUDA (default 64M, 256M and 1B params) every optimizer runs on the Triton kernels without a
check pass, with the default non-finite skip, with clipping, and with clipping captured in a CUDA
graph (``capturable=True``) and replayed, beside torch.optim foreach and fused; the table gives each
one's bytes per param, its share of the device-to-device copy's bandwidth, and AdamW's ratio to
torch's fused AdamW. Implementations run one after another on fresh params (1B fp32 AdamW params
with their state take 16 GB each).

On CPU (``--device cpu``, default 32M params) the table is the CPU-step comparison of issue 11:
contenders torch.optim foreach and fused, a ``torch.compile``d per-tensor AdamW (step-dependent
scalars as 0-dim tensors, compiled once per tensor layout), DeepSpeedCPUAdam where its JIT build
works, dist_optim on the torch path and on the fused CPU kernels (without the check pass, with the
default non-finite skip, with clipping), the in-place ``mul_`` bandwidth floor over as many bytes
as each optimizer moves and that floor plus a separate read of the grads' bytes (the floor of any
exact check or clip), all timed in turn within each repeat; plus AdamW with bf16 params (fp32
state). Ratios: to torch fused AdamW (``x fused``), to DeepSpeedCPUAdam (``x DS``) and to the floor.
With int8 state (``--state-dtypes``, default ``fp32,int8``; issue 12), AdamW with fp32 and with bf16
params: the fused CPU kernels with int8 state (with and without the skip check) against the same
kernels with fp32 state, the torch path with int8 state and torch's fused AdamW (fp32), timed in
turn; ``--state-dtypes int8`` runs only these and writes ``step_throughput_cpu_int8.{md,json}``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

import dist_optim
from dist_optim.baselines import BASELINES, BENCH_KWARGS

SPLIT = (0.5, 0.25, 0.125, 0.0625, 0.0625)  # a few large tensors and some smaller ones


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"{line.split(':', 1)[1].strip()} ({torch.get_num_threads()} threads)"
    except OSError:
        pass
    return platform.processor() or "cpu"


def make_params(numel: int, device: torch.device) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    sizes = [max(1, int(numel * f)) for f in SPLIT]
    params = [torch.randn(n, generator=gen).to(device).requires_grad_() for n in sizes]
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen).to(device) * 1e-3
    return params


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_interleaved(steps: dict, device: torch.device, repeats: int, warmup: int = 3) -> dict[str, float]:
    """Median step time per implementation, the implementations taking turns within each repeat so
    that drift in the machine's speed (shared cores, frequency) hits them alike."""
    for step in steps.values():
        for _ in range(warmup):
            step()
    sync(device)
    times: dict[str, list[float]] = {label: [] for label in steps}
    for _ in range(repeats):
        for label, step in steps.items():
            start = time.perf_counter()
            step()
            sync(device)
            times[label].append(time.perf_counter() - start)
    return {label: statistics.median(t) for label, t in times.items()}


def graphed(opt) -> Callable[[], None]:
    """``opt.step`` captured in a CUDA graph (after one eager warm-up step off the capture stream,
    as torch.cuda.graphs asks); the returned callable replays it."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        opt.step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        opt.step()
    return graph.replay


def variants(name: str, device: torch.device):
    """(label, factory(params) -> step callable, grads read again by a check pass) for every
    implementation worth timing."""
    kw = BENCH_KWARGS[name]
    ours = getattr(dist_optim, name)
    baseline = BASELINES[name][0]
    out = [("dist_optim[torch]", lambda ps: ours(ps, **kw, backend="torch", nonfinite="apply").step, False)]
    if device.type == "cuda":
        out += [
            ("dist_optim[triton]", lambda ps: ours(ps, **kw, backend="triton", nonfinite="apply").step, False),
            ("dist_optim[triton]+skip-check", lambda ps: ours(ps, **kw, backend="triton").step, True),
            ("dist_optim[triton]+clip", lambda ps: ours(ps, **kw, backend="triton", max_grad_norm=1.0).step, True),
            ("dist_optim[triton]+clip, graph",
             lambda ps: graphed(ours(ps, **kw, backend="triton", max_grad_norm=1.0, capturable=True)), True),
        ]
    if baseline is not None:
        torch_kw = {k: v for k, v in kw.items()}
        out.append(("torch.optim foreach", lambda ps: baseline(ps, **torch_kw, foreach=True).step, False))
        if "fused" in baseline.__init__.__code__.co_varnames and (device.type == "cuda" or name in ("Adam", "AdamW", "SGD", "Adagrad")):
            out.append(("torch.optim fused", lambda ps: baseline(ps, **torch_kw, fused=True).step, False))
    return out


def time_one(factory, numel: int, device: torch.device, repeats: int) -> float:
    """Median step time of one implementation on fresh params, freed afterwards: at 1B params
    each contender holds 16 GB, too many to keep side by side as the interleaved timing does."""
    step = factory(make_params(numel, device))
    secs = time_interleaved({"one": step}, device, repeats)["one"]
    del step
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return secs


def run(sizes: list[int], repeats: int, device: torch.device, names: list[str]) -> dict:
    """Per size: the device copy, then each optimizer's implementations one after another (on a
    GPU a copy's and a step's time drift little between them; memory forbids side by side)."""
    rows = []
    for numel in sizes:
        src = torch.empty(numel, device=device)
        dst = torch.empty_like(src)
        copy_s = time_interleaved({"copy": lambda: dst.copy_(src)}, device, repeats)["copy"]
        copy_gbs = 2 * 4 * numel / copy_s / 1e9
        del src, dst
        rows.append(dict(optimizer="copy", impl="device-to-device copy", numel=numel, ms=1e3 * copy_s, gbs=copy_gbs,
                         bytes_per_param=8))
        fused_adamw = None
        for name in names:
            _, reads, writes = BASELINES[name]
            results = {}
            for label, factory, check_pass in variants(name, device):
                try:
                    results[label] = (time_one(factory, numel, device, repeats), check_pass)
                except (RuntimeError, TypeError, ValueError) as err:  # e.g. a fused impl missing on this device
                    print(f"  skip {name} {label}: {err}")
            ref = results.get("torch.optim foreach", (None,))[0]
            for label, (secs, check_pass) in results.items():
                moved = (reads + writes) * 4 + (4 if check_pass else 0)  # the check pass reads the fp32 grads
                gbs = moved * numel / secs / 1e9
                rows.append(
                    dict(
                        optimizer=name, impl=label, numel=numel, ms=1e3 * secs, gbs=gbs, bytes_per_param=moved,
                        vs_foreach=None if ref is None else ref / secs, vs_copy=gbs / copy_gbs,
                    )
                )
                if name == "AdamW" and label == "torch.optim fused":
                    fused_adamw = gbs
                print(f"{name:8s} {numel:>13,d} {label:34s} {1e3 * secs:9.3f} ms {gbs:8.1f} GB/s")
        for row in rows:  # bandwidth against torch's fused AdamW, the usual reference, at this size
            if row["numel"] == numel and row["optimizer"] != "copy" and fused_adamw is not None:
                row["of_fused_adamw"] = row["gbs"] / fused_adamw
    return {
        "device": device_name(device),
        "torch": torch.__version__,
        "repeats": repeats,
        "rows": rows,
    }


# --- the CPU table -------------------------------------------------------------------------------

CPU_FUSED = ("Adam", "AdamW", "SGD", "Adagrad")  # the torch.optim classes with a fused CPU kernel


class CompiledAdamW:
    """A ``torch.compile``d (Inductor C++) per-tensor AdamW, as a user would write it: one compiled
    function per tensor layout, every step-dependent scalar a 0-dim tensor so nothing recompiles as
    the step count or lr changes. The first steps pay the compilation (reported as warm-up)."""

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2):
        self.params = list(params)
        self.state = [(torch.zeros_like(p, dtype=torch.float32), torch.zeros_like(p, dtype=torch.float32)) for p in self.params]
        self.lr, self.betas, self.eps, self.weight_decay, self.t = lr, betas, eps, weight_decay, 0
        self.scalars = {k: torch.tensor(0.0) for k in ("decay", "step_size", "bc2_sqrt")}
        self.fn = torch.compile(CompiledAdamW._update, fullgraph=True, dynamic=False)

    @staticmethod
    def _update(p, g, m, v, decay, step_size, bc2_sqrt, beta1: float, beta2: float, eps: float):
        p32 = p.float() * decay
        g32 = g.float()
        m.lerp_(g32, 1.0 - beta1)
        v.mul_(beta2).addcmul_(g32, g32, value=1.0 - beta2)
        p.copy_(p32 - step_size * m / (v.sqrt() / bc2_sqrt + eps))

    @torch.no_grad()
    def step(self):
        self.t += 1
        beta1, beta2 = self.betas
        self.scalars["decay"].fill_(1.0 - self.lr * self.weight_decay)
        self.scalars["step_size"].fill_(self.lr / (1.0 - beta1**self.t))
        self.scalars["bc2_sqrt"].fill_(math.sqrt(1.0 - beta2**self.t))
        sc = self.scalars
        for p, (m, v) in zip(self.params, self.state):
            self.fn(p, p.grad, m, v, sc["decay"], sc["step_size"], sc["bc2_sqrt"], beta1, beta2, self.eps)


def deepspeed_cpu_adam(params, adamw: bool, **kw):
    from deepspeed.ops.adam import DeepSpeedCPUAdam

    return DeepSpeedCPUAdam(params, adamw_mode=adamw, weight_decay=1e-2 if adamw else 0.0, **kw)


def cpu_variants(name: str, dtype: torch.dtype):
    """(label, factory(params) -> step callable) for the CPU table."""
    kw = BENCH_KWARGS[name]
    ours = getattr(dist_optim, name)
    baseline = BASELINES[name][0]
    out = []
    if baseline is not None and dtype == torch.float32:
        out.append(("torch.optim foreach", lambda ps: baseline(ps, **kw, foreach=True).step))
        if name in CPU_FUSED:
            out.append(("torch.optim fused", lambda ps: baseline(ps, **kw, fused=True).step))
    if name == "AdamW":
        out.append(("torch.compile per-tensor AdamW", lambda ps: CompiledAdamW(ps, **kw).step))
    if name in ("Adam", "AdamW"):
        out.append(("DeepSpeedCPUAdam", lambda ps: deepspeed_cpu_adam(ps, name == "AdamW", **kw).step))
    out.append(("dist_optim[torch]", lambda ps: ours(ps, **kw, backend="torch", nonfinite="apply").step))
    out.append(("dist_optim[cpu]", lambda ps: ours(ps, **kw, backend="cpu", nonfinite="apply").step))
    out.append(("dist_optim[cpu] skip-check", lambda ps: ours(ps, **kw, backend="cpu").step))
    out.append(("dist_optim[cpu] clip", lambda ps: ours(ps, **kw, backend="cpu", max_grad_norm=1.0).step))
    out.append(("check pass alone", check_pass))
    return out


def check_pass(params):
    """What skip-check and clip add: the fused sum of squares and non-finite flag over the grads."""
    from dist_optim.functional import grad_sumsq_and_flag

    grads = [p.grad for p in params]
    return lambda: grad_sumsq_and_flag(grads, backend="cpu")


def int8_variants(name: str, dtype: torch.dtype):
    """(label, factory(params) -> step callable) for an int8-state row group: int8 on the fused CPU
    kernels and on the torch path, beside fp32 state on the same kernels and torch's fused AdamW."""
    kw = BENCH_KWARGS[name]
    ours = getattr(dist_optim, name)
    baseline = BASELINES[name][0]
    out = []
    if name in CPU_FUSED and dtype == torch.float32:
        out.append(("torch.optim fused (fp32 state)", lambda ps: baseline(ps, **kw, fused=True).step))
    out.append(("dist_optim[cpu] fp32 state", lambda ps: ours(ps, **kw, backend="cpu", nonfinite="apply").step))
    out.append(("dist_optim[torch] int8", lambda ps: ours(ps, **kw, backend="torch", nonfinite="apply",
                                                          state_dtype="int8").step))
    out.append(("dist_optim[cpu] int8", lambda ps: ours(ps, **kw, backend="cpu", nonfinite="apply",
                                                        state_dtype="int8").step))
    out.append(("dist_optim[cpu] int8 skip-check", lambda ps: ours(ps, **kw, backend="cpu", state_dtype="int8").step))
    return out


# Contenders of seconds per step at 32M params (the torch path's int8 step: dequantize, foreach math,
# a searchsorted quantization): timed over fewer steps, one warm-up, after the interleaved ones.
SLOW = ("dist_optim[torch] int8",)
SLOW_REPEATS = 3

TWO_READ_FLOOR = "mul_ floor + grad read"
INT8_BYTES = 1 + 4 / 256  # a moment's code and its share of the block's fp32 absmax


def step_bytes(name: str, dtype: torch.dtype, state: str = "fp32") -> int:
    """Bytes one step moves per param: params and grads in their dtype, state in fp32 (or int8 codes
    with their absmax)."""
    _, reads, writes = BASELINES[name]
    width = torch.finfo(dtype).bits // 8
    per_state = 4 if state == "fp32" else INT8_BYTES
    # p read+write, g read, state read+write
    return round(2 * width + width + per_state * (reads - 2 + writes - 1))


def make_cpu_params(numel: int, dtype: torch.dtype, tensors: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    sizes = [numel // tensors + (1 if i < numel % tensors else 0) for i in range(tensors)]
    params = [torch.randn(n, generator=gen).to(dtype).requires_grad_() for n in sizes]
    for p in params:
        p.grad = (torch.randn(p.shape, generator=gen) * 1e-3).to(dtype)
    return params


INT8_NAMES = ("AdamW",)  # the optimizers that get int8-state row groups


def cpu_cases(names: list[str], state_dtypes: list[str]) -> list[tuple[str, torch.dtype, str]]:
    """(optimizer, param dtype, state dtype) per row group."""
    cases = []
    if "fp32" in state_dtypes:
        cases += [(name, torch.float32, "fp32") for name in names]
        cases += [("AdamW", torch.bfloat16, "fp32")] if "AdamW" in names else []
    if "int8" in state_dtypes:
        cases += [(name, dtype, "int8") for name in names if name in INT8_NAMES
                  for dtype in (torch.float32, torch.bfloat16)]
    return cases


def run_cpu(numel: int, repeats: int, names: list[str], tensors: int, state_dtypes: list[str]) -> dict:
    loads = [os.getloadavg()[0]]
    rows = []
    for name, dtype, state in cpu_cases(names, state_dtypes):
        nbytes = step_bytes(name, dtype, state)
        floor_buf = torch.randn(nbytes * numel // 8)  # mul_ reads and writes 8 bytes per element
        steps, warmup_s = {}, {}
        for label, factory in (cpu_variants if state == "fp32" else int8_variants)(name, dtype):
            try:
                step = factory(make_cpu_params(numel, dtype, tensors))
                start = time.perf_counter()
                step()  # the first step builds state, compiles (torch.compile) or JIT-loads
                warmup_s[label] = time.perf_counter() - start
                steps[label] = step
            except Exception as err:  # noqa: BLE001  (a contender that cannot run here is reported, not fatal)
                print(f"  skip {name} {label}: {type(err).__name__}: {str(err)[:200]}")
        steps["in-place mul_ floor"] = lambda: floor_buf.mul_(1.0)
        if state == "fp32":
            # The floor of an exact check or clip: its statistics read every grad before any update.
            grad_bytes = torch.randn(torch.finfo(dtype).bits // 8 * numel // 4)
            steps[TWO_READ_FLOOR] = lambda: (floor_buf.mul_(1.0), grad_bytes.sum())
        slow = {label: steps.pop(label) for label in SLOW if label in steps}
        results = time_interleaved(steps, torch.device("cpu"), repeats)
        for label, step in slow.items():  # after the others, so they are timed on their own
            results[label] = time_interleaved({label: step}, torch.device("cpu"), min(repeats, SLOW_REPEATS), warmup=1)[label]
        loads.append(os.getloadavg()[0])
        del steps
        floor = results["in-place mul_ floor"]
        for label, secs in results.items():
            grad_width = torch.finfo(dtype).bits // 8
            moved = {"check pass alone": grad_width, TWO_READ_FLOOR: nbytes + grad_width}.get(label, nbytes)
            row = dict(optimizer=name, dtype=str(dtype).replace("torch.", ""), state=state, impl=label, numel=numel,
                       ms=1e3 * secs, gbs=moved * numel / secs / 1e9, vs_floor=secs / floor,
                       warmup_s=warmup_s.get(label))
            rows.append(row)
            print(f"{name:8s} {row['dtype']:9s} {state:5s} {label:32s} {1e3 * secs:9.2f} ms  x{secs / floor:5.2f} floor"
                  + (f"  (first step {warmup_s[label]:.2f} s)" if label in warmup_s else ""), flush=True)
    # torch's fused AdamW on fp32 params (fp32 state): timed in the fp32 AdamW group, or in the int8
    # group with fp32 params when only int8 groups ran
    fused = [r["ms"] for r in rows if r["optimizer"] == "AdamW" and r["dtype"] == "float32"
             and r["impl"] in ("torch.optim fused", "torch.optim fused (fp32 state)")]
    for r in rows:
        same = {x["impl"]: x["ms"] for x in rows if (x["optimizer"], x["dtype"], x["state"]) ==
                (r["optimizer"], r["dtype"], r["state"])}
        r["vs_torch_fused_adamw"] = r["ms"] / fused[0] if fused else None
        r["vs_deepspeed"] = r["ms"] / same["DeepSpeedCPUAdam"] if "DeepSpeedCPUAdam" in same else None
    # Other processes on the machine take cores and memory bandwidth from the run: say how busy it was.
    return {"device": device_name(torch.device("cpu")), "torch": torch.__version__, "repeats": repeats,
            "tensors": tensors, "threads": torch.get_num_threads(), "rows": rows,
            "load_average": [min(loads), max(loads)], "cpus": os.cpu_count()}


def markdown_cpu(result: dict) -> str:
    lines = [
        f"# CPU optimizer step on {result['device']}",
        "",
        f"`{result.get('command', 'python benchmarks/step_throughput.py --device cpu')}`",
        "",
        *([f"Machine load while this table ran (1-minute load average, lowest / highest over its row groups, this "
           f"run's own threads included): {result['load_average'][0]:.1f} / {result['load_average'][1]:.1f} on "
           f"{result['cpus']} CPUs; above the thread count, other processes shared the cores and their "
           "interference is in the times.", ""]
          if "load_average" in result else []),
        f"torch {result['torch']}, {result['threads']} threads, {result['rows'][0]['numel']:,} params in "
        f"{result['tensors']} tensors; median of {result['repeats']} steps, every contender of a row group timed "
        "in turn within each repeat. `x floor`: this time over the in-place `mul_` over as many bytes as the "
        "optimizer must move (params and grads in their dtype, fp32 state); `x fused AdamW`: over torch.optim's "
        "fused CPU AdamW (fp32) in the same run; `x DS`: over DeepSpeedCPUAdam with the same params. "
        "`first step` includes building state and any compilation (torch.compile) or library load. "
        "dist_optim[cpu] is the fused CPU backend (what backend='auto' runs on CPU); `skip-check` adds the default "
        "non-finite check (one fused read of the grads), `clip` max_grad_norm=1.0; `check pass alone` is that read "
        "by itself (the grads' sum of squares and non-finite flag; its GB/s counts the grads only), so its `x floor` "
        "is the check's share of a step at the update's bandwidth; `mul_ floor + grad read` adds a separate read of "
        "the grads' bytes to the floor: the floor of any exact check or clip, whose statistics must read every grad "
        "before the update may use them (its GB/s counts both). "
        "Where the cores are shared with other work, a kernel that forks and joins threads once per tensor "
        "(torch fused, DeepSpeedCPUAdam) waits on descheduled threads at every join, while ours joins once per step: "
        "compare kernels at one thread, and read full-thread tables on a shared machine as what that machine gave. "
        "`state` int8: moments as uint8 codes with an fp32 absmax per 256 elements (state_dtype='int8'); its bytes "
        "(and its floor) count 1 + 4/256 bytes per moment element read and written; `dist_optim[torch] int8` "
        f"(seconds per step) is timed after the row group's others, median of {SLOW_REPEATS} steps.",
        "",
        "| optimizer | params | state | implementation | ms/step | GB/s | x floor | x fused AdamW | x DS | first step s |",
        "|---|---|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    fmt = lambda v, f: "" if v is None else format(v, f)  # noqa: E731
    for r in result["rows"]:
        lines.append(
            f"| {r['optimizer']} | {r['dtype']} | {r.get('state', 'fp32')} | {r['impl']} | {r['ms']:.2f} | "
            f"{r['gbs']:.1f} | {r['vs_floor']:.2f} | {fmt(r['vs_torch_fused_adamw'], '.2f')} | "
            f"{fmt(r['vs_deepspeed'], '.2f')} | {fmt(r['warmup_s'], '.2f')} |"
        )
    ratios = int8_ratios(result["rows"])
    if ratios:
        lines += ["", "int8 state, ratios of step times within each row group (> 1: the first is slower):", ""]
        lines += [f"- {line}" for line in ratios]
    return "\n".join(lines) + "\n"


def int8_ratios(rows: list[dict]) -> list[str]:
    """Per int8 row group: the fused int8 step against the same kernels on fp32 state, against the
    torch path's int8 step and against torch's fused AdamW (fp32)."""
    out = []
    for name, dtype in dict.fromkeys((r["optimizer"], r["dtype"]) for r in rows if r.get("state") == "int8"):
        ms = {r["impl"]: r["ms"] for r in rows if (r["optimizer"], r["dtype"], r.get("state")) == (name, dtype, "int8")}
        fused_int8 = ms.get("dist_optim[cpu] int8")
        if fused_int8 is None:
            continue
        parts = [f"{label} {fused_int8 / ms[other]:.2f}" for label, other in
                 (("/ [cpu] fp32 state", "dist_optim[cpu] fp32 state"), ("/ [torch] int8", "dist_optim[torch] int8"))
                 if other in ms]
        fused = next((r["vs_torch_fused_adamw"] for r in rows if r.get("state") == "int8" and r["optimizer"] == name
                      and r["dtype"] == dtype and r["impl"] == "dist_optim[cpu] int8"), None)
        if fused is not None:
            parts.append(f"/ torch fused AdamW (fp32 params and state) {fused:.2f}")
        out.append(f"{name}, {dtype} params: [cpu] int8 " + ", ".join(parts))
    return out


def markdown(result: dict) -> str:
    lines = [
        f"# Optimizer step throughput on {result['device']}",
        "",
        f"torch {result['torch']}, median of {result['repeats']} steps per implementation, each on fresh fp32 params "
        f"split over {len(SPLIT)} tensors and freed before the next. `B/param`: the bytes a step must move per "
        "param (params, grads and state read, params and state written; the check pass of the non-finite skip "
        "and of clipping reads the grads once more). GB/s counts those bytes. `x foreach`: torch.optim foreach's "
        "time over this one (> 1 is faster); `of fused AdamW`: this GB/s over torch.optim's fused AdamW's; "
        "`of copy`: this GB/s over the device-to-device copy's in the same run. `graph`: the step captured in a "
        "CUDA graph (capturable=True) and replayed.",
        "",
        "| optimizer | params | implementation | B/param | ms/step | GB/s | x foreach | of fused AdamW | of copy |",
        "|---|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in result["rows"]:
        vs = "" if r.get("vs_foreach") is None else f"{r['vs_foreach']:.2f}"
        vs_fused = "" if r.get("of_fused_adamw") is None else f"{100 * r['of_fused_adamw']:.0f}%"
        of_copy = "" if r.get("vs_copy") is None else f"{100 * r['vs_copy']:.0f}%"
        lines.append(f"| {r['optimizer']} | {r['numel']:,} | {r['impl']} | {r.get('bytes_per_param', '')} | "
                     f"{r['ms']:.3f} | {r['gbs']:.1f} | {vs} | {vs_fused} | {of_copy} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default=None, help="comma-separated param counts (default: 32e6 on CPU; 64e6,256e6,1e9 on CUDA)")
    parser.add_argument("--repeats", type=int, default=None, help="timed steps per contender (default 15 on CPU, 7 on CUDA)")
    parser.add_argument("--tensors", type=int, default=20, help="CPU: how many tensors the params are split over")
    parser.add_argument("--threads", default=None, help="CPU: comma-separated thread counts, one table each (default: torch's)")
    parser.add_argument("--optimizers", default=",".join(BASELINES))
    parser.add_argument("--state-dtypes", default="fp32,int8",
                        help="CPU: fp32 (every optimizer), int8 (AdamW with fp32 and bf16 params) or both")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    default = "32e6" if device.type == "cpu" else "64e6,256e6,1e9"
    sizes = [int(float(s)) for s in (args.sizes or default).split(",")]
    names = args.optimizers.split(",")
    unknown = [n for n in names if n not in BASELINES]
    if unknown:
        parser.error(f"unknown optimizer(s) {unknown}; choose from {list(BASELINES)}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"step_throughput_{device.type}"
    if device.type == "cpu":
        state_dtypes = args.state_dtypes.split(",")
        if not set(state_dtypes) <= {"fp32", "int8"}:
            parser.error(f"--state-dtypes takes fp32 and/or int8, got {args.state_dtypes!r}")
        if state_dtypes == ["int8"]:
            stem += "_int8"
        threads = [int(t) for t in (args.threads or str(torch.get_num_threads())).split(",")]
        results = []
        for nthreads in threads:
            torch.set_num_threads(nthreads)
            results += [run_cpu(numel, args.repeats or 15, names, args.tensors, state_dtypes) for numel in sizes]
        command = " ".join(["python benchmarks/step_throughput.py", *(argv if argv is not None else sys.argv[1:])])
        for r in results:
            r["command"] = command
        result = {"tables": results}
        text = "\n".join(markdown_cpu(r) for r in results)
    else:
        result = run(sizes, args.repeats or 7, device, names)
        text = markdown(result)
    (out / f"{stem}.json").write_text(json.dumps(result, indent=1))
    (out / f"{stem}.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
