"""Tiny random-weight models of every supported family, and inputs for them (tests,
examples, CI).  Each builds in well under a second on a CPU; seeds make them repeatable.

    model = tiny_model("wan")                 # "wan", "wan_i2v", "wan_ti2v", "wan_vace", "cogvideox",
    inputs = tiny_inputs("wan", batch=3)      # "hunyuan_video"
    out = model(**inputs, return_dict=False)[0]
"""
from __future__ import annotations

import torch

__all__ = ["FAMILIES", "LATENT", "tiny_model", "tiny_inputs", "tiny_tokens"]

FAMILIES = ("wan", "wan_i2v", "wan_ti2v", "wan_vace", "cogvideox", "hunyuan_video")
# Latent (F, H, W) of the tiny inputs and the latent channels each family's editor works on.
LATENT = (3, 8, 8)
TEXT_LEN = 7


def _wan_kwargs(**overrides):
    kwargs = dict(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=24, in_channels=4, out_channels=4,
                  text_dim=32, freq_dim=32, ffn_dim=64, num_layers=2, rope_max_seq_len=32)
    kwargs.update(overrides)
    return kwargs


def tiny_model(family: str, seed: int = 0, **overrides):
    """A tiny random-weight model of ``family`` in eval mode (fp32, CPU)."""
    import diffusers

    torch.manual_seed(seed)
    if family == "wan":
        model = diffusers.WanTransformer3DModel(**_wan_kwargs(**overrides))
    elif family == "wan_i2v":  # Wan2.1 I2V: 4 latent + 8 conditioning channels, CLIP image cross-attention
        model = diffusers.WanTransformer3DModel(**_wan_kwargs(in_channels=12, image_dim=16, added_kv_proj_dim=48,
                                                              **overrides))
    elif family == "wan_ti2v":  # Wan2.2 TI2V-5B: 48-channel latents in and out (expand_timesteps)
        model = diffusers.WanTransformer3DModel(**_wan_kwargs(in_channels=48, out_channels=48, **overrides))
    elif family == "wan_vace":
        kwargs = _wan_kwargs(num_layers=3, vace_layers=[0, 2], vace_in_channels=8)
        kwargs.update(overrides)
        model = diffusers.WanVACETransformer3DModel(**kwargs)
    elif family == "cogvideox":
        F, H, W = LATENT
        kwargs = dict(num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4, time_embed_dim=8,
                      text_embed_dim=32, num_layers=2, sample_width=W, sample_height=H, sample_frames=4 * F - 3,
                      patch_size=2, temporal_compression_ratio=4, max_text_seq_length=TEXT_LEN)
        kwargs.update(overrides)
        model = diffusers.CogVideoXTransformer3DModel(**kwargs)
    elif family == "hunyuan_video":
        kwargs = dict(in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=10, num_layers=1,
                      num_single_layers=1, num_refiner_layers=1, patch_size=2, patch_size_t=1, guidance_embeds=True,
                      text_embed_dim=32, pooled_projection_dim=8, rope_axes_dim=(2, 4, 4))
        kwargs.update(overrides)
        model = diffusers.HunyuanVideoTransformer3DModel(**kwargs)
    else:
        raise ValueError(f"family must be one of {FAMILIES}, got {family!r}")
    return model.eval()


def tiny_tokens(family: str, latent=LATENT) -> int:
    """Video tokens of a tiny model's input of latent size (F, H, W)."""
    F, H, W = latent
    return F * (H // 2) * (W // 2)


def tiny_inputs(family: str, batch: int, *, latent=LATENT, seed: int = 1, timestep: float = 500.0) -> dict:
    """Keyword inputs of one forward of ``tiny_model(family)`` (``return_dict=False``)."""
    g = torch.Generator().manual_seed(seed)
    F, H, W = latent
    t = torch.full((batch,), timestep)
    if family == "cogvideox":
        from diffusers.models.embeddings import get_3d_rotary_pos_embed

        # RoPE on the video tokens as CogVideoX 1.0 pipelines build it (head_dim 16, patch 2).
        rope = get_3d_rotary_pos_embed(embed_dim=16, crops_coords=((0, 0), (H // 2, W // 2)),
                                       grid_size=(H // 2, W // 2), temporal_size=F)
        return dict(hidden_states=torch.randn(batch, F, 4, H, W, generator=g), timestep=t,
                    encoder_hidden_states=torch.randn(batch, TEXT_LEN, 32, generator=g), image_rotary_emb=rope,
                    return_dict=False)
    channels = {"wan_i2v": 12, "wan_ti2v": 48}.get(family, 4)
    # Wan's I2V processor takes the last 512 context tokens as text (hard-coded upstream).
    text = 512 if family == "wan_i2v" else TEXT_LEN
    inputs = dict(hidden_states=torch.randn(batch, channels, F, H, W, generator=g), timestep=t,
                  encoder_hidden_states=torch.randn(batch, text, 32, generator=g), return_dict=False)
    if family == "wan_i2v":
        inputs["encoder_hidden_states_image"] = torch.randn(batch, 5, 16, generator=g)
    elif family == "wan_ti2v":
        inputs["timestep"] = t[:, None].expand(batch, tiny_tokens(family, latent)).contiguous()
    elif family == "wan_vace":
        inputs["control_hidden_states"] = torch.randn(batch, 8, F, H, W, generator=g)
    elif family == "hunyuan_video":
        mask = torch.ones(batch, TEXT_LEN)
        mask[-1, TEXT_LEN - 2:] = 0  # some text padding, as real prompts have
        inputs.update(pooled_projections=torch.randn(batch, 8, generator=g), encoder_attention_mask=mask,
                      guidance=torch.full((batch,), 3500.0))
    return inputs
