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


@triton.jit
def cast_for_store(x, ptr, INTERPRET: tl.constexpr):
    """Cast fp32 values to the element type of ``ptr`` with round-to-nearest, also under
    the interpreter (whose bf16 cast truncates)."""
    if INTERPRET:
        if ptr.dtype.element_ty == tl.bfloat16:
            x = round_to_bf16_rne(x)
    return x.to(ptr.dtype.element_ty)
