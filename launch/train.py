"""Training entry point for external launchers; the same job as ``dist-optim train``.

    accelerate launch --config_file launch/accelerate/fsdp2.yaml launch/train.py --optimizer ranger --steps 600 --out out/acc
    accelerate launch --config_file launch/accelerate/zero3.yaml launch/train.py --steps 600 --out out/z3
    accelerate launch --cpu --num_processes 2 launch/train.py --optimizer adamw --out out/cpu
    deepspeed --num_gpus 8 launch/train.py --strategy zero2 --optimizer adamw --out out/ds
    torchrun --nproc_per_node 8 launch/train.py --strategy fsdp2 --optimizer radam --out out/tr

Under accelerate, its config decides: FSDP2 (prepared with accelerate's FSDP2 functions, its
``mixed_precision`` as FSDP2's MixedPrecisionPolicy), DDP (``Accelerator.prepare``, bf16 autocast),
or DeepSpeed, where the yaml's ``deepspeed_config_file`` is the engine's config as written: ZeRO
stage, optimizer, micro-batch size, accumulation, bf16/fp16, clipping and lr scheduler. A flag that contradicts
that file is refused; ``"auto"`` there takes the flag. Elsewhere the strategy is --strategy, else DDP
for several ranks. What ran, read back from the engine, is in <out>/run.json and report.md.
"""

import sys

from dist_optim.cli import launched_main

if __name__ == "__main__":
    sys.exit(launched_main())
