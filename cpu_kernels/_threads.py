"""How many threads a CPU step may use: ``torch.get_num_threads()``, but never more than this rank's
share of the cores when a launcher started several ranks on the host.

A launcher that sets ``OMP_NUM_THREADS`` has chosen (torchrun sets 1 for several ranks per node,
DeepSpeed's ``--bind_cores_to_rank`` sets each rank's cores): that count is used as torch has it. One
that sets none (DeepSpeed's launcher without binding, mpirun, srun) leaves every rank torch's default,
every core of its affinity, so N ranks stepping at once would run N threads per core, each join
waiting on a descheduled thread. There the count is capped at the affinity's cores over the ranks
on this host. A rank pinned to its own cores without ``OMP_NUM_THREADS`` is capped too (its
affinity looks the same as a shared one): setting ``OMP_NUM_THREADS`` says the cores are its own."""

from __future__ import annotations

import os

import torch

# Ranks on this host, as launchers name it: torchrun / accelerate, DeepSpeed's launcher, Open MPI,
# MPICH / Intel MPI, Slurm.
LOCAL_RANKS_ENV = ("LOCAL_WORLD_SIZE", "LOCAL_SIZE", "OMPI_COMM_WORLD_LOCAL_SIZE", "MPI_LOCALNRANKS",
                   "SLURM_NTASKS_PER_NODE")


def local_ranks() -> int:
    """How many ranks a launcher started on this host (1 when none says)."""
    for name in LOCAL_RANKS_ENV:
        value = os.environ.get(name, "").strip()
        if value.isdigit() and int(value) > 0:
            return int(value)
    return 1


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # no affinity API off Linux
        return os.cpu_count() or 1


def kernel_threads() -> int:
    """Threads for one CPU kernel call (see the module docstring)."""
    n = max(1, torch.get_num_threads())
    if "OMP_NUM_THREADS" in os.environ:
        return n
    ranks = local_ranks()
    if ranks > 1:
        n = min(n, max(1, usable_cores() // ranks))
    return n
