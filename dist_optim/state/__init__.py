"""State formats: how optimizer state may be stored in fewer bytes (issue 12) — block-wise 8-bit
quantization with per-block fp32 absmax (``blockwise``, code maps in ``codes``), stochastic
rounding and Kahan compensation for bf16 weights (``rounding``), conversions and re-blocking for
checkpoints (``checkpoint``), byte accounting (``accounting``).

These are torch references; triton_kernels._quant holds the in-kernel versions, equal bit for bit.
This layer imports torch (and may use triton_kernels' launchers), never the optimizers.
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
