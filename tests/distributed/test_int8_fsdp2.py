"""int8 optimizer state under FSDP2 at world 2 (uneven shards): the run equals one process, and
DCP checkpoints resume bit-exactly at world 2 and reshard to world 1; flat partitions (ZeRO-style,
plain tensors with a process group) equal the one-process run on the whole buffer bit for bit.
Checkpoints of int8 state through torch's get_state_dict / dcp.save / dcp.load / set_state_dict:
codes + absmax for a weight whose rows are whole blocks (lossless at world 1, 2 and 3, resume at
world 2 bit-exact, a quarter of the bytes), fp32 form otherwise (within one rounding after
resharding); load_checkpoint converts between int8-state and fp32-state checkpoints.

Tolerance against one process: test_fsdp2's rtol 1e-5 / atol 1e-6 (FSDP2 reduces gradients in
another order, an ulp per step) for all but a few elements. The block layouts agree (see
_int8_fsdp_cases), so the int8 runs differ beyond that only where a moment an ulp from a code's
threshold rounds to the neighbouring code: rare (at most 0.2% of the elements allowed; one of 4544
seen), and such an element's param moves by at most what Adam's steps can move it (lr per step:
|m_hat| / sqrt(v_hat) <= 1 up to eps for a constant-sign gradient, and close to it otherwise).
"""

from __future__ import annotations

import pytest
import torch

from dist_optim.state.blockwise import error_bound
from dist_optim.state.layout import code_map, dequantize_state, quantize_state
from tests.distributed import _int8_fsdp_cases as cases
from tests.multiproc import world_fixture

WORLD = 2
TOL = dict(rtol=1e-5, atol=1e-6)
world = world_fixture(WORLD)
world3 = world_fixture(3)


def assert_close_up_to_code_flips(a, b, steps, lr=0.01):
    far = ~torch.isclose(a, b, **TOL)
    assert far.float().mean() <= 0.002, f"{int(far.sum())} of {a.numel()} elements beyond the fp32 tolerance"
    assert bool(((a - b).abs() <= steps * lr).all())


def test_int8_state_on_uneven_shards_equals_one_process(world):
    results = world.run(cases.run_int8, 6)
    net = cases.model()
    opt = cases.optimizer(net.parameters())
    cases.train(net, opt, 0, 6, WORLD)
    (params0, layout0), (params1, layout1) = results
    # int8 over each rank's shard (2304 codes = 9 blocks, 2240 = 8 blocks and a partial one); fp32 below the rule
    assert layout0 == [(2304, 9), None, None, None] and layout1 == [(2240, 9), None, None, None]
    for rank_params in (params0, params1):
        for a, b in zip(rank_params, net.parameters()):
            assert_close_up_to_code_flips(a, b.detach(), steps=6)


def test_dcp_resume_at_world_2_is_bit_exact_and_reshards_to_world_1(world, tmp_path):
    root = str(tmp_path / "ckpt")
    uninterrupted = world.run(cases.run_save_and_go_on, root, 3, 3)
    resumed = world.run(cases.run_resume, root, 3)
    for (_, a_local), (_, b_local) in zip(uninterrupted, resumed):
        for a, b in zip(a_local, b_local):
            assert torch.equal(a, b)

    from dist_optim.distributed.checkpoint import load_checkpoint

    net = cases.model(seed=123)
    opt = cases.optimizer(net.parameters())
    start = load_checkpoint(root, net, opt)["step"]
    assert start == 3 and "exp_avg_absmax" in opt.state[net[0].weight]
    assert opt.state[net[0].weight]["exp_avg"].numel() == 4544
    cases.train(net, opt, start, 3, WORLD)
    for a, b in zip(uninterrupted[0][0], net.parameters()):
        assert_close_up_to_code_flips(a, b.detach(), steps=3)


def test_flat_partitions_equal_one_process_bit_for_bit(world):
    """Rank 0's partition ends on a block boundary, so each rank's blocks are the one-process
    blocks: codes, absmax and params are the same bits (the update is element-wise; no clipping)."""
    results = world.run(cases.run_flat_partitions, 4)
    whole, state = cases.train_flat(4, 0, 1)
    bounds = cases.flat_bounds(WORLD)
    for rank, (part, part_state) in enumerate(results):
        lo, hi = bounds[rank], bounds[rank + 1]
        assert torch.equal(part, whole[lo:hi])
        for key in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(part_state[key], state[key][lo:hi])
            assert torch.equal(part_state[key + "_absmax"], state[key + "_absmax"][lo // 256: -(-hi // 256)])


def test_an_empty_shard_holds_empty_int8_state(world):
    (w0, layout0), (w1, layout1) = world.run(cases.run_empty_shard, 3)
    assert layout0 == (4100, 17) and layout1 == (0, 0)
    net = cases.OneRow()
    cases.train_one_row(net, 3)
    # both ranks train on the same batch: FSDP2's average of two equal gradients is the one-process one
    for w in (w0, w1):
        assert_close_up_to_code_flips(w, net.w.detach(), steps=3)


# --- int8 checkpoints in int8 form through DCP ------------------------------------------------------
# ckpt_model's first weight (71 x 512) is saved as codes + absmax, its second (64 x 71) in fp32
# form (see _int8_fsdp_cases). Torch's own get_state_dict / dcp.save / dcp.load / set_state_dict.

INT8_FORM, FP32_FORM = "0.weight", "2.weight"
MOMENTS = ("exp_avg", "exp_avg_sq")


def fp32_values(entry: dict, key: str) -> torch.Tensor:
    """A saved moment's fp32 values, whichever form holds it."""
    if key + "_codes" in entry:
        return dequantize_state(entry[key + "_codes"].reshape(-1), entry[key + "_absmax"].reshape(-1).contiguous(),
                                key, entry[key + "_codes"].shape)
    return entry[key]


def assert_reloaded_within_bound(saved: dict, loaded: dict):
    """The int8-form weight comes back with the same codes and absmax (lossless: every shard at
    every world size holds whole rows of whole blocks). The fp32-form weight's moments were
    quantized again over the loading shards' blocks: each element within one rounding at its new
    block's absmax of the saved value (state.checkpoint's bound, blockwise.error_bound with the
    per-element absmax, block 1); the counters come back unchanged."""
    for key in MOMENTS:
        for suffix in ("_codes", "_absmax"):
            a, b = saved[INT8_FORM][key + suffix], loaded[INT8_FORM][key + suffix]
            assert a.dtype == b.dtype and torch.equal(a, b), (key, suffix)
        x1, x2 = saved[FP32_FORM][key], loaded[FP32_FORM][key]
        bound = error_bound(x1.reshape(-1), loaded[FP32_FORM][key + "@absmax"].reshape(-1), code_map(key), 1)
        assert bool(((x2 - x1).reshape(-1).double().abs() <= bound).all()), key
    for name in saved:
        if "step" in saved[name]:
            assert torch.equal(saved[name]["step"], loaded[name]["step"])


def assert_continues_alike(a: torch.Tensor, b: torch.Tensor, steps: int, lr: float = 0.01):
    """Runs resumed at another world size from the same checkpoint, after ``steps`` more steps.
    Not bitwise: the fp32-form weight's moments were quantized again over other blocks, and its
    blocks differ between the world sizes on every later step too, which reaches the other layers
    through the gradients. Each run moves an element by at most about lr per step (Adam), so they
    differ by at most 2 lr per step; and a load that lost the moments (fresh ones take steps of lr
    in sign direction) puts the params 10-40% of their norm apart, where the resumed runs agree to
    1e-2 of it (measured: 1.3e-4 for the int8-form weight, 7e-4 for the fp32-form one)."""
    assert bool(((a - b).abs() <= 2 * steps * lr).all())
    assert float((a - b).norm()) <= 1e-2 * float(a.norm())


def test_int8_form_entries_are_uint8_codes_and_absmax_by_row(world, tmp_path):
    (entries, _), _ = world.run(cases.raw_dcp_save, str(tmp_path / "w2"), 2, 0)
    codes, absmax = entries[INT8_FORM]["exp_avg_codes"], entries[INT8_FORM]["exp_avg_absmax"]
    assert codes.dtype == torch.uint8 and codes.shape == (71, 512) and absmax.shape == (71, 2)
    assert "exp_avg" not in entries[INT8_FORM] and entries[FP32_FORM]["exp_avg"].dtype == torch.float32
    assert "exp_avg_codes" not in entries[FP32_FORM]


def test_dcp_checkpoint_bytes_are_a_quarter_for_int8_form_moments(world, tmp_path):
    """Bytes of the saved optimizer tensors (DCP metadata) and of the files on disk: int8 state
    saves 3 - 4/256 bytes per element less for the int8-form weight's two moments, and nothing
    less for the fp32-form ones. On disk each saved tensor piece also costs its framing in the
    .distcp file (about 1.5 kB measured), and int8 form saves two entries per moment, not one."""
    import torch.distributed.checkpoint as dcp

    sizes = {}
    for dtype in ("fp32", "int8"):
        root = tmp_path / dtype
        world.run(cases.raw_dcp_save, str(root), 1, 0, dtype)
        meta = dcp.FileSystemReader(str(root)).read_metadata().state_dict_metadata
        tensors = sum(m.size.numel() * m.properties.dtype.itemsize for k, m in meta.items()
                      if k.startswith("optim.state.") and hasattr(m, "size"))
        disk = sum(f.stat().st_size for f in root.glob("*.distcp"))
        sizes[dtype] = (tensors, disk, len(meta))
    n = 71 * 512
    saving = 2 * (4 * n - (n + 4 * n // 256))
    assert sizes["fp32"][0] - sizes["int8"][0] == saving
    extra_pieces = (sizes["int8"][2] - sizes["fp32"][2]) * WORLD
    assert extra_pieces == 2 * WORLD
    assert 0 <= saving - (sizes["fp32"][1] - sizes["int8"][1]) <= 2048 * extra_pieces


def test_dcp_resume_at_world_2_in_int8_form_is_bit_exact(world, tmp_path):
    root = str(tmp_path / "w2")
    (saved, straight), _ = world.run(cases.raw_dcp_save, root, 3, 3)
    for (loaded, resumed) in world.run(cases.raw_dcp_load, root, 3, 3):
        for name in saved:
            assert saved[name].keys() == loaded[name].keys()
            for key in saved[name]:
                assert torch.equal(saved[name][key], loaded[name][key]), (name, key)
        for a, b in zip(straight, resumed):
            assert torch.equal(a, b)


def test_dcp_world_2_to_world_1(world, tmp_path):
    root = str(tmp_path / "w2")
    (saved, straight), _ = world.run(cases.raw_dcp_save, root, 3, 3)
    loaded, resumed = cases.raw_dcp_load(root, 3, 3)  # one process, plain params
    assert_reloaded_within_bound(saved, loaded)
    for a, b in zip(straight, resumed):
        assert_continues_alike(a, b, steps=3)


def test_dcp_world_1_to_world_2(world, tmp_path):
    root = str(tmp_path / "w1")
    saved, straight = cases.raw_dcp_save(root, 3, 3)
    for loaded, resumed in world.run(cases.raw_dcp_load, root, 3, 3):
        assert_reloaded_within_bound(saved, loaded)
        for a, b in zip(straight, resumed):
            assert_continues_alike(a, b, steps=3)


def test_load_checkpoint_converts_int8_codes_for_an_fp32_state_optimizer(world, tmp_path):
    """An int8-state checkpoint (world 2) into fp32-state optimizers at world 2 and 1: each moment
    is exactly its saved dequantized values. A plain dcp.load of it into an fp32 optimizer's request
    fails on the missing fp32 entry instead of reading codes as values."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException
    from torch.distributed.checkpoint.state_dict import get_state_dict

    root = str(tmp_path / "ckpt")
    saved = world.run(cases.helper_save, root, 2, "int8")[0]
    for loaded in [*world.run(cases.helper_load, root, "fp32"), cases.helper_load(root, "fp32")]:
        for name in (INT8_FORM, FP32_FORM):
            for key in MOMENTS:
                assert loaded[name][key].dtype == torch.float32
                assert torch.equal(loaded[name][key], fp32_values(saved[name], key)), (name, key)

    net = cases.ckpt_model(seed=123)
    opt = cases.ckpt_optimizer(net.parameters(), "fp32")
    model_sd, optim_sd = get_state_dict(net, opt)
    latest = (tmp_path / "ckpt" / "latest").read_text().strip()
    with pytest.raises(CheckpointException, match=r"Missing key .*optim\.state\.0\.weight\.exp_avg\."):
        dcp.load({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(tmp_path / "ckpt" / latest))


def test_load_checkpoint_quantizes_an_fp32_checkpoint_for_an_int8_optimizer(world, tmp_path):
    """An fp32-state checkpoint (world 2) into int8-state optimizers at world 1 (codes and absmax
    exactly quantize_state of the saved values over the whole param) and world 2."""
    root = str(tmp_path / "ckpt")
    saved = world.run(cases.helper_save, root, 2, "fp32")[0]
    one = cases.helper_load(root, "int8")
    for key in MOMENTS:
        codes, absmax = quantize_state(saved[INT8_FORM][key], key)
        assert torch.equal(one[INT8_FORM][key + "_codes"].reshape(-1), codes)
        assert torch.equal(one[INT8_FORM][key + "_absmax"].reshape(-1), absmax)
    for loaded in world.run(cases.helper_load, root, "int8"):
        for name in (INT8_FORM, FP32_FORM):
            for key in MOMENTS:
                x1, x2 = saved[name][key], fp32_values(loaded[name], key)
                bound = error_bound(x1.reshape(-1), loaded[name][key + "@absmax"].reshape(-1), code_map(key), 1)
                assert bool(((x2 - x1).reshape(-1).double().abs() <= bound).all()), (name, key)


def test_dcp_world_2_to_world_3(world, world3, tmp_path):
    root = str(tmp_path / "w2")
    (saved, straight), _ = world.run(cases.raw_dcp_save, root, 3, 3)
    for loaded, resumed in world3.run(cases.raw_dcp_load, root, 3, 3):
        assert_reloaded_within_bound(saved, loaded)
        for a, b in zip(straight, resumed):
            assert_continues_alike(a, b, steps=3)


def test_an_empty_shard_saves_and_loads_int8_form(world, tmp_path):
    for before, after in world.run(cases.run_empty_shard_checkpoint, str(tmp_path / "row"), 2):
        entry = before["w"]
        assert entry["exp_avg_codes"].shape == (1, 4096) and entry["exp_avg_absmax"].shape == (1, 16)
        for key in entry:
            assert torch.equal(entry[key], after["w"][key]), key
