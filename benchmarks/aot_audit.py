"""Ahead-of-time audit of every kernel specialization the optimizers launch, for sm_80 and sm_90,
without a GPU.

    python benchmarks/aot_audit.py [--out benchmarks/results] [--workers 2]

The specializations are recorded from real ``step()`` calls (tests/kernels/test_aot.py's RUNS, under
the Triton interpreter when there is no GPU), compiled with ``triton.compile(ASTSource(...),
target=GPUTarget("cuda", arch, 32))`` and read with Triton's bundled ``ptxas -v`` and
``cuobjdump -sass``. Writes aot_sm80_sm90.md and .json: per kernel, dtype and arch the registers,
spills, stack, global loads and stores by width (128-bit vs narrower), and int32 address arithmetic.

These figures are derived from the compile, not measured on a GPU. The kernels' masked path (tails,
unaligned tensors) is in the same binary as the unmasked one, so every kernel has narrow accesses
too; the 128-bit ones are the fast path's.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()

    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported
    sys.path.insert(0, str(ROOT))
    import triton

    from tests.kernels.test_aot import recorded_specs
    from triton_kernels import _aot

    start = time.perf_counter()
    specs = list(recorded_specs())
    recorded = time.perf_counter()
    rows = _aot.audit(specs, workers=args.workers)
    compiled = time.perf_counter()

    def version(tool):
        out = subprocess.run([tool, "--version"], capture_output=True, text=True).stdout.strip().splitlines()
        return out[-1] if out else "?"

    meta = {
        "triton": triton.__version__,
        "ptxas sm_80": version(_aot._tool("ptxas", 80)),
        "ptxas sm_90": version(_aot._tool("ptxas", 90)),
        "specializations": len(specs),
        "record_s": round(recorded - start, 1),
        "compile_s": round(compiled - recorded, 1),
        "workers": args.workers,
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "aot_sm80_sm90.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
    (out / "aot_sm80_sm90.md").write_text(markdown(meta, rows))
    print(markdown(meta, rows))


def markdown(meta: dict, rows: list[dict]) -> str:
    lines = [
        "# AOT audit: every kernel specialization the optimizers launch, sm_80 and sm_90",
        "",
        "Derived from the compile (`python benchmarks/aot_audit.py`), not measured on a GPU: "
        f"Triton {meta['triton']}, ptxas `{meta['ptxas sm_80']}` (sm_80) and `{meta['ptxas sm_90']}` (sm_90), "
        f"{meta['specializations']} specializations recorded from real launches (the optimizers' `step()` calls, "
        "and the launchers' sync-free form: per-step values as device tensors, a device skip flag, per-tensor step and Lookahead counters, step_control; bf16 params under bf16_update nearest/stochastic/kahan; slow weights in the param dtype and fp32; the int8-state variants are audited by tests/kernels/test_int8_aot.py) "
        f"({meta['record_s']} s), compiled for two archs in {meta['compile_s']} s on {meta['workers']} workers.",
        "",
        "Columns: registers per thread; spill stores/loads and stack frame in bytes (ptxas -v); global loads "
        "and stores in the SASS, 128-bit (`LDG.E.128`, `STG.E.128`) and narrower; int32: per-element address "
        "arithmetic done in 32 bits on a value that can be large (must be 0). Each kernel holds an unmasked "
        "path for full, 16-byte-aligned chunks (the 128-bit accesses; loops may be unrolled, so counts are "
        "per binary, not per element) and a masked path for tails and unaligned tensors (the narrow ones). "
        "Kernel names list the dtype constexprs (param, grad) and the switches that are on.",
        "",
        "| kernel | arch | regs | spill st/ld | stack | LDG.128 | LDG other | STG.128 | STG other | int32 |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in sorted(rows, key=lambda r: (r["kernel"], r["name"], r["arch"])):
        lines.append(
            f"| `{r['name']}` | {r['arch']} | {r['registers']} | {r['spill_stores']}/{r['spill_loads']} | {r['stack']} "
            f"| {r['ld128']} | {r['ld']} | {r['st128']} | {r['st']} | {len(r['int32_addressing'])} |"
        )
    lines.append("")
    lines += rounding_costs(rows)
    return "\n".join(lines)


def rounding_costs(rows: list[dict]) -> list[str]:
    """The bf16 update variants (ROUNDING=1 stochastic, 2 kahan) beside the same kernel with the
    same switches storing to nearest: registers and 128-bit accesses."""
    by_name = {(r["name"], r["arch"]): r for r in rows}
    lines = [
        "## bf16 update variants vs round-to-nearest",
        "",
        "The same kernel and switches, the param store differing: nearest, stochastic (ROUNDING=1; SR_STEPS: the "
        "stream's step from the device counters) or Kahan (ROUNDING=2: one more bf16 load and store per element).",
        "",
        "| variant | arch | regs (nearest) | regs | LDG.128 (nearest) | LDG.128 | STG.128 (nearest) | STG.128 | spill |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in sorted(rows, key=lambda r: (r["name"], r["arch"])):
        parts = r["name"].split("[", 1)[1].rstrip("]").split(",")
        if not any(p.startswith("ROUNDING=") for p in parts):
            continue
        base_parts = [p for p in parts if not p.startswith("ROUNDING=") and p != "SR_STEPS"]
        base = by_name.get((f"{r['name'].split('[')[0]}[{','.join(base_parts)}]", r["arch"]))
        if base is None:
            continue
        lines.append(f"| `{r['name']}` | {r['arch']} | {base['registers']} | {r['registers']} | {base['ld128']} | "
                     f"{r['ld128']} | {base['st128']} | {r['st128']} | {r['spill_stores']}/{r['spill_loads']} |")
    lines.append("")
    return lines


if __name__ == "__main__":
    main()
