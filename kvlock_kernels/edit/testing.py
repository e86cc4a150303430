"""Tiny random-weight Wan pipelines and synthetic clips, built offline, for tests and demos.

``build_tiny_wan(path, layout="wan2.1" | "wan2.2")`` writes a complete diffusers pipeline
folder (``save_pretrained`` layout: model_index.json, vae/, text_encoder/, tokenizer/,
transformer/ [, transformer_2/], scheduler/) with a few thousand random weights:
AutoencoderKLWan (the real architecture, base_dim 3), a UMT5 text encoder from a local
config, a word-level tokenizer trained on a handful of sentences with the ``tokenizers``
library, and WanTransformer3DModel(s).  "wan2.2" is the A14B layout: a high-noise
``transformer``, a low-noise ``transformer_2`` and ``boundary_ratio``; "wan2.2-ti2v" is the
TI2V-5B layout: the Wan2.2 VAE (residual, patchified, 48 latent channels, 16x spatial), a
48-channel transformer and ``expand_timesteps`` (per-token timesteps).  Nothing is
downloaded.  The outputs of such a model are noise; what it exercises is the whole path
(files, geometry, VAE normalisation, encode_prompt, the KV-Lock loop, decoding, outputs).

``write_clip(video_path, mask_path, ...)`` writes a synthetic clip (a textured square moving
over a smooth background) and its mask (white square on black) as video files.
"""
from __future__ import annotations

from typing import Optional, Tuple

import numpy as np

__all__ = ["build_tiny_wan", "build_tiny_cogvideox", "synthetic_clip", "write_clip", "TINY_TEXT_DIM"]

TINY_TEXT_DIM = 32
_CORPUS = ["a red ball on a green field", "a cat sitting on a sofa", "a blue car on the road",
           "a small dog running in the park", "the sky is clear and bright", "a wooden boat on a lake"]


def _tokenizer():
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(_CORPUS, trainer=trainers.WordLevelTrainer(special_tokens=["<pad>", "</s>", "<unk>"]))
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")


def _text_encoder(seed: int, vocab_size: int, config_cls, model_cls):
    """A one-layer random-weight UMT5 / T5 encoder (``config_cls``, ``model_cls``) of width TINY_TEXT_DIM."""
    import torch

    torch.manual_seed(seed)
    return model_cls(config_cls(vocab_size=vocab_size, d_model=TINY_TEXT_DIM, d_kv=8, d_ff=32, num_layers=1,
                                num_heads=4, relative_attention_num_buckets=8, pad_token_id=0, eos_token_id=1,
                                decoder_start_token_id=0)).eval()


def _transformer(seed: int, channels: int, layers: int = 2):
    import torch
    from diffusers import WanTransformer3DModel

    torch.manual_seed(seed)
    return WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12,
                                 in_channels=channels, out_channels=channels, text_dim=TINY_TEXT_DIM, freq_dim=32,
                                 ffn_dim=32, num_layers=layers, cross_attn_norm=True, qk_norm="rms_norm_across_heads",
                                 rope_max_seq_len=32).eval()


def build_tiny_wan(path: str, *, layout: str = "wan2.1", scheduler: str = "unipc", seed: int = 0,
                   boundary_ratio: float = 0.875) -> str:
    """Write a tiny random-weight Wan text-to-video pipeline to ``path`` (see the module docstring).

    Arguments:
        layout: "wan2.1" (one transformer), "wan2.2" (A14B: transformer + transformer_2 +
            boundary_ratio) or "wan2.2-ti2v" (TI2V-5B: 48-channel latents, expand_timesteps).
        scheduler: "unipc" (Wan's UniPCMultistepScheduler, flow prediction, flow_shift 3),
            "euler" (FlowMatchEulerDiscreteScheduler, shift 3) or "ddim" (DDIMScheduler with
            epsilon prediction: not flow matching, for the refusal tests).
    Returns:
        path.
    """
    import torch
    from diffusers import (
        AutoencoderKLWan,
        DDIMScheduler,
        FlowMatchEulerDiscreteScheduler,
        UniPCMultistepScheduler,
        WanPipeline,
    )
    from transformers import UMT5Config, UMT5EncoderModel

    if layout not in ("wan2.1", "wan2.2", "wan2.2-ti2v"):
        raise ValueError(f"layout must be 'wan2.1', 'wan2.2' or 'wan2.2-ti2v', got {layout!r}")
    tokenizer = _tokenizer()
    text_encoder = _text_encoder(seed, len(tokenizer), UMT5Config, UMT5EncoderModel)
    torch.manual_seed(seed + 1)
    if layout == "wan2.2-ti2v":
        channels = 48
        vae = AutoencoderKLWan(base_dim=8, decoder_base_dim=8, z_dim=48, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                               temperal_downsample=[False, True, True], is_residual=True, in_channels=12,
                               out_channels=12, patch_size=2, scale_factor_spatial=16,
                               latents_mean=[0.0] * 48, latents_std=[1.0] * 48).eval()
    else:
        channels = 16
        vae = AutoencoderKLWan(base_dim=3, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                               temperal_downsample=[False, True, True]).eval()
    if scheduler == "unipc":
        sched = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True,
                                        num_train_timesteps=1000, flow_shift=3.0)
    elif scheduler == "euler":
        sched = FlowMatchEulerDiscreteScheduler(shift=3.0)
    elif scheduler == "ddim":
        sched = DDIMScheduler(prediction_type="epsilon")
    else:
        raise ValueError(f"scheduler must be 'unipc', 'euler' or 'ddim', got {scheduler!r}")
    kwargs = {}
    if layout == "wan2.2":
        kwargs = {"transformer_2": _transformer(seed + 3, channels), "boundary_ratio": boundary_ratio}
    elif layout == "wan2.2-ti2v":
        kwargs = {"expand_timesteps": True}
    pipe = WanPipeline(tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, scheduler=sched,
                       transformer=_transformer(seed + 2, channels), **kwargs)
    pipe.save_pretrained(path)
    return path


def build_tiny_cogvideox(path: str, *, seed: int = 0, rotary: bool = True, max_text_seq_length: int = 16) -> str:
    """Write a tiny random-weight CogVideoX text-to-video pipeline to ``path``: AutoencoderKLCogVideoX
    (4 latent channels), a T5 encoder from a local config, the local tokenizer, a one-layer
    CogVideoXTransformer3DModel (rotary embeddings like CogVideoX-5B when ``rotary``) and
    CogVideoXDDIMScheduler (v-prediction, as the checkpoints ship).  Nothing is downloaded."""
    import torch
    from diffusers import AutoencoderKLCogVideoX, CogVideoXDDIMScheduler, CogVideoXPipeline, CogVideoXTransformer3DModel
    from transformers import T5Config, T5EncoderModel

    tokenizer = _tokenizer()
    text_encoder = _text_encoder(seed, len(tokenizer), T5Config, T5EncoderModel)
    torch.manual_seed(seed + 1)
    vae = AutoencoderKLCogVideoX(in_channels=3, out_channels=3, down_block_types=("CogVideoXDownBlock3D",) * 4,
                                 up_block_types=("CogVideoXUpBlock3D",) * 4, block_out_channels=(8, 8, 8, 8),
                                 latent_channels=4, layers_per_block=1, norm_num_groups=2,
                                 temporal_compression_ratio=4).eval()
    torch.manual_seed(seed + 2)
    transformer = CogVideoXTransformer3DModel(num_attention_heads=2, attention_head_dim=16, in_channels=4,
                                              out_channels=4, time_embed_dim=8, text_embed_dim=TINY_TEXT_DIM,
                                              num_layers=2, sample_width=8, sample_height=8, sample_frames=9,
                                              patch_size=2, temporal_compression_ratio=4,
                                              max_text_seq_length=max_text_seq_length,
                                              use_rotary_positional_embeddings=rotary,
                                              use_learned_positional_embeddings=False).eval()
    sched = CogVideoXDDIMScheduler(prediction_type="v_prediction", timestep_spacing="trailing",
                                   rescale_betas_zero_snr=True, beta_schedule="scaled_linear", clip_sample=False,
                                   set_alpha_to_one=True)
    CogVideoXPipeline(tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, transformer=transformer,
                      scheduler=sched).save_pretrained(path)
    return path


def synthetic_clip(frames: int = 9, height: int = 40, width: int = 56, *, seed: int = 0
                   ) -> Tuple[np.ndarray, np.ndarray]:
    """(frames, height, width, 3) uint8 video of a textured square moving right over a smooth
    background, and its (frames, height, width) bool mask."""
    rng = np.random.default_rng(seed)
    yy, xx = np.meshgrid(np.linspace(0, 1, height), np.linspace(0, 1, width), indexing="ij")
    bg = np.stack([0.5 + 0.35 * np.sin(2 * np.pi * (xx * 1.5 + c * 0.3)) * np.cos(2 * np.pi * yy) for c in range(3)],
                  axis=-1)
    side = max(4, min(height, width) // 3)
    texture = rng.uniform(0.1, 0.9, size=(side, side, 3))
    video = np.repeat(bg[None], frames, axis=0)
    mask = np.zeros((frames, height, width), dtype=bool)
    y0 = (height - side) // 2
    for f in range(frames):
        x0 = (f * max(1, (width - side) // max(1, frames - 1))) % (width - side + 1)
        video[f, y0:y0 + side, x0:x0 + side] = texture
        mask[f, y0:y0 + side, x0:x0 + side] = True
    return (video * 255).round().astype(np.uint8), mask


def write_clip(video_path: str, mask_path: Optional[str] = None, *, frames: int = 9, height: int = 40,
               width: int = 56, fps: float = 12.0, seed: int = 0):
    """Write ``synthetic_clip`` as a video file and its mask (white on black) as another.
    Returns (video (F, H, W, 3) uint8, mask (F, H, W) bool) as written (before compression)."""
    from .video_io import write_video

    video, mask = synthetic_clip(frames, height, width, seed=seed)
    write_video(video_path, video, fps)
    if mask_path is not None:
        m = np.repeat((mask * 255).astype(np.uint8)[..., None], 3, axis=-1)
        if mask_path.lower().endswith((".png", ".jpg", ".jpeg", ".bmp", ".webp")):
            from PIL import Image

            Image.fromarray(m[0]).save(mask_path)
        else:
            write_video(mask_path, m, fps)
    return video, mask
