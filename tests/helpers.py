import torch


def assert_fa_close(out, ref_fp32, ref_same_dtype, *, atol=1e-5, name="out"):
    """The flash-attention rule: the kernel's error against the fp32 reference is at most
    twice the error of the same computation done by PyTorch in the inputs' dtype."""
    err = (out.float() - ref_fp32.float()).abs().max().item()
    base = (ref_same_dtype.float() - ref_fp32.float()).abs().max().item()
    assert err <= 2 * base + atol, f"{name}: max error {err:.3g} > 2 * {base:.3g} + {atol:g}"
    return err, base


ATOL = {torch.float32: 1e-5, torch.float16: 2e-4, torch.bfloat16: 2e-3}
