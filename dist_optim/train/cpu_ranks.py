"""``accelerate launch --cpu --num_processes N``: accelerate's simple launcher starts one process
whatever N is (it expects ``mpirun`` for several CPU ranks, and without it its ``Accelerator`` would
quietly train alone). launch/train.py notices the case, reads N from the accelerate command that
started it (with accelerate's own argument parser and config-file handling), and starts the N ranks
itself; where N cannot be read it refuses instead of training as one process.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Mapping
from pathlib import Path

# Set by mpirun-style launchers (accelerate's --mpirun_hostfile route).
_MPI_SIZES = ("PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE")
_REFUSAL = (
    "accelerate launch --cpu started one process, though it was asked for several ({why}); start the ranks "
    "with `accelerate launch --multi_gpu --num_processes N` (torchrun starts them, on CPU too) or "
    "`dist-optim train --nproc N`"
)


def accelerate_cpu_processes(env: Mapping[str, str], parent_cmdline: list[str] | None = None) -> int:
    """How many processes the ``accelerate launch --cpu`` that started this one process was asked
    for; 1 when no such launcher started it. accelerate sets MASTER_ADDR only when asked for more
    than one process: with it, a command line that cannot be read is refused."""
    mpi = [k for k in _MPI_SIZES if int(env.get(k, "1")) > 1]
    if mpi and "WORLD_SIZE" not in env:
        # Each mpirun rank would otherwise train alone, all writing the same --out.
        raise ValueError(
            f"Invalid launch: mpirun started the ranks ({mpi[0]}={env[mpi[0]]}), which launch/train.py does not join; "
            "use `accelerate launch --multi_gpu --num_processes N`, torchrun or `dist-optim train --nproc N`"
        )
    if env.get("ACCELERATE_USE_CPU", "").lower() != "true" or "WORLD_SIZE" in env:
        return 1
    several = "MASTER_ADDR" in env
    argv = parent_cmdline if parent_cmdline is not None else _parent_cmdline()
    if "launch" not in argv:
        if several:
            raise ValueError(_REFUSAL.format(why=f"its command line could not be read: {argv!r}"))
        return 1
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser

    try:
        args, _, _ = _validate_launch_command(launch_command_parser().parse_args(argv[argv.index("launch") + 1 :]))
    except (SystemExit, ValueError) as err:
        if not several:
            return 1
        raise ValueError(_REFUSAL.format(why=f"its arguments could not be read: {err}")) from None
    if args.use_deepspeed or args.use_fsdp:
        # accelerate's --cpu drops the config's DeepSpeed/FSDP without a word; training DDP instead
        # would not be what the config says.
        raise ValueError(
            f"Invalid launch: accelerate launch --cpu ignores the config's {'DeepSpeed' if args.use_deepspeed else 'FSDP'} "
            "settings; drop --cpu (without a GPU the ranks run on the CPU anyway)"
        )
    if (args.num_machines or 1) > 1:
        raise ValueError(_REFUSAL.format(why=f"num_machines={args.num_machines}, which needs mpirun"))
    return int(args.num_processes or 1)


def _parent_cmdline() -> list[str]:
    try:
        raw = Path(f"/proc/{os.getppid()}/cmdline").read_bytes()
    except OSError:
        return []
    return [a.decode() for a in raw.split(b"\0") if a]


def start_cpu_ranks(world: int, argv: list[str]) -> None:
    """Run launch/train.py's job on ``world`` CPU ranks of this machine, each with the environment
    a launcher would give it (accelerate's variables included), joined by a file rendezvous."""
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as tmp:
        mp.start_processes(
            _rank_main, args=(world, os.path.join(tmp, "init"), argv), nprocs=world, start_method="spawn", join=True
        )


def _rank_main(rank: int, world: int, init_file: str, argv: list[str]) -> None:
    import torch
    import torch.distributed as dist

    from ..cli import launched_main

    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world))
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    code = launched_main(argv)
    if code:
        raise SystemExit(code)
