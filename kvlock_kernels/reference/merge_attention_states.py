"""Reference of ``merge_attention_states``: combine partial attentions over disjoint key sets."""
from __future__ import annotations

import torch

__all__ = ["merge_attention_states"]


def merge_attention_states(out_a, lse_a, out_b, lse_b):
    """Reference merge of two partial attentions over disjoint key sets.

    out_*: (B, S, H, D); lse_*: (B, H, S) fp32 natural-log.  Math in fp32, relative to the
    larger lse of each row (exact at any lse magnitude, as the kernel):

        m = max(lse_a, lse_b),  w_x = exp(lse_x - m),  out = (w_a out_a + w_b out_b) / (w_a + w_b)
        lse = m + log(w_a + w_b)

    Non-finite lse: -inf marks an empty partial (weight 0); both -inf give out 0 and
    lse -inf.  NaN or +inf in either lse of a row gives NaN for that row's out and lse.
    A partial whose weight is 0 is not read (NaN/inf in its out do not propagate);
    otherwise NaN/inf in out propagate per element.  Returns (out in out_a's dtype, lse fp32).
    """
    la, lb = lse_a.float(), lse_b.float()
    invalid = torch.isnan(la) | torch.isnan(lb) | torch.isposinf(la) | torch.isposinf(lb)
    la, lb = torch.where(invalid, 0.0, la), torch.where(invalid, 0.0, lb)  # the row is NaN anyway
    m = torch.maximum(la, lb)
    m = torch.where(torch.isneginf(m), torch.zeros_like(m), m)
    wa, wb = torch.exp(la - m), torch.exp(lb - m)
    total = wa + wb
    nonempty = total > 0
    inv = torch.where(nonempty, 1.0 / torch.where(nonempty, total, torch.ones_like(total)), torch.zeros_like(total))
    nan = torch.full((), float("nan"), device=la.device)
    lse = torch.where(nonempty, m + torch.log(torch.where(nonempty, total, torch.ones_like(total))),
                      torch.full((), float("-inf"), device=la.device))
    lse = torch.where(invalid, nan, lse)
    na = (wa * inv).transpose(1, 2)[..., None]
    nb = (wb * inv).transpose(1, 2)[..., None]
    zero = torch.zeros((), device=la.device)
    out = torch.where(na > 0, na * out_a.float(), zero) + torch.where(nb > 0, nb * out_b.float(), zero)
    out = torch.where(invalid.transpose(1, 2)[..., None], nan, out)
    return out.to(out_a.dtype), lse
