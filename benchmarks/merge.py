"""merge_attention_states section: correctness and timing against the eager merge."""
from __future__ import annotations

import torch

from kvlock_kernels import merge_attention_states, reference

from .common import bytes_row


def make_merge_inputs(B, S, H, D, device, dtype=torch.bfloat16, seed=0):
    g = torch.Generator().manual_seed(seed)
    a, b = (torch.randn(B, S, H, D, generator=g).to(device, dtype) for _ in range(2))
    la, lb = (torch.randn(B, H, S, generator=g).to(device) * 3 for _ in range(2))
    return a, la, b, lb


def eager_merge(a, la, b, lb):
    """The eager PyTorch merge a pipeline would write (max-subtracted, fp32 math)."""
    m = torch.maximum(la, lb)
    wa, wb = torch.exp(la - m), torch.exp(lb - m)
    total = wa + wb
    out = ((wa / total).transpose(1, 2)[..., None] * a.float()
           + (wb / total).transpose(1, 2)[..., None] * b.float())
    return out.to(a.dtype), m + torch.log(total)


def check(device) -> tuple[bool, str]:
    a, la, b, lb = make_merge_inputs(2, 70, 3, 80, device)
    out, lse = merge_attention_states(a, la, b, lb, backend="triton")
    ref, ref_lse = reference.merge_attention_states(a.float(), la, b.float(), lb)
    err = (out.float() - ref).abs().max().item()
    lse_err = (lse - ref_lse).abs().max().item()
    ok = err <= 2 ** -8 * ref.abs().max().item() and lse_err <= 1e-5
    return ok, f"max err {err:.2e} (out), {lse_err:.2e} (lse)"


def merge_bytes(B, S, H, D, elem=2):
    """fused: read two partial outputs and lses, write one of each.  eager (reference):
    upcasts, exp weights, two products and a sum over fp32 copies, one downcast."""
    n = B * S * H * D
    lse = B * H * S * 4
    fused = 3 * n * elem + 3 * lse
    eager = 2 * n * (elem + 4) + 6 * lse + 2 * (2 * n * 4 + n * 4) + 3 * n * 4 + n * (4 + elem)
    return fused, eager


def run(shape, device, peaks, repeats):
    B, S, H, D = shape
    a, la, b, lb = make_merge_inputs(B, S, H, D, device)
    fused_b, eager_b = merge_bytes(B, S, H, D)
    cuda = device.type == "cuda"
    rows = []
    for name, fn, nbytes in (
            ("kvlock (Triton, fused)", (lambda: merge_attention_states(a, la, b, lb, backend="triton")) if cuda
             else None, fused_b),
            ("kvlock backend=torch", lambda: merge_attention_states(a, la, b, lb, backend="torch"), eager_b),
            ("eager PyTorch", lambda: eager_merge(a, la, b, lb), eager_b)):
        row = dict(op="merge_attention_states", shape=f"B{B} S{S} H{H} D{D}", provider=name)
        if fn is None:
            rows.append(dict(row, status="unavailable: Triton needs a GPU"))
            continue
        rows.append(bytes_row(row, fn, nbytes, device, peaks, repeats))
    return rows, eager_b / fused_b
