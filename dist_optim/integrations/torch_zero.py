"""dist-optim inside ``torch.distributed.optim.ZeroRedundancyOptimizer(optimizer_class=dist_optim.X)``.

ZeroRedundancyOptimizer gives each rank's local optimizer a disjoint share of the params and keeps
``process_group=`` for itself, so ours would see only its share and clip and skip by a local norm.
After ZeroRedundancyOptimizer builds its local optimizer, ours is bound to its group: the shares'
statistics then sum over it (one all-reduce), as for ZeRO's flat partitions.
"""

from __future__ import annotations

from typing import Any

from .. import optim as _optim

MODULE = "torch.distributed.optim.zero_redundancy_optimizer"


def _patch(module: Any) -> None:
    cls = module.ZeroRedundancyOptimizer
    if getattr(cls, "_dist_optim_patched", False):
        return
    init_local = cls._init_local_optimizer

    def _init_local_optimizer(self, *args: Any, **kwargs: Any) -> None:
        init_local(self, *args, **kwargs)
        ours = _optim.fused_core(self.optim)
        if ours is not None:
            ours.bind_params(self.process_group)

    cls._init_local_optimizer = _init_local_optimizer
    cls._dist_optim_patched = True


def install() -> None:
    """Patch ZeroRedundancyOptimizer now if it is imported, else right after it is."""
    from ._post_import import when_imported

    when_imported(MODULE, _patch)
