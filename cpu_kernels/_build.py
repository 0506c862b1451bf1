"""Build and load the fused CPU kernels (``kernels.cpp``) once per machine.

A plain C++ shared library, no torch headers, so a build takes a few seconds: g++ -O3 -march=native
with OpenMP, cached under ``$DIST_OPTIM_CACHE`` (default ``~/.cache/dist_optim``) by a hash of the
source, the flags, the compiler's version and the CPU's feature flags. Concurrent processes (ranks
starting together) build under a file lock and publish with an atomic rename. The library is loaded
after torch, so its OpenMP calls resolve to the libgomp torch already loaded (one soname, one pool).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch  # noqa: F401  (loads torch's libgomp before ours is opened)

SOURCE = Path(__file__).with_name("kernels.cpp")
# -ffp-contract=off: the compiler fuses no multiply-add the torch path does not fuse (the kernel
# writes std::fma where torch's add-with-alpha and lerp do). -fno-math-errno / -fno-trapping-math
# let sqrt and selects vectorize; neither changes a result.
FLAGS = ["-O3", "-march=native", "-ffp-contract=off", "-fno-math-errno", "-fno-trapping-math",
         "-fopenmp", "-fPIC", "-shared", "-std=c++17"]


class BuildError(RuntimeError):
    """The CPU kernels could not be compiled or loaded on this machine."""


def compiler() -> str:
    cxx = os.environ.get("CXX", "g++")
    if shutil.which(cxx) is None:
        raise BuildError(f"no C++ compiler: {cxx!r} is not on PATH (set CXX)")
    return cxx


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return platform.processor()


def cache_dir() -> Path:
    root = os.environ.get("DIST_OPTIM_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "dist_optim"
    )
    path = Path(root) / "cpu_kernels"
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = tempfile.NamedTemporaryFile(dir=path)
        probe.close()
    except OSError:
        path = Path(tempfile.gettempdir()) / f"dist_optim_cpu_kernels_{os.getuid()}"
        path.mkdir(parents=True, exist_ok=True)
    return path


def library_path() -> Path:
    """Compile (once) and return the path of the shared library for this machine."""
    cxx = compiler()
    source = SOURCE.read_bytes()
    try:
        version = subprocess.run([cxx, "--version"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError) as err:
        raise BuildError(f"{cxx} --version failed: {err}") from err
    key = hashlib.sha256(b"\0".join([source, " ".join(FLAGS).encode(), version.encode(), _cpu_flags().encode(),
                                     platform.machine().encode()])).hexdigest()[:16]
    directory = cache_dir()
    target = directory / f"dist_optim_cpu_{key}.so"
    if target.exists():
        return target
    import fcntl

    with open(directory / f"{target.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if target.exists():  # another process built it while we waited
            return target
        tmp = directory / f"{target.name}.{os.getpid()}.tmp"
        cmd = [cxx, *FLAGS, str(SOURCE), "-o", str(tmp)]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            tmp.unlink(missing_ok=True)
            raise BuildError(f"building the CPU kernels failed ({' '.join(cmd)}):\n{proc.stderr[-4000:]}")
        os.replace(tmp, target)
    return target


@functools.lru_cache(maxsize=None)
def library() -> ctypes.CDLL:
    """The loaded kernels (built on first use); raises BuildError when that is impossible here."""
    try:
        lib = ctypes.CDLL(str(library_path()))
    except OSError as err:
        raise BuildError(f"loading the CPU kernels failed: {err}") from err
    i64p = ctypes.POINTER(ctypes.c_int64)
    vpp = ctypes.POINTER(ctypes.c_void_p)
    lib.dist_optim_step.restype = ctypes.c_int
    fp = ctypes.POINTER(ctypes.c_float)
    ip = ctypes.POINTER(ctypes.c_int)
    lib.dist_optim_step.argtypes = [
        ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_int64, i64p, vpp, vpp, vpp, vpp, ip, fp, ctypes.c_int,
        ctypes.c_int, ctypes.POINTER(ctypes.c_uint32), vpp, fp, ip, ctypes.c_int,
    ]
    lib.dist_optim_sumsq.restype = ctypes.c_int
    lib.dist_optim_sumsq.argtypes = [
        ctypes.c_int, ctypes.c_int64, i64p, vpp, ctypes.POINTER(ctypes.c_double), ctypes.POINTER(ctypes.c_int), ctypes.c_int,
    ]
    return lib


@functools.lru_cache(maxsize=None)
def available() -> bool:
    try:
        library()
    except BuildError:
        return False
    return True
