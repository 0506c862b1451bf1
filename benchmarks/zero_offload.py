"""DeepSpeed ZeRO with ``offload_optimizer: cpu``, end to end, at world 2: the optimizer step runs on
the host over each rank's fp32 partition, which is what the fused CPU kernels are for.

    python benchmarks/zero_offload.py [--params 21e6] [--stages 2] [--repeats 10] [--out benchmarks/results]

Contenders, one engine each, built from the same model and data: DeepSpeedCPUAdam (what a ds_config
``"optimizer": {"type": "AdamW"}`` builds under offload), dist_optim.AdamW on the fused CPU kernels
(backend="auto"), and dist_optim.AdamW on the torch path (backend="torch", the specification).
Clipping at 1.0 throughout (DeepSpeed's ``gradient_clipping`` for its optimizer, our
``max_grad_norm`` for ours). Timed per step: ``engine.step()`` (norm, clipping, the CPU update, the
copy back and the parameter all-gather) and the whole step (forward + backward + step), medians,
the contenders taking turns step by step. Ranks are gloo processes on the CPU here, each with
cpu_count // world threads.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

LABELS = ("DeepSpeedCPUAdam", "dist_optim.AdamW [cpu kernels]", "dist_optim.AdamW [torch path]")


def engine_for(label: str, stage: int, numel: int):
    import dist_optim
    import dist_optim.deepspeed as dod

    width = int((numel / 4) ** 0.5)
    torch.manual_seed(0)
    net = torch.nn.Sequential(*[torch.nn.Linear(width, width) for _ in range(4)])
    config = {
        "train_micro_batch_size_per_gpu": 8,
        "steps_per_print": 10**9,
        "zero_optimization": {"stage": stage, "offload_optimizer": {"device": "cpu"}},
    }
    if label == "DeepSpeedCPUAdam":
        config.update(gradient_clipping=1.0, optimizer={"type": "AdamW", "params": {"lr": 1e-4, "weight_decay": 0.01}})
        engine, *_ = dod.initialize(model=net, model_parameters=net.parameters(), config=config)
    else:
        backend = "auto" if "cpu" in label else "torch"
        opt = dist_optim.AdamW(net.parameters(), lr=1e-4, weight_decay=0.01, max_grad_norm=1.0, backend=backend)
        config.update(gradient_clipping=0.0)
        engine, *_ = dod.initialize(model=net, optimizer=opt, config=config)
    return engine, torch.randn(8, width)


def worker(rank: int, world: int, init: str, numel: int, stages: list[int], repeats: int, result_file: str) -> None:
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), DS_ACCELERATOR="cpu")
    dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=world)
    rows = []
    for stage in stages:
        engines = {}
        for label in LABELS:
            try:
                engines[label] = engine_for(label, stage, numel)
            except Exception as err:  # noqa: BLE001  (a contender that cannot run here is reported, not fatal)
                if rank == 0:
                    print(f"skip zero{stage} {label}: {type(err).__name__}: {str(err)[:300]}", flush=True)
        step_t = {label: [] for label in engines}
        total_t = {label: [] for label in engines}
        for i in range(repeats + 2):
            for label, (engine, x) in engines.items():
                dist.barrier()
                start = time.perf_counter()
                engine.backward(engine(x).square().mean())
                mid = time.perf_counter()
                engine.step()
                end = time.perf_counter()
                if i >= 2:  # two warm-up steps: state built, kernels loaded
                    step_t[label].append(end - mid)
                    total_t[label].append(end - start)
        for label in engines:
            rows.append(dict(stage=stage, impl=label, step_ms=1e3 * statistics.median(step_t[label]),
                             total_ms=1e3 * statistics.median(total_t[label])))
        del engines
    if rank == 0:
        Path(result_file).write_text(json.dumps(rows))
    dist.destroy_process_group()


def markdown(result: dict) -> str:
    lines = [
        f"# ZeRO-Offload (offload_optimizer: cpu), world {result['world']}, {result['device']}",
        "",
        f"`{result.get('command', 'python benchmarks/zero_offload.py')}`",
        "",
        # Other processes on the machine take cores and memory bandwidth from the run: say how busy it was.
        *([f"Machine load (1-minute load average at the start / end, the run's own ranks included): "
           f"{result['load_average'][0]:.1f} / {result['load_average'][1]:.1f} on {result['cpus']} CPUs.", ""]
          if "load_average" in result else []),
        f"{result['params']:,} fp32 params (4 Linear layers), {result['threads']} threads per rank, median of "
        f"{result['repeats']} steps, contenders in turn. `engine.step()` includes the norm, clipping, the CPU update, "
        "the copy back and the all-gather; `whole step` adds forward and backward. Ratios are to DeepSpeedCPUAdam "
        "in the same stage.",
        "",
        "| stage | optimizer | engine.step() ms | x DS | whole step ms | x DS |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for r in result["rows"]:
        ds = next((x for x in result["rows"] if x["stage"] == r["stage"] and x["impl"] == "DeepSpeedCPUAdam"), None)
        rs = "" if ds is None else f"{r['step_ms'] / ds['step_ms']:.2f}"
        rt = "" if ds is None else f"{r['total_ms'] / ds['total_ms']:.2f}"
        lines.append(f"| ZeRO-{r['stage']} | {r['impl']} | {r['step_ms']:.2f} | {rs} | {r['total_ms']:.2f} | {rt} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", type=float, default=21e6)
    parser.add_argument("--stages", default="2")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = parser.parse_args(argv)
    world = 2
    stages = [int(s) for s in args.stages.split(",")]
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        result_file = os.path.join(tmp, "rows.json")
        mp.start_processes(
            worker, args=(world, os.path.join(tmp, "init"), int(args.params), stages, args.repeats, result_file),
            nprocs=world, start_method="spawn",
        )
        rows = json.loads(Path(result_file).read_text())
    from step_throughput import device_name  # the CPU model line the other results carry

    result = dict(world=world, device=device_name(torch.device("cpu")).split(" (")[0], params=int(args.params),
                  threads=max(1, (os.cpu_count() or 1) // world), repeats=args.repeats, rows=rows,
                  command=" ".join(["python benchmarks/zero_offload.py", *(argv if argv is not None else sys.argv[1:])]),
                  load_average=[load_before, os.getloadavg()[0]], cpus=os.cpu_count())
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "zero_offload_cpu.json").write_text(json.dumps(result, indent=1))
    (out / "zero_offload_cpu.md").write_text(markdown(result))
    print(markdown(result))


if __name__ == "__main__":
    main()
