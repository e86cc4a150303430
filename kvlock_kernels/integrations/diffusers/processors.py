"""KV-Lock attention processors: the stock processor's math with one change.

Every family's processor (in its adapter file) does what the stock diffusers processor
does (projections through the module's public attributes, QK norm, RoPE, attention, output
projection) with one change: norm, RoPE and the lock run in one fused pass,
``kvlock_kernels.attention.epilogue.qkv_epilogue`` (the PyTorch path on CPU, bit for bit
the stock q/k/v without a lock; the Triton kernel on CUDA), which returns the locked K/V
of the video tokens.  Attention is then diffusers' own ``dispatch_attention_fn`` with the
module's ``_attention_backend`` and ``_parallel_config``, exactly as the stock processor
calls it: ``set_attention_backend`` and context parallelism keep working with KV-Lock on.

With ``attention="fused"`` (an ``enable_kvlock`` option) the epilogue runs without the
lock and the library's single-pass kernel ``kv_lock_attention`` blends K/V inside the
attention loop instead; under context parallelism it runs inside KV-Lock's own Ulysses
all-to-all or ring (``parallel.py``).

The processors read the plan the editor installed (``plan.py``); they write no state of
their own.  Capture mode stores the source entry's K/V in the plan's cache.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from ...attention.epilogue import qkv_epilogue as _qkv_epilogue_op
from ...attention.kv_lock_attention import kv_lock_attention
from ...attention.lock_kv import lock_kv
from . import parallel
from .plan import SOURCE_INDEX, KVLockPlan

__all__ = ["KVLockProcessor", "NormSpec", "norm_spec", "epilogue"]


class NormSpec:
    """How a QK-norm module normalises: the epilogue's ``norm`` kind and its parameters."""

    __slots__ = ("kind", "weight", "bias", "eps")

    def __init__(self, kind: str, weight=None, bias=None, eps=None):
        self.kind, self.weight, self.bias, self.eps = kind, weight, bias, eps


def norm_spec(module, heads: int, head_dim: int, where: str) -> NormSpec:
    """The epilogue norm matching a diffusers QK-norm module (None: no norm).

    torch.nn.RMSNorm over heads*D (Wan) -> "rms_across_heads"; diffusers' RMSNorm over D
    (HunyuanVideo) -> "rms_per_head"; nn.LayerNorm over D (CogVideoX) -> "layer_per_head".
    Anything else is refused: KV-Lock would not reproduce the stock math.
    """
    if module is None:
        return NormSpec("none")
    from diffusers.models.normalization import RMSNorm as DiffusersRMSNorm

    if isinstance(module, torch.nn.RMSNorm) and tuple(module.normalized_shape) == (heads * head_dim,):
        return NormSpec("rms_across_heads", module.weight, None, module.eps)
    if isinstance(module, DiffusersRMSNorm) and tuple(module.dim) == (head_dim,):
        return NormSpec("rms_per_head", module.weight, module.bias, module.eps)
    if isinstance(module, torch.nn.LayerNorm) and tuple(module.normalized_shape) == (head_dim,):
        return NormSpec("layer_per_head", module.weight, module.bias, module.eps)
    raise TypeError(f"KV-Lock cannot reproduce the QK norm {where} ({type(module).__name__}"
                    f"{getattr(module, 'normalized_shape', '')}) with heads={heads}, head_dim={head_dim}: supported "
                    "are torch.nn.RMSNorm over heads*head_dim, diffusers' RMSNorm and nn.LayerNorm over head_dim")


def _epilogue_backend(x: torch.Tensor, backend: str) -> str:
    # On CPU the PyTorch path (bit for bit the stock math); the kernel where it pays.
    if backend == "auto" and x.device.type != "cuda":
        return "torch"
    return backend


def epilogue(q, k, v, *, heads: int, norm_q: NormSpec, norm_k: NormSpec, rope: str = "none", cos=None, sin=None,
             lock=None, k_src=None, v_src=None, source_index=None, backend: str = "auto"):
    """Norm + RoPE (+ lock) of one token segment: q, k, v (B, S, heads*D) projection
    outputs -> (B, S, heads, D) attention-ready q, K', V'."""
    if norm_q.kind != norm_k.kind:
        raise TypeError(f"q and k norms differ ({norm_q.kind} vs {norm_k.kind}): not a supported layout")
    kwargs = dict(heads=heads, norm=norm_q.kind, norm_q_weight=norm_q.weight, norm_q_bias=norm_q.bias,
                  norm_k_weight=norm_k.weight, norm_k_bias=norm_k.bias, norm_eps=norm_q.eps, rope=rope,
                  rope_cos=cos, rope_sin=sin, lock=lock, k_src=k_src, v_src=v_src, source_index=source_index)
    # Lock weights are built in [0, 1] by the plan: no per-layer host read of them.
    return _qkv_epilogue_op(q, k, v, backend=_epilogue_backend(q, backend), check_inputs=False, **kwargs)


def _dispatch_fn(family_module):
    """diffusers' ``dispatch_attention_fn``, looked up where the stock processor looks it up
    (its model module's global, when something replaced it there), else
    ``attention_dispatch``'s attribute (which a caller may have wrapped).
    ``family_module``: the module object or None."""
    from diffusers.models import attention_dispatch

    fn = None if family_module is None else getattr(family_module, "dispatch_attention_fn", None)
    if fn is None or _is_diffusers_dispatch(fn, attention_dispatch):
        return attention_dispatch.dispatch_attention_fn
    return fn


def _is_diffusers_dispatch(fn, attention_dispatch) -> bool:
    """``fn`` is diffusers' own function (the module global every family imports), not a wrapper."""
    return (getattr(fn, "__module__", None) == attention_dispatch.__name__
            and getattr(fn, "__name__", None) == "dispatch_attention_fn" and not hasattr(fn, "__wrapped__"))


class KVLockProcessor:
    """Base of the family processors: plan access, the lock's source, capture, attention.

    ``_attention_backend`` and ``_parallel_config`` are the attributes diffusers'
    ``set_attention_backend`` and ``enable_parallelism`` set on processors; a KV-Lock
    processor takes them over from the processor it replaces and passes them to
    ``dispatch_attention_fn`` as the stock processor does.
    """

    _attention_backend = None
    _parallel_config = None

    def __init__(self, install, layer: int, replaced=None):
        self._install = install  # the transformer's KV-Lock install: plan slot and options (read only)
        self.layer = layer
        self._replaced = replaced  # the processor disable_kvlock puts back
        for name in ("_attention_backend", "_parallel_config"):
            value = getattr(replaced, name, None)
            if value is not None:
                setattr(self, name, value)

    # ------------------------------------------------------------------ plan
    @property
    def plan(self) -> KVLockPlan:
        return self._install.plan

    def _check_mask(self, plan: KVLockPlan, attention_mask, allowed: bool) -> None:
        if attention_mask is not None and plan.mode != "off" and not allowed:
            raise ValueError(f"KV-Lock got an attention mask on a locked self-attention layer (layer {self.layer}, "
                             f"mode {plan.mode!r}): the locked layers take no attention mask; run with "
                             "set_plan(transformer, KVLockPlan.off()) or without the mask")
        if attention_mask is not None and self._install.attention == "fused":
            raise ValueError("attention='fused' (kv_lock_attention) takes no attention mask; "
                             "use enable_kvlock(..., attention='diffusers')")

    # ------------------------------------------------------------------ the video segment
    def video_epilogue(self, q, k, v, *, heads: int, norm_q: NormSpec, norm_k: NormSpec, rope: str = "none",
                       cos=None, sin=None, rope_fn=None):
        """Norm + RoPE of the video tokens, with the plan's lock applied to K/V when
        attention runs through diffusers (the fused kernel blends inside attention).
        ``rope_fn(q, k) -> (q, k)`` on (B, S, H, D): a family's own RoPE in place of the
        epilogue's (the lock then follows it as ``lock_kv``)."""
        plan = self.plan
        lock = k_src = v_src = source_index = None
        if plan.mode == "lock" and self._install.attention == "diffusers":
            lock, k_src, v_src, source_index = self.lock_source(plan, q.shape[0], q.shape[1])
        backend = self._install.epilogue_backend
        if rope_fn is None:
            q, k, v = epilogue(q, k, v, heads=heads, norm_q=norm_q, norm_k=norm_k, rope=rope, cos=cos, sin=sin,
                               lock=lock, k_src=k_src, v_src=v_src, source_index=source_index, backend=backend)
        else:
            q, k, v = epilogue(q, k, v, heads=heads, norm_q=norm_q, norm_k=norm_k, backend=backend)
            q, k = rope_fn(q, k)
            if lock is not None:
                k, v = lock_kv(k, v, lock, k_src=k_src, v_src=v_src, source_index=source_index,
                               backend=_epilogue_backend(k, backend), check_inputs=False)
        if k_src is not None:
            self.release_source(plan)
        if plan.mode == "capture":
            plan.cache.put((plan.step, self.layer), k[SOURCE_INDEX], v[SOURCE_INDEX])
        return q, k, v

    def lock_source(self, plan: KVLockPlan, batch: int, num_video: int):
        """(lock (1, S_local) fp32, k_src, v_src, source_index) for this call's video
        tokens; under context parallelism the rank's shard, cut as diffusers cuts the
        sequence."""
        lock = plan.lock
        cp = parallel.cp_config(self)
        if lock.shape[1] != num_video:
            lock = parallel.shard_tokens(lock, 1, cp, name="lock weights", expected=num_video, layer=self.layer)
        if plan.source == "branch":
            plan.check_batch(batch, where="this attention call")  # (no self.layer read: compile guards)
            return lock, None, None, SOURCE_INDEX
        k_src, v_src = plan.cache.get((plan.step, self.layer))  # a plan's cache is never compact
        if k_src.shape[0] != num_video:
            k_src = parallel.shard_tokens(k_src, 0, cp, name="cached source K", expected=num_video, layer=self.layer)
            v_src = parallel.shard_tokens(v_src, 0, cp, name="cached source V", expected=num_video, layer=self.layer)
        return lock, k_src[None], v_src[None], None

    def release_source(self, plan: KVLockPlan) -> None:
        """After the cached source K/V were used: free their slot for the next prefetch
        (``discard_after_use``, one model call per step as in KVLockEditor)."""
        if plan.mode == "lock" and plan.source == "cache" and plan.discard_after_use:
            plan.cache.discard((plan.step, self.layer))

    # ------------------------------------------------------------------ attention
    def attend(self, q, k, v, attention_mask=None, *, video_start: int = 0, video_len: Optional[int] = None):
        """Attention of (B, S, H, D) q, K', V' exactly as the stock processor calls it:
        ``dispatch_attention_fn`` with the module's backend and parallel config; or
        KV-Lock's fused kernel.  [video_start, video_start + video_len) are the video
        tokens (the locked ones) inside the sequence."""
        if self._install.attention == "diffusers":
            dispatch = _dispatch_fn(self._install.dispatch_module.module)
            return dispatch(q, k, v, attn_mask=attention_mask, dropout_p=0.0, is_causal=False,
                            backend=self._attention_backend, parallel_config=self._parallel_config)
        plan = self.plan
        lock = k_src = v_src = None
        if plan.mode == "lock":
            video_len = q.shape[1] - video_start if video_len is None else video_len
            lock, k_src, v_src, source_index = self.lock_source(plan, q.shape[0], video_len)
            tail = k.shape[1] - video_start - video_len
            if video_start or tail:  # text tokens: weight 0, their source values are never read
                lock = F.pad(lock, (video_start, tail))
            if source_index is not None:
                k_src, v_src = k[source_index:source_index + 1], v[source_index:source_index + 1]
            elif video_start or tail:
                k_src = torch.cat([k[:1, :video_start], k_src.to(k.dtype), k[:1, video_start + video_len:]], dim=1)
                v_src = torch.cat([v[:1, :video_start], v_src.to(v.dtype), v[:1, video_start + video_len:]], dim=1)
        cp = parallel.cp_config(self)
        backend = self._install.kernel_backend
        if cp is not None:
            out = parallel.context_parallel_kv_lock_attention(q, k, v, k_src, v_src, lock, cp, backend=backend)
        elif lock is None:
            out = kv_lock_attention(q, k, v, backend=backend)
        else:
            # Lock weights are built in [0, 1] by the plan: no host-side value check.  The batch-1
            # source is expanded by the op (an in-batch one is then read in place).
            out = kv_lock_attention(q, k, v, k_src, v_src, lock, backend=backend, check_inputs=False)
        self.release_source(plan)
        return out
