"""A crash in the middle of a save leaves the previous checkpoint complete, named by ``latest`` and
loadable; only the newest ``keep`` checkpoints stay on disk."""

from __future__ import annotations

import pytest
import torch
import torch.distributed.checkpoint as dcp

import dist_optim
from dist_optim.distributed import checkpoint as ckpt
from tests.optim._setup import run


def _train(steps, net=None, opt=None, start=0):
    if net is None:
        torch.manual_seed(0)
        net = torch.nn.Linear(4, 3)
        opt = dist_optim.Lookahead(dist_optim.AdamW(net.parameters(), lr=0.01, backend="torch"), k=2)
    params = list(net.parameters())
    run(opt, params, start, start + steps)
    return net, opt


def test_interrupted_save_leaves_the_previous_checkpoint_loadable(tmp_path, monkeypatch):
    net, opt = _train(3)
    ckpt.save_checkpoint(tmp_path, net, opt, step=3)
    saved = [p.detach().clone() for p in net.parameters()]
    _train(2, net, opt, start=3)

    real_save = dcp.save

    def crash_after_writing(state, checkpoint_id):
        real_save(state, checkpoint_id=checkpoint_id)  # the files are written...
        raise KeyboardInterrupt("killed")  # ...and the process dies before the save completes

    monkeypatch.setattr(ckpt.dcp, "save", crash_after_writing)
    with pytest.raises(KeyboardInterrupt):
        ckpt.save_checkpoint(tmp_path, net, opt, step=5)
    monkeypatch.undo()

    assert ckpt.latest_checkpoint(tmp_path).name == "step_00000003"
    torch.manual_seed(1)
    fresh = torch.nn.Linear(4, 3)
    fresh_opt = dist_optim.Lookahead(dist_optim.AdamW(fresh.parameters(), lr=0.01, backend="torch"), k=2)
    assert ckpt.load_checkpoint(tmp_path, fresh, fresh_opt)["step"] == 3
    for a, b in zip(fresh.parameters(), saved):
        assert torch.equal(a, b)
    assert "slow_buffer" in fresh_opt.state[fresh.weight]


def test_keeps_the_newest_checkpoints(tmp_path):
    net, opt = _train(1)
    for step in (1, 2, 3):
        ckpt.save_checkpoint(tmp_path, net, opt, step=step, keep=2)
    assert sorted(p.name for p in tmp_path.glob("step_*")) == ["step_00000002", "step_00000003"]
    assert ckpt.latest_checkpoint(tmp_path).name == "step_00000003"


def test_loading_an_incomplete_folder_is_refused(tmp_path):
    net, opt = _train(1)
    with pytest.raises(FileNotFoundError, match="no complete checkpoint"):
        ckpt.load_checkpoint(tmp_path / "nothing", net, opt)
