"""How many threads a CPU step may use: ``torch.get_num_threads()``, but never more than this rank's
share of the cores it shares with the other ranks a launcher started on the host.

A launcher that sets ``OMP_NUM_THREADS`` has chosen (torchrun sets 1 for several ranks per node,
DeepSpeed's ``--bind_cores_to_rank`` sets each rank's cores): that count is used as torch has it. One
that sets none (DeepSpeed's launcher without binding, mpirun, srun) leaves every rank torch's default,
every core of its affinity, so N ranks on the same cores would run N threads per core, each join
waiting on a descheduled thread. There the count is capped at the affinity's cores over the ranks
that can be sharing them: all N where every rank may run on every CPU; fewer where the launcher
pinned ranks to parts of the host (cores, sockets), so a pinned rank keeps its own cores. The CPUs
the ranks divide are the host's, or a container's cpuset when the process runs in one."""

from __future__ import annotations

import functools
import math
import os
import re
from pathlib import Path

import torch

# Ranks on this host, as launchers name it: torchrun / accelerate, DeepSpeed's launcher, Open MPI,
# MPICH / Intel MPI.
LOCAL_RANKS_ENV = ("LOCAL_WORLD_SIZE", "LOCAL_SIZE", "OMPI_COMM_WORLD_LOCAL_SIZE", "MPI_LOCALNRANKS")
_SLURM_TASKS = re.compile(r"(\d+)(\(x\d+\))?")  # "8", or "8(x4)": 8 tasks on each of 4 nodes


def local_ranks() -> int:
    """How many ranks a launcher started on this host (1 when none says)."""
    for name in LOCAL_RANKS_ENV:
        value = os.environ.get(name, "").strip()
        if value.isdigit() and int(value) > 0:
            return int(value)
    # srun sets the step's tasks per node in each task it starts (SLURM_LOCALID); the allocation's
    # SLURM_NTASKS_PER_NODE is in every shell of the job, a lone process's too, so it is not read.
    match = _SLURM_TASKS.fullmatch(os.environ.get("SLURM_STEP_TASKS_PER_NODE", ""))
    if "SLURM_LOCALID" in os.environ and match and int(match.group(1)) > 0:
        return int(match.group(1))
    return 1


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # no affinity API off Linux
        return os.cpu_count() or 1


def _count_cpus(ranges: str) -> int:
    """CPUs in a cpuset list such as ``0-3,8,10-11``."""
    total = 0
    for part in ranges.strip().split(","):
        first, _, last = part.partition("-")
        total += int(last or first) - int(first) + 1
    return total


@functools.cache  # read once: kernel_threads runs at every kernel call
def host_cpus() -> int:
    """The CPUs this host's ranks divide: a container's cpuset (a cgroup v2 namespace whose root
    is this process's cgroup), else every CPU of the host."""
    try:
        if Path("/proc/self/cgroup").read_text().strip() == "0::/":
            return _count_cpus(Path("/sys/fs/cgroup/cpuset.cpus.effective").read_text())
    except (OSError, ValueError):
        pass
    return os.cpu_count() or 1


def kernel_threads() -> int:
    """Threads for one CPU kernel call (see the module docstring)."""
    n = max(1, torch.get_num_threads())
    if "OMP_NUM_THREADS" in os.environ:
        return n
    ranks = local_ranks()
    if ranks > 1:
        cores = usable_cores()
        # Ranks whose affinities, each this size, must overlap on the host's CPUs: all of them when
        # each may use every CPU, one when each was pinned to its own share.
        sharing = min(ranks, max(1, math.ceil(ranks * cores / max(cores, host_cpus()))))
        n = min(n, max(1, cores // sharing))
    return n
