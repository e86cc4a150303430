import pytest
import torch
from helpers import ATOL

from kvlock_kernels import kv_lock_attention, merge_attention_states, reference


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("layout", ["bshd", "bhsd"])
def test_merge_of_two_halves_is_attention_over_the_whole(backend, dtype, layout):
    B, Sq, Skv, H, D = 3, 37, 130, 2, 72
    q = torch.randn(B, Sq, H, D).to(dtype)
    k = torch.randn(B, Skv, H, D).to(dtype)
    v = torch.randn(B, Skv, H, D).to(dtype)
    ks, vs = torch.randn_like(k), torch.randn_like(v)
    lock = torch.rand(B, Skv)
    split = 57
    tr = (lambda t: t.transpose(1, 2).contiguous()) if layout == "bhsd" else (lambda t: t)
    parts = []
    for sl in (slice(0, split), slice(split, Skv)):
        parts += list(kv_lock_attention(tr(q), tr(k[:, sl]), tr(v[:, sl]), tr(ks[:, sl]), tr(vs[:, sl]),
                                        lock[:, sl], layout=layout, return_lse=True, backend="torch"))
    out, lse = merge_attention_states(*parts, layout=layout, backend=backend)
    whole, whole_lse = reference.kv_lock_attention(q, k, v, ks, vs, lock, return_lse=True)
    whole_same = reference.kv_lock_attention(q, k, v, ks, vs, lock, upcast=False)
    assert out.dtype == dtype and out.shape == tr(q).shape
    out_bshd = out.transpose(1, 2) if layout == "bhsd" else out
    # Two roundings of the partial outputs to the dtype, then the merge: allow 3x.
    err = (out_bshd.float() - whole).abs().max().item()
    base = (whole_same.float() - whole).abs().max().item()
    assert err <= 3 * base + ATOL[dtype], (err, base)
    # The partial lse come from the bf16 torch path (lock rounded to bf16): 2e-3 there.
    torch.testing.assert_close(lse, whole_lse, atol=1e-4 if dtype == torch.float32 else 2e-3, rtol=1e-5)


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_merge_with_empty_partials(backend):
    B, S, H, D = 1, 5, 2, 16
    a = torch.randn(B, S, H, D)
    b = torch.randn(B, S, H, D)
    la = torch.randn(B, H, S)
    lb = torch.full((B, H, S), float("-inf"))
    out, lse = merge_attention_states(a, la, b, lb, backend=backend)
    torch.testing.assert_close(out, a)
    torch.testing.assert_close(lse, la)
    out, lse = merge_attention_states(a, lb, b, lb.clone(), backend=backend)  # both empty
    assert torch.equal(out, torch.zeros_like(a))
    assert torch.isneginf(lse).all()


def test_merge_kernel_matches_reference_merge():
    B, S, H, D = 2, 70, 3, 80
    a, b = torch.randn(B, S, H, D).half(), torch.randn(B, S, H, D).half()
    la, lb = torch.randn(B, H, S) * 5, torch.randn(B, H, S) * 5
    out, lse = merge_attention_states(a, la, b, lb, backend="triton")
    ref, ref_lse = reference.merge_attention_states(a, la, b, lb)
    torch.testing.assert_close(lse, ref_lse)
    torch.testing.assert_close(out, ref, atol=1e-3, rtol=1e-3)


@pytest.mark.parametrize("args, msg", [
    (lambda a, lse: (a, lse, a[:, :4], lse), "out_b must match out_a"),
    (lambda a, lse: (a, lse, a, lse[:, :1]), r"lse_b must have shape \(B, H, S\)"),
    (lambda a, lse: (a, lse.half(), a, lse), "lse_a must have dtype"),
    (lambda a, lse: (a, lse, a.double(), lse), "out_b must have dtype"),
])
def test_merge_bad_input(args, msg):
    a, lse = torch.randn(1, 6, 2, 16), torch.randn(1, 2, 6)
    with pytest.raises((ValueError, TypeError), match=msg):
        merge_attention_states(*args(a, lse))


def test_merge_compiles_fullgraph():
    a, b = torch.randn(1, 9, 2, 16), torch.randn(1, 9, 2, 16)
    la, lb = torch.randn(1, 2, 9), torch.randn(1, 2, 9)
    fn = torch.compile(lambda *t: merge_attention_states(*t)[0] * 2, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(fn(a, la, b, lb), 2 * reference.merge_attention_states(a, la, b, lb)[0])
