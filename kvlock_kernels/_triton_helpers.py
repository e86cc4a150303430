"""Triton device helpers shared by the kernels."""
import triton
import triton.language as tl


@triton.jit
def round_to_bf16_rne(x):
    """Round fp32 to the nearest bf16 value (ties to even), kept in fp32.

    The interpreter's fp32 -> bf16 cast truncates; GPUs round to nearest.  Rounding
    first makes the truncating cast exact, so interpreter results match GPU numerics.
    """
    bits = x.to(tl.uint32, bitcast=True)
    bits = bits + 0x7FFF + ((bits >> 16) & 1)
    return (bits & 0xFFFF0000).to(tl.float32, bitcast=True)
