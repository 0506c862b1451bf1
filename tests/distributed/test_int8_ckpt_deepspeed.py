"""int8 optimizer state in DeepSpeed ZeRO-2 checkpoints (gloo, DS_ACCELERATOR=cpu): each rank's file
holds its partition's codes and absmax (about a quarter of the fp32 bytes) and a resume at the same
world size is bit-exact; the universal form holds each param's moments as codes over canonical
blocks (the flattened param's), within one rounding of the saved values and exact where a block is
a block on both sides; it loads at world 1 into int8 state (one more rounding at most) or fp32 state
(the universal values exactly)."""

from __future__ import annotations

import re

import pytest
import torch

pytest.importorskip("deepspeed", reason="pip install --no-build-isolation deepspeed")

from dist_optim.state.blockwise import error_bound  # noqa: E402
from dist_optim.state.layout import QBLOCK, code_map, dequantize_state  # noqa: E402
from tests.distributed import _int8_ckpt_ds_cases as cases  # noqa: E402
from tests.multiproc import world_fixture  # noqa: E402

WORLD = 2
MOMENTS = ("exp_avg", "exp_avg_sq")
world = world_fixture(WORLD)
world1 = world_fixture(1)


def rank_files(folder):
    files = sorted(folder.glob("*zero_pp_rank_*_optim_states.pt"),
                   key=lambda f: int(re.search(r"zero_pp_rank_(\d+)_", f.name).group(1)))
    assert len(files) == WORLD
    return files


def saved_rank_state(folder):
    """Per rank: (the base optimizer's saved state of group 0, the param slice mappings)."""
    out = []
    for f in rank_files(folder):
        osd = torch.load(f, map_location="cpu", weights_only=False)["optimizer_state_dict"]
        out.append((osd["base_optimizer_state"]["state"][0], osd["param_slice_mappings"][0]))
    return out


def within_one_rounding(x_new: torch.Tensor, x_old: torch.Tensor, absmax: torch.Tensor, key: str) -> bool:
    """|x_new - x_old| within blockwise.error_bound of x_old at the new blocks' absmax (per element)."""
    bound = error_bound(x_old.reshape(-1), absmax.reshape(-1), code_map(key), 1)
    return bool(((x_new - x_old).reshape(-1).double().abs() <= bound).all())


def test_zero2_int8_checkpoint_holds_codes_and_resumes_bit_exactly(world, tmp_path):
    root = tmp_path / "ds"
    saved = world.run(cases.run_save, str(root), 3, 3)
    for (live, _), (on_disk, _) in zip(saved, saved_rank_state(root / "saved")):
        for key in MOMENTS:
            assert key not in on_disk and on_disk[key + "_codes"].dtype == torch.uint8
            assert torch.equal(on_disk[key + "_codes"], live[key])
            assert torch.equal(on_disk[key + "_absmax"], live[key + "_absmax"])
    resumed = world.run(cases.run_resume, str(root), 3, 3)
    for (live, straight), (loaded, again) in zip(saved, resumed):
        assert live.keys() == loaded.keys()
        for key in live:
            assert torch.equal(live[key], loaded[key]), key
        for a, b in zip(straight, again):
            assert torch.equal(a, b)


def test_zero2_int8_rank_files_are_a_quarter_of_the_moment_bytes(world, tmp_path):
    """Per rank, the file shrinks by 2 moments x (4 - 1) bytes per partition element less the
    absmax (4 per 256); torch.save framing differs by an entry per moment (under 2 kB each)."""
    sizes, numel = {}, None
    for dtype in ("fp32", "int8"):
        states = world.run(cases.run_save, str(tmp_path / dtype), 1, 0, dtype)
        numel = states[0][0]["exp_avg"].numel()
        sizes[dtype] = [f.stat().st_size for f in rank_files(tmp_path / dtype / "saved")]
    saving = 2 * (3 * numel - 4 * -(-numel // QBLOCK))
    for fp32, int8 in zip(sizes["fp32"], sizes["int8"]):
        assert 0 <= saving - (fp32 - int8) <= 2 * 2048


def test_universal_form_holds_canonical_codes_and_loads_at_world_1(world, world1, tmp_path):
    from dist_optim.integrations.ds_universal import ds_to_universal

    root, universal = tmp_path / "ds", tmp_path / "universal"
    saved = world.run(cases.run_save, str(root), 3, 3)
    ds_to_universal(root / "saved", universal)
    ranks = saved_rank_state(root / "saved")
    names = [n for n, _ in cases.model().named_parameters()]
    shapes = {n: p.shape for n, p in cases.model().named_parameters()}

    # the saved fp32 values of each param, dequantized from each rank's partition blocks
    reference = {n: {k: [] for k in MOMENTS} for n in names}
    for state, mappings in ranks:
        for key in MOMENTS:
            values = dequantize_state(state[key + "_codes"], state[key + "_absmax"], key)
            for name, frag in mappings.items():
                reference[name][key].append(values[frag.start:frag.start + frag.numel])
    files = {n: torch.load(universal / "params" / f"{n}.pt", weights_only=True) for n in names}
    for name in names:
        for key in MOMENTS:
            codes, absmax = files[name][key + "_codes"], files[name][key + "_absmax"]
            n = codes.numel()
            assert codes.dtype == torch.uint8 and codes.shape == shapes[name] and absmax.shape == (-(-n // QBLOCK),)
            x1 = torch.cat(reference[name][key])
            x2 = dequantize_state(codes.reshape(-1), absmax, key)
            per_element = absmax.repeat_interleave(QBLOCK)[:n]
            assert within_one_rounding(x2, x1, per_element, key), (name, key)

    # the weight starts rank 0's partition: its blocks before the partition's partial last block
    # are canonical blocks, copied exactly
    state0, mappings0 = ranks[0]
    assert mappings0["0.weight"].start == 0
    whole_blocks = mappings0["0.weight"].numel // QBLOCK
    assert whole_blocks == 17
    for key in MOMENTS:
        assert torch.equal(files["0.weight"][key + "_codes"].reshape(-1)[:whole_blocks * QBLOCK],
                           state0[key + "_codes"][:whole_blocks * QBLOCK])
        assert torch.equal(files["0.weight"][key + "_absmax"][:whole_blocks], state0[key + "_absmax"][:whole_blocks])

    # world 1, int8 state: each fragment within one more rounding of the universal values
    ((state, where, resumed),) = world1.run(cases.run_universal_load, str(universal), 3, 3, WORLD)
    for key in MOMENTS:
        values = dequantize_state(state[key], state[key + "_absmax"], key)
        per_element = state[key + "_absmax"].repeat_interleave(QBLOCK)[:values.numel()]
        for name in names:
            at, lo, n = where[name]
            universal_values = dequantize_state(files[name][key + "_codes"].reshape(-1), files[name][key + "_absmax"], key)
            assert within_one_rounding(values[at:at + n], universal_values[lo:lo + n], per_element[at:at + n], key)
    assert torch.equal(state["step"], saved[0][0]["step"])
    # continued on the same global batches: not bitwise (other blocks, another reduction order);
    # a load that lost the moments would differ by about lr per element and step
    for a, b in zip(saved[0][1], resumed):
        assert float((a - b).norm()) <= 1e-2 * float(a.norm())

    # world 1, fp32 state: the universal values exactly
    ((state, where, _),) = world1.run(cases.run_universal_load, str(universal), 3, 0, WORLD, "fp32")
    for key in MOMENTS:
        assert state[key].dtype == torch.float32 and key + "_absmax" not in state
        for name in names:
            at, lo, n = where[name]
            universal_values = dequantize_state(files[name][key + "_codes"].reshape(-1), files[name][key + "_absmax"], key)
            assert torch.equal(state[key][at:at + n], universal_values[lo:lo + n])
