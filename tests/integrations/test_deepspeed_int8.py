"""``state_dtype="int8"`` under real DeepSpeed ZeRO-1/2/3 at world 2 (gloo, DS_ACCELERATOR=cpu),
with a ds_config naming ours: ZeRO-1/2 flat partitions, ZeRO-3 sub-groups (step() once per
sub-group), and ``offload_optimizer: cpu`` at stages 2 and 3.

- Equal, bit for bit, to our optimizer in one process stepping the same layout: int8 blocks are
  laid over each tensor the optimizer steps (a flat partition, a sub-group's tensor), so the
  reference steps those tensors, built from the full model at DeepSpeed's boundaries read from the
  engine (see _ds_int8_cases). Bitwise is possible because DeepSpeed's two-rank average is exact
  whatever its order (halving is exact), and the reference backpropagates each rank's slice alone.
- int8 exactly where the rule says (a stepped tensor of >= MIN_QUANTIZED_NUMEL elements), the same
  on every rank; ``memory_report()`` counts those bytes on each rank.
- Near the fp32-state run (tolerance stated at FP32_RTOL).
- ``engine.save_checkpoint``/``load_checkpoint`` resume bit-identically at the same world size.
- ZeRO-3's partition padding, which DeepSpeed leaves uninitialized, is zeroed, so it cannot take
  over an int8 block's absmax; DeepSpeed's ``safe_get/set_full_optimizer_state`` see int8 moments
  in fp32 rather than their codes.
"""

from __future__ import annotations

from typing import NamedTuple

import pytest
import torch

pytest.importorskip("deepspeed", reason="pip install --no-build-isolation deepspeed")

import dist_optim.deepspeed as dod  # noqa: E402
from dist_optim.state import MIN_QUANTIZED_NUMEL  # noqa: E402
from dist_optim.state.layout import QBLOCK, absmax_key  # noqa: E402
from tests.integrations import _ds_int8_cases as cases  # noqa: E402
from tests.multiproc import world_fixture  # noqa: E402

WORLD = 2
STEPS = 5  # Ranger (k=2) syncs its slow weights twice
world = world_fixture(WORLD)

# int8 against fp32 state: per param, the distance between the two runs' params over the fp32 run's
# whole update (params - initial), in L2. Rounding to the signed map moves a moment by at most 1.2% of
# its block's absmax (codes at most 2.3% of it apart; the unsigned map's 0.7%), more relative to the
# block's small moments. Measured after 5 steps on every case below: at most 0.9% (the weights;
# params whose state stays fp32 move through the model only, at most 0.2%). 2% leaves room for
# another platform's rounding.
FP32_RTOL = 0.02


class Case(NamedTuple):
    stage: int
    name: str
    offload: bool = False
    aligned: bool = False  # ZeRO-1/2 parameter_alignment: padding between params in the flat buffer

    def __str__(self) -> str:
        return f"zero{self.stage}-{self.name}{'-offload' * self.offload}{'-aligned' * self.aligned}"


CASES = [
    *(Case(stage, name) for name in ("AdamW", "Ranger") for stage in (1, 2, 3)),
    Case(1, "SGD", aligned=True), Case(2, "Adagrad"), Case(3, "RMSprop"),
    *(Case(stage, name, offload=True) for name in ("AdamW", "Ranger") for stage in (2, 3)),
]


@pytest.fixture(scope="module")
def runs(world):
    """Each case's per-rank results, run once for the module's tests."""
    done: dict[Case, list] = {}

    def get(case: Case) -> list:
        if case not in done:
            done[case] = world.run(cases.run, case.stage, case.name, STEPS, offload=case.offload, aligned=case.aligned)
        return done[case]

    return get


def _all_pieces(results) -> list:
    return [piece for _, pieces, *_ in results for piece in pieces]


def assert_equals_layout_reference(results, name: str, grouped: bool = True) -> None:
    """Every rank's full params, and each stepped tensor's state entry by entry, are the reference's bits."""
    ref_params, ref_opt, ref_tensors = cases.layout_reference(name, STEPS, WORLD, _all_pieces(results), grouped=grouped)
    at = 0
    for params, pieces, states, _, misread in results:
        assert misread == []
        for a, b in zip(params, ref_params, strict=True):
            assert torch.equal(a, b)
        for state, t in zip(states, ref_tensors[at:at + len(pieces)], strict=True):
            ref_state = ref_opt.state[t]
            assert state.keys() == ref_state.keys()
            for key, value in state.items():
                assert torch.equal(value, ref_state[key]), key
        at += len(pieces)


@pytest.mark.parametrize("case", CASES, ids=str)
def test_int8_under_zero_equals_our_optimizer_on_the_same_layout_bit_for_bit(runs, case):
    results = runs(case)
    if case.aligned:  # the layout read covers padding between params (after b1's 129 elements)
        assert any(i is None for piece in _all_pieces(results) for i, _, _ in piece.segments[:-1])
    assert_equals_layout_reference(results, case.name)


def test_zero3_padding_deepspeed_leaves_uninitialized_stays_out_of_int8_blocks(world):
    """ZeRO-3 pads a param's last partition and never writes the padding; here the allocator hands
    out NaN. Rank 1's [b1, W2] sub-group holds such a padding element inside its first int8 block,
    and SGD's coupled weight decay reads it: the integration zeroes it, so the run is the reference's
    (a NaN there would be the block's absmax, and NaN the block's moments and params)."""
    results = world.run(cases.run, 3, "SGD+L2", STEPS, grouped=False, nan_memory=True)
    sizes = [p.numel() for p in cases.model().parameters()]
    _, pieces, states, *_ = results[1]
    padded = [k for k, piece in enumerate(pieces)
              if any(i is not None and start + n > sizes[i] for i, start, n in piece.segments[:-1])]
    assert padded and all(absmax_key("momentum_buffer") in states[k] for k in padded)
    assert_equals_layout_reference(results, "SGD+L2", grouped=False)


def test_the_layout_reference_is_what_makes_the_bits_equal(runs):
    """The same optimizer over the whole params (blocks from each param's element 0) lands elsewhere:
    the bitwise equality above depends on stepping DeepSpeed's own tensors."""
    (params, *_), _ = runs(Case(2, "AdamW"))
    whole = cases.plain_reference("AdamW", STEPS, WORLD, state_dtype="int8")
    assert not all(torch.equal(a, b) for a, b in zip(params, whole))


@pytest.mark.parametrize("case", CASES, ids=str)
def test_int8_state_where_the_rule_says_on_every_rank(runs, case):
    results = runs(case)
    decisions = []
    for _, pieces, states, *_ in results:
        quantized = []
        for piece, state in zip(pieces, states, strict=True):
            n = piece.numel
            moments = [k for k in state if absmax_key(k) in state]
            quantized.append(bool(moments))
            assert bool(moments) == (n >= MIN_QUANTIZED_NUMEL), (piece, list(state))
            for key in moments:
                assert state[key].dtype == torch.uint8 and state[key].shape == (n,)
                absmax = state[absmax_key(key)]
                assert absmax.dtype == torch.float32 and absmax.shape == (-(-n // QBLOCK),)
            assert len(moments) in (0, cases.MOMENTS[case.name])
            # offload: the state is where DeepSpeed keeps the fp32 partitions, the CPU
            assert all(v.device.type == "cpu" for v in state.values())
        decisions.append(quantized)
    # ZeRO-1/2: the weights' partition, not the biases'; ZeRO-3: the sub-groups [W1] and [W2]
    expected = [True, False] if case.stage < 3 else [True, True, False, False]
    assert decisions == [expected] * WORLD


@pytest.mark.parametrize("case", CASES, ids=str)
def test_memory_report_counts_int8_bytes_on_each_rank(runs, case):
    for _, pieces, states, report, _ in runs(case):
        quantized = [p.numel for p, s in zip(pieces, states) if any(absmax_key(k) in s for k in s)]
        kept = [p.numel for p, s in zip(pieces, states) if not any(absmax_key(k) in s for k in s)]
        per_moment = sum(n + 4 * -(-n // QBLOCK) for n in quantized)  # a code per element, an fp32 absmax per block
        assert report.int8 == cases.MOMENTS[case.name] * per_moment
        slow = 4 * (sum(quantized) + sum(kept)) if case.name == "Ranger" else 0  # Lookahead's fp32 slow weights
        assert report.fp32 == 4 * cases.MOMENTS[case.name] * sum(kept) + slow
        counters = sum(v.numel() * v.element_size() for s in states for k, v in s.items()
                       if k in ("step", "lookahead_step"))
        assert report.counters == counters and report.total == report.int8 + report.fp32 + report.counters
        assert (report.params_int8, report.params_fp32) == (len(quantized), len(kept))
        assert report.numel == sum(p.numel for p in pieces)
        if case.name == "AdamW":  # two moments of 1 byte plus 4 / 256 of absmax each: against 8 in fp32
            assert 2.0 < report.int8 / sum(quantized) < 2.04


@pytest.mark.parametrize("case", CASES, ids=str)
def test_int8_run_stays_near_the_fp32_run(runs, case):
    (params, *_), _ = runs(case)
    fp32 = cases.plain_reference(case.name, STEPS, WORLD, state_dtype="fp32")
    for a, b, start in zip(params, fp32, cases.model().parameters(), strict=True):
        update = (b - start.detach()).norm()
        assert update > 0
        assert (a - b).norm() <= FP32_RTOL * update


@pytest.mark.parametrize("case", [Case(1, "AdamW"), Case(2, "Ranger", offload=True), Case(3, "AdamW"),
                                  Case(3, "Ranger", offload=True)], ids=str)
def test_checkpoint_resume_with_int8_state_is_bit_identical(world, tmp_path, case):
    """Saved after 3 steps and continued 3 more, against loaded into an engine built from another
    seed and continued: the state as loaded is the state as saved (codes and absmax included),
    and the params end equal."""
    root = str(tmp_path / "ds")
    straight = world.run(cases.run_checkpoint, case.stage, case.name, root, 3, 3, False, offload=case.offload)
    resumed = world.run(cases.run_checkpoint, case.stage, case.name, root, 3, 3, True, offload=case.offload)
    for (a_params, saved), (b_params, loaded) in zip(straight, resumed):
        assert any(absmax_key("exp_avg") in s for s in saved)
        for s, t in zip(saved, loaded, strict=True):
            assert s.keys() == t.keys()
            for key in s:
                assert torch.equal(s[key], t[key]), key
        for a, b in zip(a_params, b_params, strict=True):
            assert torch.equal(a, b)


def test_a_bad_state_dtype_in_a_ds_config_names_the_argument():
    with pytest.raises(ValueError, match=r"state_dtype: 'int4'"):
        dod.build_from_config({"type": "dist_optim.AdamW", "params": {"state_dtype": "int4"}},
                              [torch.nn.Parameter(torch.zeros(3))])


@pytest.mark.parametrize("stage", [2, 3])
def test_deepspeeds_optimizer_state_accessors_see_int8_moments_in_fp32(world, stage):
    """``deepspeed.utils.safe_get_full_optimizer_state`` returns each param's moment as the reference
    holds it, int8 ones dequantized (not the uint8 codes); a ``safe_set_full_optimizer_state`` is
    quantized back: reading it again gives the value set, up to the signed map's rounding (at most
    1.2% of a block's absmax; the value set is every block's largest)."""
    keys = ("exp_avg", "exp_avg_sq")
    value = torch.linspace(0.5, 1.0, cases.HIDDEN * cases.IN).reshape(cases.HIDDEN, cases.IN)
    results = world.run(cases.run_state_accessors, stage, "AdamW", 3, keys, value)
    pieces = [piece for *_, rank_pieces in results for piece in rank_pieces]
    _, ref_opt, ref_tensors = cases.layout_reference("AdamW", 3, WORLD, pieces, grouped=False)
    for got, after, _ in results:
        for key in keys:
            for a, b in zip(got[key], cases.full_moments(pieces, ref_opt, ref_tensors, key), strict=True):
                assert torch.equal(a, b), key
        assert (after - value).abs().max() <= 0.012


def test_elastic_checkpoints_are_refused_with_int8_state(world):
    """ZeRO-1/2 elastic checkpoints re-partition the live state tensors element by element, which
    int8 codes (blocks with one scale each, per rank) cannot take: refused when the engine is built."""
    for message in world.run(cases.elastic_checkpoint_refusal, 2):
        assert message is not None and "elastic_checkpoint" in message and "state_dtype='int8'" in message
