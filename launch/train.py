"""Training entry point for external launchers; the same job as ``dist-optim train``.

    accelerate launch --config_file launch/accelerate/fsdp2.yaml launch/train.py --optimizer ranger --steps 600 --out out/acc
    deepspeed --num_gpus 8 launch/train.py --strategy zero2 --optimizer adamw --out out/ds
    torchrun --nproc_per_node 8 launch/train.py --strategy fsdp2 --optimizer radam --out out/tr

The strategy is --strategy, else what the launcher asked for (accelerate's FSDP2 or DeepSpeed
ZeRO stage), else DDP for several ranks.
"""

import sys

from dist_optim.cli import launched_main

if __name__ == "__main__":
    sys.exit(launched_main())
