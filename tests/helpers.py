import os

import torch


def assert_fa_close(out, ref_fp32, ref_same_dtype, *, atol=1e-5, name="out"):
    """The flash-attention rule: the kernel's error against the fp32 reference is at most
    twice the error of the same computation done by PyTorch in the inputs' dtype."""
    err = (out.float() - ref_fp32.float()).abs().max().item()
    base = (ref_same_dtype.float() - ref_fp32.float()).abs().max().item()
    assert err <= 2 * base + atol, f"{name}: max error {err:.3g} > 2 * {base:.3g} + {atol:g}"
    return err, base


ATOL = {torch.float32: 1e-5, torch.float16: 2e-4, torch.bfloat16: 2e-3}


def make_source(source, B, S, H, D, dtype):
    """The source arguments of lock_kv / qkv_epilogue: ``source`` is "branch<i>" (batch
    entry i is the in-batch source), "stride0" (a batch-1 source expanded with batch
    stride 0), "batch1" (batch 1) or "per_entry" (one source per entry)."""
    if source.startswith("branch"):
        return dict(source_index=int(source[-1]))
    sb = B if source == "per_entry" else 1
    ks, vs = (torch.randn(sb, S, H, D).to(dtype) for _ in range(2))
    if source == "stride0":
        ks, vs = ks.expand(B, -1, -1, -1), vs.expand(B, -1, -1, -1)
    return dict(k_src=ks, v_src=vs)


def far_apart_batch(shape, dtype, *, apart=2 ** 31):
    """A (2, *shape) tensor of random values whose two batch entries lie ``apart`` elements
    apart (batch stride 2^31: int32 offsets overflow there).  A view of a lazily committed
    buffer: only the two entries' pages are touched (a few KB of a 4 GB reservation).
    Skips the test where the reservation is refused."""
    import pytest

    numel = 1
    for n in shape:
        numel *= n
    try:
        buf = torch.empty(apart + numel, dtype=dtype)
    except RuntimeError as e:  # an address-space limit, not this library's behaviour
        pytest.skip(f"cannot reserve {apart + numel} elements: {e}")
    strides = [1]
    for n in reversed(shape[1:]):
        strides.insert(0, strides[0] * n)
    t = buf.as_strided((2, *shape), (apart, *strides))
    t.copy_(torch.randn(2, *shape).to(dtype))
    return t


REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def subprocess_env(*, interpret: bool = False, **extra: str) -> dict:
    """Environment for a child process of a test: this checkout first on PYTHONPATH (the
    child imports the code under test even where another checkout is pip-installed), and
    TRITON_INTERPRET dropped unless ``interpret`` (the children run the CPU torch paths)."""
    env = {k: v for k, v in os.environ.items() if interpret or k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (REPO_ROOT, env.get("PYTHONPATH")) if p)
    env.update(extra)
    return env
