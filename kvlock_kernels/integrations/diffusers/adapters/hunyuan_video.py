"""HunyuanVideo: ``HunyuanVideoTransformer3DModel`` (T2V; the I2V variants with
``image_condition_type``).

Attention: joint text + video attention with the text tokens LAST, in both block kinds,
all locked:
- dual-stream ``transformer_blocks[i].attn``: video q/k/v from ``to_q/to_k/to_v`` with
  RMSNorm per head and RoPE, text q/k/v from ``add_*_proj`` with ``norm_added_*``, joined
  as [video, text];
- single-stream ``single_transformer_blocks[i].attn``: one projection of the joined
  [video, text] sequence, RMSNorm per head, RoPE on the video tokens.
Stock math ``HunyuanVideoAttnProcessor2_0``, then ``dispatch_attention_fn`` with the
module's backend and parallel config.  Video tokens are locked, text tokens carry weight
0.  The model always passes its own key-padding mask (text padding) to these layers:
KV-Lock passes it on (it masks keys; the lock changes key/value contents), so this family
needs ``attention="diffusers"`` (the fused kernel takes no mask).  Layer indices: dual
blocks first, then single blocks.

Loop: flow matching (FlowMatchEulerDiscreteScheduler).  HunyuanVideo's text conditioning
is per branch: ``encoder_attention_mask`` and ``pooled_projections`` go in the editor's
``prompt_kwargs`` / ``negative_prompt_kwargs`` / ``source_prompt_kwargs``; ``guidance``
(guidance-distilled checkpoints) in ``transformer_kwargs``.
"""
from __future__ import annotations

import torch

from ..processors import KVLockProcessor, epilogue, norm_spec
from .base import ModelAdapter


class KVLockHunyuanVideoAttnProcessor(KVLockProcessor):
    """``HunyuanVideoAttnProcessor2_0`` with KV-Lock (dual- and single-stream blocks)."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None):
        plan = self.plan
        self._check_mask(plan, attention_mask, allowed=True)
        if encoder_hidden_states is None:
            raise ValueError("KV-Lock patches HunyuanVideo's joint text + video attention, which takes "
                             "encoder_hidden_states")
        text = encoder_hidden_states.shape[1]
        heads = attn.heads
        single = attn.add_q_proj is None
        video = hidden_states.shape[1]
        if single:
            hidden_states = torch.cat([hidden_states, encoder_hidden_states], dim=1)
        query, key, value = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
        head_dim = query.shape[-1] // heads
        nq = norm_spec(attn.norm_q, heads, head_dim, "norm_q")
        nk = norm_spec(attn.norm_k, heads, head_dim, "norm_k")
        cos, sin = image_rotary_emb if image_rotary_emb is not None else (None, None)
        rope = "interleaved" if image_rotary_emb is not None else "none"
        vq, vk, vv = self.video_epilogue(query[:, :video], key[:, :video], value[:, :video], heads=heads, norm_q=nq,
                                         norm_k=nk, rope=rope, cos=cos, sin=sin)
        if single:
            tq, tk, tv = epilogue(query[:, video:], key[:, video:], value[:, video:], heads=heads, norm_q=nq,
                                  norm_k=nk, backend=self._install.epilogue_backend)
        else:
            tq, tk, tv = epilogue(attn.add_q_proj(encoder_hidden_states), attn.add_k_proj(encoder_hidden_states),
                                  attn.add_v_proj(encoder_hidden_states), heads=heads,
                                  norm_q=norm_spec(attn.norm_added_q, heads, head_dim, "norm_added_q"),
                                  norm_k=norm_spec(attn.norm_added_k, heads, head_dim, "norm_added_k"),
                                  backend=self._install.epilogue_backend)
        query, key, value = (torch.cat(pair, dim=1) for pair in ((vq, tq), (vk, tk), (vv, tv)))
        out = self.attend(query, key, value, attention_mask, video_start=0, video_len=video)
        out = out.flatten(2, 3).to(query.dtype)
        hidden_states, encoder_hidden_states = out[:, :-text], out[:, -text:]
        if getattr(attn, "to_out", None) is not None:
            hidden_states = attn.to_out[1](attn.to_out[0](hidden_states))
        if getattr(attn, "to_add_out", None) is not None:
            encoder_hidden_states = attn.to_add_out(encoder_hidden_states)
        return hidden_states, encoder_hidden_states


class HunyuanVideoAdapter(ModelAdapter):
    name = "hunyuan_video"
    family = "HunyuanVideo (HunyuanVideoTransformer3DModel)"
    model_class_paths = ("diffusers.models.transformers.transformer_hunyuan_video:HunyuanVideoTransformer3DModel",)
    stock_processor_paths = ("diffusers.models.transformers.transformer_hunyuan_video:HunyuanVideoAttnProcessor2_0",)
    prediction = "flow"
    input_layout = "bcfhw"
    model_attention_mask = True
    supports_context_parallel = False  # diffusers has no _cp_plan for HunyuanVideo
    dispatch_module = "diffusers.models.transformers.transformer_hunyuan_video"
    processor_cls = KVLockHunyuanVideoAttnProcessor
    #: per-branch inputs the model needs besides the text embeddings
    branch_inputs = ("encoder_attention_mask", "pooled_projections")

    def attention_modules(self, transformer):
        dual = [(f"transformer_blocks.{i}.attn", b.attn) for i, b in enumerate(transformer.transformer_blocks)]
        single = [(f"single_transformer_blocks.{i}.attn", b.attn)
                  for i, b in enumerate(transformer.single_transformer_blocks)]
        return dual + single

    def patch_size(self, transformer):
        p = int(transformer.config.patch_size)
        return (int(transformer.config.patch_size_t), p, p)


ADAPTER = HunyuanVideoAdapter()
