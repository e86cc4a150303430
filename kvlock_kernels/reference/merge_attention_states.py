"""Reference of ``merge_attention_states``: combine partial attentions over disjoint key sets."""
from __future__ import annotations

import torch

__all__ = ["merge_attention_states"]


def merge_attention_states(out_a, lse_a, out_b, lse_b):
    """Reference merge of two partial attentions over disjoint key sets.

    out_*: (B, S, H, D); lse_*: (B, H, S) fp32 natural-log.  Math in fp32; an lse of
    -inf marks an empty partial (weight 0).  Returns (out in out_a's dtype, lse fp32).
    """
    la, lb = lse_a.float(), lse_b.float()
    lse = torch.logaddexp(la, lb)
    # Both -inf: keep weights finite (0) instead of NaN.
    safe = torch.where(torch.isinf(lse) & (lse < 0), torch.zeros_like(lse), lse)
    wa = torch.exp(la - safe).transpose(1, 2)[..., None]
    wb = torch.exp(lb - safe).transpose(1, 2)[..., None]
    out = wa * out_a.float() + wb * out_b.float()
    return out.to(out_a.dtype), lse
