"""Ahead-of-time compile of the kernels as real launches specialize them, for GPUs this machine
need not have, and what the machine code says about them.

1. ``specs(calls)``: launches recorded by ``_launch.recording()`` (under the interpreter or on a
   GPU) become compile specs — the signature, constexprs and argument attributes that Triton's own
   binder derives for a CUDA launch with those arguments, deduplicated. The interpreter runs with
   small chunk and block sizes; the specs carry the sizes a CUDA launch uses (``gpu_sizes``).
2. ``audit(specs, archs)``: ``triton.compile(ASTSource(...), target=GPUTarget("cuda", arch, 32))``
   for each spec and arch, then Triton's bundled ``ptxas -v`` (registers, spills, stack) and
   ``cuobjdump -sass`` (global loads and stores by width), and a data-flow check of the PTX
   (``int32_address_findings``). Compiling needs triton's real JIT, not the interpreter, so from an
   interpreting process ``audit`` runs in a child process (``python -m triton_kernels._aot``).

Nothing is cached: each compile goes to its own temporary Triton cache directory.
"""

from __future__ import annotations

import collections
import contextlib
import io
import json
import multiprocessing
import os
import re
import subprocess
import sys
import tempfile
from concurrent.futures import ProcessPoolExecutor

ARCHS = (80, 90)



def gpu_sizes(module: str) -> dict:
    """Launch-size constexprs as a CUDA launch passes them (the interpreter uses smaller ones)."""
    from . import _multi_tensor, lbfgs

    if module == lbfgs.__name__:
        return {"BLOCK": lbfgs.GPU_BLOCK}
    return {"CHUNK": _multi_tensor.GPU_CHUNK, "BLOCK": _multi_tensor.GPU_BLOCK}

# ---------------------------------------------------------------------------------------------
# 1. recorded launches -> compile specs


def _dtype_name(value):
    import triton.language as tl

    if isinstance(value, tl.dtype):
        return {"__dtype__": str(value)}
    return value


def _dtype_value(value):
    import triton.language as tl

    if isinstance(value, dict) and "__dtype__" in value:
        return tl.str_to_ty(value["__dtype__"], None)
    return value


def spec_of(kernel, args, kwargs) -> dict:
    """The compile spec Triton's JIT would build for ``kernel[grid](*args, **kwargs)`` on a CUDA
    device (sm_90 options; the specialization itself does not depend on the arch)."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend
    from triton.runtime.jit import JITFunction, create_function_from_signature

    fn = kernel.fn  # the Python function, whether kernel is a JITFunction or an InterpretedFunction
    if isinstance(kernel, JITFunction):
        jit = kernel
    else:  # the interpreter keeps the decorator's arguments (do_not_specialize, ...)
        jit = JITFunction(fn, **kernel.kwargs)
    backend = make_backend(GPUTarget("cuda", 90, 32))
    binder = create_function_from_signature(jit.signature, jit.params, backend)
    bound, specialization, options = binder(*args, **kwargs)
    options, signature, constexprs, attrs = jit._pack_args(backend, kwargs, bound, specialization, options)
    sizes = gpu_sizes(fn.__module__)
    names = list(signature)
    constexprs = {path: sizes.get(names[path[0]], value) for path, value in constexprs.items()}
    return {
        "kernel": f"{fn.__module__}:{fn.__name__}",
        "signature": signature,
        "constexprs": [[list(path), _dtype_name(value)] for path, value in sorted(constexprs.items())],
        "attrs": [[list(path), value] for path, value in sorted(attrs.items()) if value],
        "num_warps": options.num_warps,
        "num_stages": options.num_stages,
        "enable_fp_fusion": options.enable_fp_fusion,  # off where a kernel must round as the host does
    }


def specs(calls) -> list[dict]:
    """Deduplicated compile specs of recorded launches, in first-launch order."""
    out, seen = [], set()
    for kernel, args, kwargs in calls:
        spec = spec_of(kernel, args, kwargs)
        key = json.dumps(spec, sort_keys=True)
        if key not in seen:
            seen.add(key)
            out.append(spec)
    return out


def describe(spec: dict) -> str:
    """A short name: kernel and its non-size constexprs, e.g. ``_adam_kernel[fp32,fp32,HAS_WD,AMSGRAD]``."""
    names = list(spec["signature"])
    parts = []
    for path, value in spec["constexprs"]:
        name = names[path[0]]
        if name in ("CHUNK", "BLOCK"):
            continue
        if isinstance(value, dict):
            if name in ("P_DTYPE", "G_DTYPE"):
                parts.append(value["__dtype__"])
            elif value["__dtype__"] != "fp32":  # another role's dtype (SLOW_DTYPE), named when not the default
                parts.append(f"{name}={value['__dtype__']}")
        elif name == "HAS_SKIP":
            continue
        elif value is True:
            parts.append(name)
        elif value is not False and value != 0:  # ROUNDING=0 (nearest) is every kernel's default
            parts.append(f"{name}={value}")
    device_values = [n for n, t in spec["signature"].items() if t.startswith("*") and n.islower()]
    if device_values:  # hyperparameters read from device tensors, and a skip flag
        parts.append("device:" + "+".join(device_values))
    if any(names[path[0]] == "HAS_SKIP" and value is True for path, value in spec["constexprs"]):
        parts.append("SKIP")
    return f"{spec['kernel'].split(':')[1]}[{','.join(parts)}]"


# ---------------------------------------------------------------------------------------------
# 2. compile and inspect


def _tool(name: str, arch: int | None = None) -> str:
    import triton

    if name == "ptxas":
        from triton.backends.nvidia.compiler import get_ptxas

        return get_ptxas(arch).path
    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)


def compile_spec(spec: dict, arch: int):
    import importlib

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    module, name = spec["kernel"].split(":")
    fn = getattr(importlib.import_module(module), name)
    if not isinstance(fn, triton.runtime.jit.JITFunction):
        raise RuntimeError("AOT compiles need triton's JIT: run without TRITON_INTERPRET=1")
    constexprs = {tuple(path): _dtype_value(value) for path, value in spec["constexprs"]}
    attrs = {tuple(path): value for path, value in spec["attrs"]}
    src = ASTSource(fn, spec["signature"], constexprs, attrs)
    options = {"num_warps": spec["num_warps"], "num_stages": spec["num_stages"],
               "enable_fp_fusion": spec.get("enable_fp_fusion", True)}
    log = io.StringIO()
    knobs = triton.knobs
    previous = knobs.nvidia.dump_ptxas_log, knobs.cache.dir
    with tempfile.TemporaryDirectory() as cache_dir:
        # A fresh cache, so ptxas always runs, and Triton prints its ptxas -v log: the build's own figures.
        knobs.nvidia.dump_ptxas_log, knobs.cache.dir = True, cache_dir
        try:
            with contextlib.redirect_stdout(log):
                kernel = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options)
        finally:
            knobs.nvidia.dump_ptxas_log, knobs.cache.dir = previous
    return kernel, log.getvalue()


_PTXAS = re.compile(r"Used (\d+) registers")
_SPILL = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")
_STACK = re.compile(r"(\d+) bytes stack frame")
_GLOBAL = re.compile(r"\b(LDG|STG)\.E((?:\.[A-Z0-9_]+)*)")


def ptxas_usage(log: str) -> dict:
    """Registers, spill bytes and stack frame from the ptxas -v log of Triton's own build."""
    spill = _SPILL.search(log)
    return {
        "registers": int(_PTXAS.search(log).group(1)),
        "spill_stores": int(spill.group(1)),
        "spill_loads": int(spill.group(2)),
        "stack": int(_STACK.search(log).group(1)),
    }


def sass_accesses(cubin: bytes, workdir: str) -> dict:
    """Global loads and stores in the SASS by width: {"ld128": n, "ld": n, "st128": n, "st": n,
    "local": n} (local: LDL/STL, which a spill-free kernel has none of)."""
    path = os.path.join(workdir, "k.cubin")
    with open(path, "wb") as f:
        f.write(cubin)
    sass = subprocess.run([_tool("cuobjdump"), "-sass", path], capture_output=True, text=True, check=True).stdout
    counts = collections.Counter()
    for op, suffix in _GLOBAL.findall(sass):
        kind = "ld" if op == "LDG" else "st"
        counts[kind + ("128" if ".128" in suffix else "")] += 1
    counts["local"] = len(re.findall(r"\b(?:LDL|STL)\b", sass))
    return {k: counts[k] for k in ("ld128", "ld", "st128", "st", "local")}


# PTX data flow: is any per-element address computed with 32-bit arithmetic on a value that can be
# large? Registers: %rd 64-bit, %r 32-bit (Triton's PTX keeps that naming). A value's origins are
# where its inputs come from: the thread index (small, bounded by the block), constants, or an
# unbounded source — the program index, a kernel parameter, a value loaded from memory.
_INSTR = re.compile(r"^(?:@!?%\w+\s+)?([a-z][\w.]*)\s*(.*)$")
_REG = re.compile(r"%[a-z]+\d+|%(?:tid|ntid|ctaid|nctaid|laneid|warpid)(?:\.[xyz])?")
_UNBOUNDED = {"ctaid", "param", "load"}
_LABELS = re.compile(r"^(?:\s*(?:[$\w]+:|[{}]))*")


def _instructions(ptx: str):
    body = re.sub(r"//[^\n]*", "", ptx)
    body = "\n".join(line for line in body.splitlines() if not line.lstrip().startswith((".loc", ".file")))
    for stmt in body.replace("\n", " ").split(";"):
        stmt = _LABELS.sub("", stmt).strip()  # labels and braces in front of an instruction
        m = _INSTR.match(stmt)
        if m and not stmt.startswith("."):
            yield m.group(1), m.group(2)


def int32_address_findings(ptx: str) -> list[str]:
    """Instructions that compute part of a per-element global address (one that depends on the
    thread index) in 32-bit arithmetic with an operand that can be large (derived from the program
    index, a kernel parameter or a loaded value): the int32 overflow the kernels must not have.
    Widening a bare program index (``mad.wide.u32 %rd, %ctaid, 32``) is fine; ``pid * BLOCK`` in
    32 bits is not, nor is narrowing a 64-bit value to 32 bits on the way to an address."""
    defs: dict[str, list[tuple[str, list[str]]]] = collections.defaultdict(list)
    addresses = []
    for op, operands in _instructions(ptx):
        regs = _REG.findall(operands)
        if op.startswith(("ld.global", "st.global")):
            addr = re.search(r"\[\s*(%rd\d+)", operands)
            if addr:
                addresses.append(addr.group(1))
        if op.startswith(("st.", "bra", "ret", "bar")) or not regs or operands.lstrip().startswith("["):
            continue
        if operands.lstrip().startswith("{"):  # vector load: {dests}, [addr]
            dests = _REG.findall(operands.split("}")[0])
            srcs = _REG.findall(operands.split("}", 1)[1])
        else:
            dests, srcs = regs[:1], regs[1:]
        for d in dests:
            defs[d].append((op, srcs))

    origin_memo: dict[str, frozenset] = {}

    def origins(reg: str, active: frozenset = frozenset()) -> frozenset:
        if reg in origin_memo:
            return origin_memo[reg]
        if reg.startswith("%tid") or reg.startswith("%laneid") or reg.startswith("%ntid"):
            return frozenset({"tid"})
        if reg.startswith("%ctaid") or reg.startswith("%nctaid"):
            return frozenset({"ctaid"})
        if reg in active:
            return frozenset()
        out: set = set()
        for op, srcs in defs.get(reg, []):
            if op.startswith("ld.param"):
                out.add("param")
            elif op.startswith("ld."):
                out.add("load")
            else:
                for s in srcs:
                    out |= origins(s, active | {reg})
        result = frozenset(out)
        if not active:
            origin_memo[reg] = result
        return result

    findings, visited = [], set()
    for addr in addresses:
        if "tid" not in origins(addr):
            continue  # a per-program address (a table entry): not per element
        stack = [addr]
        while stack:
            reg = stack.pop()
            if reg in visited or not reg.startswith("%r"):
                continue
            visited.add(reg)
            for op, srcs in defs.get(reg, []):
                if op.startswith("ld."):
                    continue  # a loaded value is a base, not arithmetic
                narrowing = op.startswith("cvt") and any(s.startswith("%rd") for s in srcs)
                if re.fullmatch(r"%r\d+", reg) and (narrowing or not op.startswith(("mov", "cvt", "selp"))):
                    bad = [s for s in srcs if origins(s) & _UNBOUNDED]
                    if bad:
                        findings.append(f"{op} {reg} <- {', '.join(srcs)} (32-bit, from {sorted(origins(bad[0]))})")
                stack.extend(srcs)
    return findings


def inspect_compiled(kernel, ptxas_log: str) -> dict:
    row = ptxas_usage(ptxas_log)
    with tempfile.TemporaryDirectory() as workdir:
        row.update(sass_accesses(kernel.asm["cubin"], workdir))
    row["int32_addressing"] = int32_address_findings(kernel.asm["ptx"])
    return row


def _audit_one(job) -> dict:
    spec, arch = job
    row = {"kernel": spec["kernel"], "name": describe(spec), "arch": f"sm_{arch}"}
    row.update(inspect_compiled(*compile_spec(spec, arch)))
    return row


def audit(spec_list: list[dict], archs=ARCHS, workers: int = 2) -> list[dict]:
    """One row per (spec, arch): registers, spills, stack, SASS global accesses by width and any
    int32 address arithmetic. Runs in a child process when this one interprets kernels."""
    from ._support import interpreting

    if interpreting():
        env = dict(os.environ, TRITON_INTERPRET="0")
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        env["PYTHONPATH"] = os.pathsep.join([root, *filter(None, [env.get("PYTHONPATH")])])
        payload = json.dumps({"specs": spec_list, "archs": list(archs), "workers": workers})
        done = subprocess.run([sys.executable, "-m", "triton_kernels._aot"], input=payload, env=env, cwd=root,
                              capture_output=True, text=True)
        if done.returncode:
            raise RuntimeError(f"AOT compile failed:\n{done.stderr[-4000:]}")
        return json.loads(done.stdout)
    jobs = [(spec, arch) for spec in spec_list for arch in archs]
    # spawn, not fork: the parent may hold a CUDA context (recording on a GPU)
    with ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        return list(pool.map(_audit_one, jobs))


if __name__ == "__main__":
    request = json.load(sys.stdin)
    rows = audit(request["specs"], request["archs"], request["workers"])
    json.dump(rows, sys.stdout)
