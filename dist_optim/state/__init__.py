"""State formats: how optimizer state may be stored in fewer bytes (issue 12) — block-wise 8-bit
quantization with per-block fp32 absmax (``blockwise``, code maps in ``codes``), stochastic
rounding and Kahan compensation for bf16 weights (``rounding``), conversions and re-blocking for
checkpoints (``checkpoint``), byte accounting (``accounting``).

These are torch references; triton_kernels._quant holds the in-kernel versions, equal bit for bit.
This layer imports torch (and may use triton_kernels' launchers), never the optimizers.

The int8 format an optimizer's state is to take (``state_dtype="int8"``):
- which maps: first moments (Adam exp_avg, SGD momentum_buffer, RMSprop grad_avg and
  momentum_buffer) use ``codes.SIGNED``, second moments (Adam exp_avg_sq and max_exp_avg_sq,
  Adagrad sum, RMSprop square_avg) ``codes.UNSIGNED``; block 256 (``MAX_BLOCK``);
- per state tensor of a param's local shard of n elements: ``codes`` uint8 [n] (shaped like the
  flat shard) and ``absmax`` fp32 [ceil(n / block)], block 0 starting at the shard's element 0;
  params of fewer than ``MIN_QUANTIZED_NUMEL`` elements in all (decided on the full param, so all
  ranks agree) keep fp32 state;
- kernels: a tile must hold whole quantization blocks and start on one (block | BLOCK and
  block | CHUNK, see triton_kernels._quant); elements past a tensor's end enter the quantizer
  as 0.0;
- checkpoints: the block layout depends on the shard boundaries, so int8 state saved by one
  world size is not a slice of the same global tensor for another. dist_optim.optim._state_dict
  saves codes and absmax laid out by the param's shape where every shard boundary is a block
  boundary at any world size (lossless resharding), and the fp32 form elsewhere; ``reblock`` and
  ``dequantize_pieces`` re-form blocks between flat layouts (DeepSpeed's universal form), lossless
  when all boundaries are multiples of the block, otherwise one more rounding, bounded in
  ``checkpoint``.
"""

from .accounting import MIN_QUANTIZED_NUMEL, StateBytes, int8_state_bytes, quantizes, state_bytes, tensor_bytes
from .blockwise import MAX_BLOCK, dequantize_blockwise, error_bound, quantize_blockwise
from .checkpoint import reblock, to_fp32, to_int8
from .codes import SIGNED, UNSIGNED, thresholds
from .rounding import hash32, kahan_add_bf16, round_nearest_bf16, stochastic_round_bf16, stream_seed

__all__ = [
    "MAX_BLOCK", "MIN_QUANTIZED_NUMEL", "SIGNED", "StateBytes", "UNSIGNED", "dequantize_blockwise", "error_bound",
    "hash32", "int8_state_bytes", "kahan_add_bf16", "quantize_blockwise", "quantizes", "reblock",
    "round_nearest_bf16", "state_bytes", "stochastic_round_bf16", "stream_seed", "tensor_bytes", "thresholds",
    "to_fp32", "to_int8",
]
