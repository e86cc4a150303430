"""Wan: ``WanTransformer3DModel`` (Wan2.1 T2V and I2V, Wan2.2 A14B experts, Wan2.2 TI2V-5B).

Attention: every block's ``attn1`` (self-attention over the video tokens, no text) is
locked; ``attn2`` (text cross-attention, and Wan2.1 I2V's image cross-attention through
``add_k_proj``) is untouched.  Stock math (``WanAttnProcessor``): q/k/v projections (fused
``to_qkv`` when ``fuse_qkv_projections`` ran), RMSNorm over all heads (``norm_q/norm_k``),
interleaved RoPE from the model's ``rotary_emb`` tables, ``dispatch_attention_fn`` with
the module's backend and parallel config, ``to_out``.

Loop (flow matching, velocity):
- Wan2.1 I2V / Wan2.2 I2V: the model takes the 16 latent channels plus the conditioning
  channels the pipeline builds (4 mask + 16 image-latent channels: 36 in all) and, for
  Wan2.1 I2V, CLIP image embeddings (``encoder_hidden_states_image``).  The editor takes
  them as ``condition`` (1, C_cond, F, H, W) and ``image_embeds`` (1, N, D) and gives every
  branch the same conditioning.
- Wan2.2 A14B: two experts (``transformer`` for high noise, ``transformer_2`` below
  ``boundary_ratio * num_train_timesteps``), both patched; the editor switches as
  WanPipeline does.
- Wan2.2 TI2V-5B (``expand_timesteps``): per-token timesteps (B, L); with an image
  ``condition`` the first latent frame is the condition, at timestep 0, in every branch
  (WanImageToVideoPipeline's rule), and the output's first frame is the condition.
"""
from __future__ import annotations

import functools

import torch

from ...._validate import describe
from ..processors import KVLockProcessor, norm_spec
from .base import LoopContext, ModelAdapter, _batched


class KVLockWanAttnProcessor(KVLockProcessor):
    """``WanAttnProcessor`` for self-attention (``attn1``) with KV-Lock."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary_emb=None):
        if encoder_hidden_states is not None or attn.add_k_proj is not None:
            raise ValueError("KV-Lock patches Wan self-attention (attn1) only; this module got cross-attention "
                             "inputs (encoder_hidden_states or image projections)")
        plan = self.plan
        self._check_mask(plan, attention_mask, allowed=False)
        if attn.fused_projections:
            query, key, value = attn.to_qkv(hidden_states).chunk(3, dim=-1)
        else:
            query, key, value = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
        heads = attn.heads
        head_dim = query.shape[-1] // heads
        cos, sin = rotary_emb if rotary_emb is not None else (None, None)
        rope_fn = None
        if cos is not None and cos.dtype != torch.float32:
            # model.to(dtype) cast the RoPE tables diffusers loads in fp32: the stock processor then
            # rotates in that dtype, rounding every product; so does KV-Lock (stock bit for bit).
            rope_fn = functools.partial(_rotate_pairs, cos=cos, sin=sin)
        query, key, value = self.video_epilogue(
            query, key, value, heads=heads, norm_q=norm_spec(attn.norm_q, heads, head_dim, "norm_q"),
            norm_k=norm_spec(attn.norm_k, heads, head_dim, "norm_k"),
            rope="interleaved" if rotary_emb is not None else "none", cos=cos, sin=sin, rope_fn=rope_fn)
        out = self.attend(query, key, value, attention_mask)
        out = out.flatten(2, 3).type_as(query)
        return attn.to_out[1](attn.to_out[0](out))


def _rotate_pairs(q, k, *, cos, sin):
    """Interleaved RoPE of (B, S, H, D) q and k with Wan's (1, S, 1, D) tables, each op in
    the operands' dtype (pairs (2i, 2i+1): x' = x cos - y sin, y' = x sin + y cos)."""
    c, s = cos[..., 0::2], sin[..., 1::2]

    def rotate(t):
        x, y = t[..., 0::2], t[..., 1::2]
        return torch.stack((x * c - y * s, x * s + y * c), dim=-1).flatten(-2)

    return rotate(q), rotate(k)


class WanAdapter(ModelAdapter):
    name = "wan"
    family = "Wan (WanTransformer3DModel: Wan2.1 T2V/I2V, Wan2.2 A14B, Wan2.2 TI2V-5B)"
    model_class_paths = ("diffusers.models.transformers.transformer_wan:WanTransformer3DModel",)
    stock_processor_paths = ("diffusers.models.transformers.transformer_wan:WanAttnProcessor",)
    prediction = "flow"
    input_layout = "bcfhw"
    supports_context_parallel = True
    dispatch_module = "diffusers.models.transformers.transformer_wan"
    processor_cls = KVLockWanAttnProcessor

    def attention_modules(self, transformer):
        return [(f"blocks.{i}.attn1", block.attn1) for i, block in enumerate(transformer.blocks)]

    def patch_size(self, transformer):
        return tuple(int(p) for p in transformer.config.patch_size)

    def loop_context(self, transformer, source_latents, *, condition=None, image_embeds=None,
                     expand_timesteps=None, transformer_kwargs=None, **unused):
        if unused:
            raise TypeError(f"{self.family} editing takes condition, image_embeds, expand_timesteps and "
                            f"transformer_kwargs; got unexpected {sorted(unused)}")
        config = transformer.config
        C = source_latents.shape[1]
        extra = int(config.in_channels) - C
        if expand_timesteps is None:
            # Wan2.2 TI2V-5B is the Wan transformer with 48-channel latents in and out.
            expand_timesteps = int(config.in_channels) == int(config.out_channels) == 48
        first_frame_mask = None
        if expand_timesteps:
            if extra:
                raise ValueError(f"expand_timesteps (Wan2.2 TI2V) models take the latents alone ({config.in_channels} "
                                 f"channels), got source latents with {C}")
            if condition is not None:
                _check_like("condition", condition, (1, C, 1) + tuple(source_latents.shape[3:]),
                            "the image latents of the first frame (1, C, 1, H, W)", source_latents)
                first_frame_mask = torch.ones_like(source_latents[:, :1])
                first_frame_mask[:, :, 0] = 0
        elif extra > 0:
            if condition is None:
                raise ValueError(
                    f"this Wan transformer takes {config.in_channels} input channels: {C} latent channels plus {extra} "
                    f"conditioning channels (Wan I2V: 4 mask + 16 image-latent channels, as "
                    "WanImageToVideoPipeline.prepare_latents builds them); pass condition=(1, "
                    f"{extra}, F, H, W)")
            _check_like("condition", condition, (1, extra) + tuple(source_latents.shape[2:]),
                        f"(1, {extra}, F, H, W)", source_latents)
        elif extra < 0:
            raise ValueError(f"source_latents have {C} channels but the transformer takes {config.in_channels}")
        elif condition is not None:
            raise ValueError("condition is for image-to-video Wan models (in_channels > latent channels) or "
                             "expand_timesteps models; this transformer takes the latents alone")
        if config.image_dim is not None and image_embeds is None:
            raise ValueError("this Wan2.1 I2V transformer (image_dim set) needs image_embeds (1, N, image_dim): the "
                             "CLIP image embeddings WanImageToVideoPipeline.encode_image returns")
        if image_embeds is not None:
            if config.image_dim is None:
                raise ValueError("image_embeds given but this transformer has no image cross-attention "
                                 "(image_dim is None)")
            if not isinstance(image_embeds, torch.Tensor) or image_embeds.dim() != 3 or image_embeds.shape[0] != 1:
                raise ValueError(f"image_embeds must be (1, N, {config.image_dim}), got {describe(image_embeds)}")
        return LoopContext(condition=condition, image_embeds=image_embeds, expand_timesteps=bool(expand_timesteps),
                           first_frame_mask=first_frame_mask, transformer_kwargs=transformer_kwargs or {})

    def _apply_condition(self, latents, ctx):
        if ctx.first_frame_mask is not None:
            m = ctx.first_frame_mask
            return (1 - m) * ctx.condition.to(latents.dtype) + m * latents
        return latents

    def model_inputs(self, transformer, latents, t, embeds, ctx, branch_kwargs):
        B = latents.shape[0]
        dtype = transformer.dtype
        x = self._apply_condition(latents, ctx)
        if ctx.condition is not None and ctx.first_frame_mask is None:
            x = torch.cat([x, ctx.condition.to(x.dtype).expand(B, -1, -1, -1, -1)], dim=1)
        if ctx.expand_timesteps:
            pt, ph, pw = self.patch_size(transformer)
            m = ctx.first_frame_mask if ctx.first_frame_mask is not None else torch.ones_like(latents[:1, :1])
            per_token = (m[0, 0][::pt, ::ph, ::pw] * t).flatten()
            timestep = per_token[None].expand(B, -1)
        else:
            timestep = t.expand(B)
        kwargs = dict(hidden_states=x.to(dtype), timestep=timestep, encoder_hidden_states=embeds.to(dtype),
                      return_dict=False)
        if ctx.image_embeds is not None:
            kwargs["encoder_hidden_states_image"] = ctx.image_embeds.to(dtype).expand(B, -1, -1)
        kwargs.update(_batched(ctx.transformer_kwargs or {}, B, dtype))
        kwargs.update(branch_kwargs)
        return kwargs

    def finalize(self, latents, ctx):
        return self._apply_condition(latents, ctx)


def _check_like(name, x, shape, layout, like):
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor {layout}, got {type(x).__name__}")
    if tuple(x.shape) != tuple(shape):
        raise ValueError(f"{name} must be {layout} = {tuple(shape)}, got {tuple(x.shape)}")
    if x.device != like.device:
        raise ValueError(f"{name} must be on the source latents' device {like.device}, got {x.device}")


ADAPTER = WanAdapter()
