"""Optimizer step throughput: dist-optim (torch path, and Triton on CUDA) against torch.optim
(foreach, and fused where it exists) and a device-to-device copy, all measured in the same run.

    python benchmarks/step_throughput.py [--sizes 1e6,4e6,16e6] [--repeats 7] [--out benchmarks/results]

Each size is the total number of fp32 params, split over a few tensors of uneven sizes as in a real
model. Reported: median step time, GB/s (bytes one step must move / time), and ratios to torch.optim
foreach measured in the same run. Figures from a CPU are indicative; we quote GPU figures only.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
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


def variants(name: str, device: torch.device):
    """(label, factory(params) -> step callable) for every implementation worth timing."""
    kw = BENCH_KWARGS[name]
    ours = getattr(dist_optim, name)
    baseline = BASELINES[name][0]
    out = [("dist_optim[torch]", lambda ps: ours(ps, **kw, backend="torch", nonfinite="apply").step)]
    if device.type == "cuda":
        out.append(("dist_optim[triton]", lambda ps: ours(ps, **kw, backend="triton", nonfinite="apply").step))
        out.append(("dist_optim[triton]+skip-check", lambda ps: ours(ps, **kw, backend="triton").step))
    if baseline is not None:
        torch_kw = {k: v for k, v in kw.items()}
        out.append(("torch.optim foreach", lambda ps: baseline(ps, **torch_kw, foreach=True).step))
        if "fused" in baseline.__init__.__code__.co_varnames and (device.type == "cuda" or name in ("Adam", "AdamW", "SGD", "Adagrad")):
            out.append(("torch.optim fused", lambda ps: baseline(ps, **torch_kw, fused=True).step))
    return out


def run(sizes: list[int], repeats: int, device: torch.device, names: list[str]) -> dict:
    rows = []
    for numel in sizes:
        src = torch.empty(numel, device=device)
        dst = torch.empty_like(src)
        copy_s = time_interleaved({"copy": lambda: dst.copy_(src)}, device, repeats)["copy"]
        copy_gbs = 2 * 4 * numel / copy_s / 1e9
        rows.append(dict(optimizer="copy", impl="device-to-device copy", numel=numel, ms=1e3 * copy_s, gbs=copy_gbs))
        for name in names:
            _, reads, writes = BASELINES[name]
            steps = {}
            for label, factory in variants(name, device):
                try:
                    steps[label] = factory(make_params(numel, device))
                except (RuntimeError, TypeError, ValueError) as err:  # e.g. a fused impl missing on this device
                    print(f"  skip {name} {label}: {err}")
            results = time_interleaved(steps, device, repeats)
            del steps
            ref = results.get("torch.optim foreach")
            for label, secs in results.items():
                gbs = (reads + writes) * 4 * numel / secs / 1e9
                rows.append(
                    dict(
                        optimizer=name, impl=label, numel=numel, ms=1e3 * secs, gbs=gbs,
                        vs_foreach=None if ref is None else ref / secs, vs_copy=gbs / copy_gbs,
                    )
                )
                print(f"{name:8s} {numel:>11,d} {label:30s} {1e3 * secs:9.3f} ms {gbs:8.2f} GB/s")
    return {
        "device": device_name(device),
        "torch": torch.__version__,
        "repeats": repeats,
        "rows": rows,
    }


def markdown(result: dict) -> str:
    lines = [
        f"# Optimizer step throughput on {result['device']}",
        "",
        f"torch {result['torch']}, median of {result['repeats']} steps, implementations timed in turn within each "
        f"repeat; fp32 params split over {len(SPLIT)} tensors. dist_optim runs with nonfinite='apply' (no check "
        "pass), as torch.optim does. "
        "GB/s counts the bytes a step must move (params, grads and state read, params and state written). "
        "`x foreach` is torch.optim foreach's time divided by this implementation's time (> 1 is faster); "
        "`of copy` is this GB/s over the device-to-device copy's GB/s in the same run.",
        "",
        "| optimizer | params | implementation | ms/step | GB/s | x foreach | of copy |",
        "|---|---:|---|---:|---:|---:|---:|",
    ]
    for r in result["rows"]:
        vs = "" if r.get("vs_foreach") is None else f"{r['vs_foreach']:.2f}"
        of_copy = "" if r.get("vs_copy") is None else f"{100 * r['vs_copy']:.0f}%"
        lines.append(f"| {r['optimizer']} | {r['numel']:,} | {r['impl']} | {r['ms']:.3f} | {r['gbs']:.1f} | {vs} | {of_copy} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default=None, help="comma-separated param counts (default: 1e6,4e6,16e6 on CPU; 1e6..256e6 on CUDA)")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--optimizers", default=",".join(BASELINES))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    default = "1e6,4e6,16e6" if device.type == "cpu" else "1e6,16e6,64e6,256e6"
    sizes = [int(float(s)) for s in (args.sizes or default).split(",")]
    names = args.optimizers.split(",")
    unknown = [n for n in names if n not in BASELINES]
    if unknown:
        parser.error(f"unknown optimizer(s) {unknown}; choose from {list(BASELINES)}")
    result = run(sizes, args.repeats, device, names)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"step_throughput_{device.type}"
    (out / f"{stem}.json").write_text(json.dumps(result, indent=1))
    (out / f"{stem}.md").write_text(markdown(result))
    print(markdown(result))


if __name__ == "__main__":
    main()
