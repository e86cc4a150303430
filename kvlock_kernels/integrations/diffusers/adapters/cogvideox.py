"""CogVideoX: ``CogVideoXTransformer3DModel`` (CogVideoX 1.0 / 1.5, T2V and I2V).

Attention: every block's ``attn1`` is joint text + video self-attention with the text
tokens FIRST.  Stock math (``CogVideoXAttnProcessor2_0``, or the fused-projection
``FusedCogVideoXAttnProcessor2_0`` after ``fuse_qkv_projections``): projections of the
joint sequence, LayerNorm per head (``norm_q/norm_k``), RoPE on the video tokens only,
attention, ``to_out``, split back into video and text.  KV-Lock locks the video tokens;
text tokens carry weight 0.  The stock processor calls SDPA directly; the KV-Lock
processor calls ``dispatch_attention_fn`` with the module's backend (default: native
SDPA, the same computation), so ``set_attention_backend`` applies to it.

Loop: CogVideoX checkpoints are DDPM v-prediction models.  The editor runs the KV-Lock
loop in that form: the source branch is the source latent noised to each timestep by the
scheduler's own ``add_noise`` (fixed noise), x0-hat = sqrt(abar_t) z_t - sqrt(1 - abar_t) v,
and the scheduler's own ``step`` (CogVideoXDDIMScheduler / DDIMScheduler, or
CogVideoXDPMScheduler with its two-sample step).  The stock CogVideoXPipeline's batch is
[uncond, cond]: a branch plan (which needs batch entry 0 to be a source) refuses it.
Rotary embeddings (``use_rotary_positional_embeddings``) come in
``transformer_kwargs={"image_rotary_emb": ...}``, built as the pipeline builds them.
"""
from __future__ import annotations

import torch

from ..processors import KVLockProcessor, epilogue, norm_spec
from .base import LoopContext, ModelAdapter


class KVLockCogVideoXAttnProcessor(KVLockProcessor):
    """``CogVideoXAttnProcessor2_0`` (and its fused-projection twin) with KV-Lock."""

    def __call__(self, attn, hidden_states, encoder_hidden_states, attention_mask=None, image_rotary_emb=None):
        plan = self.plan
        self._check_mask(plan, attention_mask, allowed=False)
        if attn.is_cross_attention:
            raise ValueError("KV-Lock patches CogVideoX's joint self-attention (attn1) only")
        text = encoder_hidden_states.size(1)
        hidden_states = torch.cat([encoder_hidden_states, hidden_states], dim=1)
        B, S, _ = hidden_states.shape
        if attention_mask is not None:  # off mode only (checked above): as the stock processor
            attention_mask = attn.prepare_attention_mask(attention_mask, S, B)
            attention_mask = attention_mask.view(B, attn.heads, -1, attention_mask.shape[-1])
        if getattr(attn, "fused_projections", False):
            qkv = attn.to_qkv(hidden_states)
            query, key, value = torch.split(qkv, qkv.shape[-1] // 3, dim=-1)
        else:
            query, key, value = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
        heads = attn.heads
        head_dim = key.shape[-1] // heads
        nq = norm_spec(attn.norm_q, heads, head_dim, "norm_q")
        nk = norm_spec(attn.norm_k, heads, head_dim, "norm_k")
        cos, sin = image_rotary_emb if image_rotary_emb is not None else (None, None)
        tq, tk, tv = epilogue(query[:, :text], key[:, :text], value[:, :text], heads=heads, norm_q=nq, norm_k=nk,
                              backend=self._install.epilogue_backend)
        vq, vk, vv = self.video_epilogue(query[:, text:], key[:, text:], value[:, text:], heads=heads, norm_q=nq,
                                         norm_k=nk, rope="interleaved" if image_rotary_emb is not None else "none",
                                         cos=cos, sin=sin)
        query, key, value = (torch.cat(pair, dim=1) for pair in ((tq, vq), (tk, vk), (tv, vv)))
        out = self.attend(query, key, value, attention_mask, video_start=text, video_len=S - text)
        out = out.reshape(B, -1, heads * head_dim).type_as(query)
        out = attn.to_out[1](attn.to_out[0](out))
        encoder_hidden_states, hidden_states = out.split([text, S - text], dim=1)
        return hidden_states, encoder_hidden_states


class CogVideoXAdapter(ModelAdapter):
    name = "cogvideox"
    family = "CogVideoX (CogVideoXTransformer3DModel)"
    model_class_paths = ("diffusers.models.transformers.cogvideox_transformer_3d:CogVideoXTransformer3DModel",)
    stock_processor_paths = ("diffusers.models.attention_processor:CogVideoXAttnProcessor2_0",
                             "diffusers.models.attention_processor:FusedCogVideoXAttnProcessor2_0")
    prediction = "v_prediction"
    input_layout = "bfchw"
    supports_context_parallel = False  # diffusers has no _cp_plan for CogVideoX
    processor_cls = KVLockCogVideoXAttnProcessor

    def attention_modules(self, transformer):
        blocks = transformer.transformer_blocks
        return [(f"transformer_blocks.{i}.attn1", block.attn1) for i, block in enumerate(blocks)]

    def patch_size(self, transformer):
        p = int(transformer.config.patch_size)
        pt = transformer.config.patch_size_t
        return (1 if pt is None else int(pt), p, p)

    def loop_context(self, transformer, source_latents, *, condition=None, transformer_kwargs=None, **unused):
        if unused:
            raise TypeError(f"{self.family} editing takes condition and transformer_kwargs; got unexpected "
                            f"{sorted(unused)}")
        kwargs = dict(transformer_kwargs or {})
        config = transformer.config
        C = source_latents.shape[1]
        extra = int(config.in_channels) - C
        if extra > 0 and condition is None:
            raise ValueError(f"this CogVideoX transformer takes {config.in_channels} input channels: {C} latent "
                             f"channels plus {extra} image-conditioning channels (CogVideoX I2V); pass "
                             f"condition=(1, {extra}, F, H, W) as CogVideoXImageToVideoPipeline prepares them")
        if extra <= 0 and condition is not None:
            raise ValueError("condition is for CogVideoX I2V transformers (in_channels > latent channels)")
        if extra < 0:
            raise ValueError(f"source_latents have {C} channels but the transformer takes {config.in_channels}")
        if condition is not None and tuple(condition.shape) != (1, extra) + tuple(source_latents.shape[2:]):
            raise ValueError(f"condition must be (1, {extra}, F, H, W) = {(1, extra) + tuple(source_latents.shape[2:])}"
                             f", got {tuple(condition.shape)}")
        if config.use_rotary_positional_embeddings and kwargs.get("image_rotary_emb") is None:
            raise ValueError("this CogVideoX transformer uses rotary positional embeddings: pass transformer_kwargs="
                             "{'image_rotary_emb': (cos, sin)} built as CogVideoXPipeline."
                             "_prepare_rotary_positional_embeddings(height, width, num_latent_frames, device) does")
        return LoopContext(condition=condition, transformer_kwargs=kwargs)

    def model_inputs(self, transformer, latents, t, embeds, ctx, branch_kwargs):
        if ctx.condition is not None:
            latents = torch.cat([latents, ctx.condition.to(latents.dtype).expand(latents.shape[0], -1, -1, -1, -1)],
                                dim=1)
        return super().model_inputs(transformer, latents, t, embeds, ctx, branch_kwargs)


ADAPTER = CogVideoXAdapter()
