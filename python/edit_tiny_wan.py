"""KV-Lock on a tiny random-weight Wan: what the lock does, measured where it is true.

What a random model can and cannot show.  A randomly initialised transformer cannot edit a
video: its output is noise whatever the lock, and a stronger lock does NOT bring the edit's
background closer to the source (on this model the background distance to the source moves
by well under 1 % between alpha = 0 and 1, and rises rather than falls; the last column is
printed so you can see it).  Background fidelity is a property of a trained model: run ``kvlock-edit``
on a Wan checkpoint for that.

What is true on any model, and what this example measures: the lock is the only path from
the source video into the edit (the source enters as the K/V of the locked self-attention
layers), and alpha sets how wide that path is.  Every edit is run twice with the same seed,
once on the source and once on a different source (the source mirrored left-right); the RMS
difference of the two edited latents is the edit's **source sensitivity**.  It is exactly 0
at alpha = 0 (a lock weight of 0 never reads the source) and grows monotonically with alpha,
in the background and, through the background keys the foreground attends to, in the
foreground too.  ``tests/test_examples.py`` asserts both.

The "video" lives in latent space (4 channels, the first three shown as RGB): a textured
square moving over a smooth background; the edit mask is the square.  Runs alpha fixed at
0, 0.25, 0.5, 0.75, 1 and KV-Lock's dynamic schedule, prints one row per setting and writes
under --out:
    strip.png      labelled rows: source, the edits at alpha 0 / 0.5 / 1 and dynamic, and the
                   per-position source sensitivity at alpha = 1 (brighter = depends more on the source)
    schedule.png   sigma2, alpha and omega per step of the dynamic run

    python python/edit_tiny_wan.py [--steps 6] [--out edit_out]

With --model, a real checkpoint edits a real video through the Python API instead
(equivalent to the ``kvlock-edit`` command):
    python python/edit_tiny_wan.py --model DIR --video in.mp4 --mask mask.mp4 --prompt "..." --out out_dir
"""
from __future__ import annotations

import argparse
import os

import numpy as np
import torch

from kvlock_kernels import KVLockScheduler
from kvlock_kernels.diffusers import KVLockEditor

ALPHAS = (0.0, 0.25, 0.5, 0.75, 1.0)


def synthetic_video(frames: int, height: int, width: int, channels: int = 3, seed: int = 0):
    """(channels, frames, height, width) in [-1, 1]: a textured square moving right over a
    smooth background, and the (frames, height, width) bool mask of the square."""
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


def rms(x: torch.Tensor, where: torch.Tensor) -> float:
    """Root mean square of x (1, C, F, H, W) over the latent positions where `where` (F, H, W) is True."""
    sel = where[None, None].expand_as(x)
    return (x[sel] ** 2).mean().sqrt().item()


def to_rgb_frames(x):
    """(1, C, F, H, W) in [-1, 1] -> list of (H, W, 3) uint8 frames (first 3 channels)."""
    x = x[0, :3].float().clamp(-1, 1).add(1).mul(127.5).round().byte()
    return [x[:, f].permute(1, 2, 0).numpy() for f in range(x.shape[1])]


def save_strip(path, rows, scale):
    """rows: [(label, [frames])] -> one labelled PNG, one row per entry, frames left to right."""
    from PIL import Image, ImageDraw, ImageFont

    grid = [np.concatenate(frames, axis=1) for _, frames in rows]
    h, w = grid[0].shape[:2]
    label_w = 230
    img = Image.new("RGB", (label_w + w * scale, len(rows) * (h * scale + 4)), (20, 20, 20))
    draw = ImageDraw.Draw(img)
    try:
        font = ImageFont.load_default(size=13)
    except TypeError:  # Pillow < 10.1
        font = ImageFont.load_default()
    for i, ((label, _), g) in enumerate(zip(rows, grid)):
        y = i * (h * scale + 4)
        img.paste(Image.fromarray(g).resize((w * scale, h * scale), Image.NEAREST), (label_w, y))
        draw.text((6, y + h * scale // 2 - 8), label, fill=(235, 235, 235), font=font)
    img.save(path)


def run_tiny(args):
    from diffusers import FlowMatchEulerDiscreteScheduler

    from kvlock_kernels.edit.outputs import plot_schedule
    from kvlock_kernels.integrations.diffusers.testing import tiny_model

    channels, size = 4, 16  # 3 latent frames of 16 x 16
    video, mask = synthetic_video(frames=3, height=size, width=size, channels=channels)
    source = video[None]  # already "latent": (1, C, F, H, W)
    other = torch.flip(source, dims=[4])  # a different source: the same video mirrored left-right
    model = tiny_model("wan", in_channels=channels, out_channels=channels, rope_max_seq_len=64)
    g = torch.Generator().manual_seed(0)
    prompt, negative = torch.randn(1, 7, 32, generator=g), torch.randn(1, 7, 32, generator=g)

    def edit(src, kv_lock):
        editor = KVLockEditor(model, FlowMatchEulerDiscreteScheduler(shift=3.0), kv_lock=kv_lock,
                              backend=args.backend, progress=False)
        return editor.edit(src, mask, prompt, negative, num_steps=args.steps,
                           generator=torch.Generator().manual_seed(args.seed))

    print("random-weight tiny Wan: the output is noise; what is measured is how much the edit depends on the source")
    print("setting             | source sensitivity (RMS): background  foreground | background RMS distance to source")
    results = {}
    settings = [(f"alpha {a:.2f}", lambda a=a: KVLockScheduler(args.steps, kappa=0, alpha_pre=a, device="cpu"))
                for a in ALPHAS]
    settings.append(("KV-Lock dynamic", lambda: KVLockScheduler.for_steps(args.steps, tau=args.tau, device="cpu")))
    for name, make in settings:
        edited, trace = edit(source, make())
        edited_other, _ = edit(other, make())
        diff = edited - edited_other
        results[name] = (edited, trace, diff)
        print(f"{name:<19} | {rms(diff, ~mask):.3e}  {rms(diff, mask):.3e} | {rms(edited - source, ~mask):.4f}")
    os.makedirs(args.out, exist_ok=True)
    sens = results["alpha 1.00"][2].abs()
    sens_scale = 0.9 / max(sens.max().item(), 1e-12)
    rows = [("source (latents, ch 0-2)", to_rgb_frames(source))]
    rows += [(f"edit, {n}", to_rgb_frames(results[n][0])) for n in ("alpha 0.00", "alpha 0.50", "alpha 1.00",
                                                                   "KV-Lock dynamic")]
    rows.append(("source sensitivity, alpha 1", to_rgb_frames(sens * sens_scale * 2 - 1)))
    save_strip(os.path.join(args.out, "strip.png"), rows, scale=8)
    trace = results["KV-Lock dynamic"][1]
    sched = KVLockScheduler.for_steps(args.steps, tau=args.tau, device="cpu")
    plot_schedule(os.path.join(args.out, "schedule.png"), trace,
                  {"num_steps": args.steps, "kappa": sched.kappa, "tau": sched.tau, "omega0": sched.omega0},
                  title="KV-Lock dynamic schedule on a random-weight tiny Wan")
    print(f"wrote {args.out}/strip.png and {args.out}/schedule.png")


def run_checkpoint(args):
    """A real diffusers Wan checkpoint: edit --video inside --mask with the Python API."""
    from diffusers import DiffusionPipeline

    from kvlock_kernels.edit import KVLockVideoEditor, write_video
    from kvlock_kernels.edit.outputs import plot_schedule, write_comparison

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    local = os.path.isdir(args.model)
    pipe = DiffusionPipeline.from_pretrained(args.model, torch_dtype=dtype, local_files_only=local).to(device)
    pipe.vae.to(torch.float32)
    editor = KVLockVideoEditor.from_pipe(pipe, backend=args.backend, progress=not args.quiet)
    result = editor.edit(args.video, args.mask, args.prompt, num_steps=args.steps, seed=args.seed,
                         height=args.height, width=args.width, frames=args.frames, output_type="uint8")
    os.makedirs(args.out, exist_ok=True)
    write_video(os.path.join(args.out, "edited.mp4"), result.edited, result.fps)
    write_comparison(os.path.join(args.out, "compare.mp4"), result.source, result.mask.numpy(), result.edited,
                     result.fps)
    plot_schedule(os.path.join(args.out, "schedule.png"), result.trace, result.schedule)
    bg = result.fidelity["background"]
    print(f"background PSNR {bg['psnr']} dB, SSIM {bg['ssim']}; wrote {args.out}/edited.mp4, compare.mp4, "
          "schedule.png")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--tau", type=float, default=0.02, help="variance scale of the dynamic schedule")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="edit_out")
    ap.add_argument("--backend", default="auto", choices=["auto", "triton", "torch"])
    ap.add_argument("--quiet", action="store_true", help="no progress bars")
    ap.add_argument("--model", help="a diffusers Wan checkpoint (folder or hub id): edit --video instead")
    ap.add_argument("--video", help="with --model: the source video")
    ap.add_argument("--mask", help="with --model: the edit mask")
    ap.add_argument("--prompt", default="a red ball")
    ap.add_argument("--frames", type=int)
    ap.add_argument("--height", type=int)
    ap.add_argument("--width", type=int)
    args = ap.parse_args()
    if args.model and not (args.video and args.mask):
        ap.error("--model needs --video and --mask")
    (run_checkpoint if args.model else run_tiny)(args)


if __name__ == "__main__":
    main()
