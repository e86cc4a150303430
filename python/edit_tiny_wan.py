"""Edit a synthetic video with KV-Lock on a tiny, randomly initialised Wan transformer.

No downloads: the model is a 2-layer WanTransformer3DModel with random weights, and the
"video" lives directly in latent space (4 channels, the first three shown as RGB): a
textured square moving over a textured background; the edit mask is the square.  The
random model cannot make a meaningful edit; what the example shows is the machinery:
the background stays on the source as the lock strength grows, the foreground is free.

It runs four edits (alpha fixed at 0, 0.5 and 1, and KV-Lock's dynamic schedule),
prints the background drift of each (mean squared difference from the source over
background positions), and writes under --out:
    strip.png      source / edited frames (dynamic schedule)
    schedule.png   sigma2, alpha and omega per step

    python python/edit_tiny_wan.py [--steps 12] [--out edit_out]
    python python/edit_tiny_wan.py --model /path/to/Wan2.1-T2V-1.3B-Diffusers --prompt "..."

With --model, a local diffusers Wan checkpoint is used instead (its VAE and text encoder
too): the synthetic video is rendered at --height x --width, encoded, edited and decoded.
"""
from __future__ import annotations

import argparse
import os

import numpy as np
import torch

from kvlock_kernels import KVLockScheduler
from kvlock_kernels.diffusers import KVLockEditor
from kvlock_kernels.masks import pixel_mask_to_latent


def synthetic_video(frames: int, height: int, width: int, channels: int = 3, seed: int = 0):
    """(channels, frames, height, width) in [-1, 1]: a textured square moving right over a
    textured background, and the (frames, height, width) bool mask of the square."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.linspace(0, 1, height), torch.linspace(0, 1, width), indexing="ij")
    background = torch.stack([torch.sin(6.28 * (xx * 3 + c * 0.3)) * torch.cos(6.28 * yy * 2)
                              for c in range(channels)]) * 0.6
    texture = torch.rand(channels, height, width, generator=g) * 2 - 1
    side = max(2, height // 3)
    video = background[:, None].repeat(1, frames, 1, 1)
    mask = torch.zeros(frames, height, width, dtype=torch.bool)
    for f in range(frames):
        x0 = min(width - side, (f * max(1, (width - side) // max(1, frames - 1))))
        y0 = (height - side) // 2
        video[:, f, y0:y0 + side, x0:x0 + side] = texture[:, :side, :side]
        mask[f, y0:y0 + side, x0:x0 + side] = True
    return video, mask


def tiny_wan(channels: int):
    from diffusers import WanTransformer3DModel

    torch.manual_seed(0)
    return WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=24,
                                 in_channels=channels, out_channels=channels, text_dim=32, freq_dim=32, ffn_dim=64,
                                 num_layers=2, rope_max_seq_len=64).eval()


def background_drift(edited, source, fg_latent):
    """Mean squared difference over background latent positions (all channels)."""
    bg = (~fg_latent)[None, None].expand_as(source)
    return ((edited - source)[bg] ** 2).mean().item()


def to_rgb_frames(x):
    """(1, C, F, H, W) in [-1, 1] -> list of (H, W, 3) uint8 frames (first 3 channels)."""
    x = x[0, :3].float().clamp(-1, 1).add(1).mul(127.5).round().byte()
    return [x[:, f].permute(1, 2, 0).numpy() for f in range(x.shape[1])]


def save_strip(path, rows, scale):
    from PIL import Image

    grid = np.concatenate([np.concatenate(frames, axis=1) for frames in rows], axis=0)
    img = Image.fromarray(grid)
    img.resize((img.width * scale, img.height * scale), Image.NEAREST).save(path)


def save_schedule(path, trace):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r["step"] for r in trace]
    fig, axes = plt.subplots(1, 3, figsize=(11, 3))
    for ax, key in zip(axes, ("sigma2", "alpha", "omega")):
        ax.plot(steps, [r[key] for r in trace], marker="o")
        ax.set_title(key)
        ax.set_xlabel("step")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def run_tiny(args):
    from diffusers import FlowMatchEulerDiscreteScheduler

    channels, size = 4, 16  # 3 latent frames of 16 x 16
    video, mask = synthetic_video(frames=3, height=size, width=size, channels=channels)
    source = video[None]  # already "latent": (1, C, F, H, W)
    fg_latent = mask  # latent-resolution mask
    model = tiny_wan(channels)
    g = torch.Generator().manual_seed(0)
    prompt, negative = torch.randn(1, 7, 32, generator=g), torch.randn(1, 7, 32, generator=g)
    kappa, window = max(2, args.steps // 2), 3
    settings = {
        "alpha = 0 (no lock)": KVLockScheduler(args.steps, kappa=0, alpha_pre=0.0, device="cpu"),
        "alpha = 0.5 (fixed)": KVLockScheduler(args.steps, kappa=0, alpha_pre=0.5, device="cpu"),
        "alpha = 1 (rigid lock)": KVLockScheduler(args.steps, kappa=0, alpha_pre=1.0, device="cpu"),
        "KV-Lock dynamic": KVLockScheduler(args.steps, kappa=kappa, window=window, tau=args.tau, device="cpu"),
    }
    results = {}
    for name, kv_lock in settings.items():
        editor = KVLockEditor(model, FlowMatchEulerDiscreteScheduler(shift=3.0), kv_lock=kv_lock,
                              backend=args.backend, progress=not args.quiet)
        with torch.no_grad():
            edited, trace = editor.edit(source, fg_latent, prompt, negative, num_steps=args.steps,
                                        generator=torch.Generator().manual_seed(args.seed))
        results[name] = (edited, trace)
        print(f"{name:>24}: background drift {background_drift(edited, source, fg_latent):.4f}")
    edited, trace = results["KV-Lock dynamic"]
    os.makedirs(args.out, exist_ok=True)
    save_strip(os.path.join(args.out, "strip.png"), [to_rgb_frames(source), to_rgb_frames(edited)], scale=8)
    save_schedule(os.path.join(args.out, "schedule.png"), trace)
    print(f"wrote {args.out}/strip.png and {args.out}/schedule.png")


def run_checkpoint(args):
    """A real local diffusers Wan checkpoint: encode the synthetic video, edit, decode."""
    from diffusers import WanPipeline

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    pipe = WanPipeline.from_pretrained(args.model, torch_dtype=dtype).to(device)
    video, mask = synthetic_video(args.frames, args.height, args.width)
    vae = pipe.vae
    mean = torch.tensor(vae.config.latents_mean, device=device).view(1, -1, 1, 1, 1)
    std = torch.tensor(vae.config.latents_std, device=device).view(1, -1, 1, 1, 1)
    with torch.no_grad():
        latents = vae.encode(video[None].to(device, vae.dtype)).latent_dist.mode()
        source = ((latents.float() - mean) / std).to(dtype)
        prompt, negative = pipe.encode_prompt(args.prompt, negative_prompt="", device=device)
        fg_latent = pixel_mask_to_latent(mask, vae_stride=(4, 8, 8), pad=True).to(device)
        editor = KVLockEditor(pipe.transformer, pipe.scheduler,
                              kv_lock=KVLockScheduler(args.steps, kappa=min(20, args.steps), device=device))
        edited, trace = editor.edit(source, fg_latent, prompt.to(dtype), negative.to(dtype), num_steps=args.steps,
                                    generator=torch.Generator().manual_seed(args.seed))
        decoded = vae.decode((edited.float() * std + mean).to(vae.dtype)).sample
    os.makedirs(args.out, exist_ok=True)
    save_strip(os.path.join(args.out, "strip.png"), [to_rgb_frames(video[None]), to_rgb_frames(decoded.cpu())],
               scale=1)
    save_schedule(os.path.join(args.out, "schedule.png"), trace)
    print(f"background drift (latents) {background_drift(edited.float(), source.float(), fg_latent):.4f}")
    print(f"wrote {args.out}/strip.png and {args.out}/schedule.png")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--tau", type=float, default=0.02, help="variance scale of the dynamic schedule")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="edit_out")
    ap.add_argument("--backend", default="auto", choices=["auto", "triton", "torch"])
    ap.add_argument("--quiet", action="store_true", help="no progress bars")
    ap.add_argument("--model", help="a local diffusers Wan checkpoint directory (optional)")
    ap.add_argument("--prompt", default="a red ball")
    ap.add_argument("--frames", type=int, default=17)
    ap.add_argument("--height", type=int, default=480)
    ap.add_argument("--width", type=int, default=832)
    args = ap.parse_args()
    (run_checkpoint if args.model else run_tiny)(args)


if __name__ == "__main__":
    main()
