"""How the lock weight moves a layer's output from the edit toward the source.

Builds a Wan-like token grid with a foreground box, a source and an edited target
(background = source + noise, foreground replaced), and runs kv_lock_attention for a
few fusion ratios alpha with lock = alpha * (1 - fg).  Prints, for background and
foreground tokens, how far the output is from the source layer's output and from the
unlocked target's: the background moves to the source as alpha grows, the foreground
stays the edit.

    python python/examples/lock_strength_demo.py [--device cuda]
"""
import argparse

import torch

from kvlock_kernels import kv_lock_attention


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--frames", type=int, default=2)
    args = ap.parse_args()
    dev = torch.device(args.device)
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    F_, H_, W_, heads, D = args.frames, 30, 52, 12, 128
    fg = torch.zeros(F_, H_, W_, dtype=torch.bool)
    fg[:, 8:22, 15:37] = True
    fg = fg.flatten().to(dev)
    S = fg.numel()
    g = torch.Generator().manual_seed(0)
    x_src = torch.randn(1, S, heads, D, generator=g)
    # The target keeps the background up to mild noise and replaces the foreground.
    noise = torch.randn(1, S, heads, D, generator=g)
    fg_cpu = fg.cpu()[None, :, None, None]
    x_tgt = torch.where(fg_cpu, torch.randn(1, S, heads, D, generator=g), x_src + 0.5 * noise)
    x_src, x_tgt = x_src.to(dev, dtype), x_tgt.to(dev, dtype)
    scale = 2.0 / D ** 0.5  # a sharp softmax, as in trained layers: tokens attend to their peers
    source_out = kv_lock_attention(x_src, x_src, x_src, softmax_scale=scale)
    target_out = kv_lock_attention(x_tgt, x_tgt, x_tgt, softmax_scale=scale)
    print(f"{S} tokens ({F_}x{H_}x{W_}), foreground {fg.float().mean().item():.0%}, {heads} heads x {D}, {dtype}")
    print("relative distance of the edited layer's output to the source / unlocked target output")
    print("alpha | background         | foreground")
    for alpha in (0.0, 0.25, 0.5, 0.75, 1.0):
        lock = alpha * (~fg).float()
        out = kv_lock_attention(x_tgt, x_tgt, x_tgt, x_src, x_src, lock, softmax_scale=scale)

        def dist(a, b, m):
            return ((a - b)[:, m].float().norm() / b[:, m].float().norm()).item()

        print(f"{alpha:5.2f} | {dist(out, source_out, ~fg):.3f} / {dist(out, target_out, ~fg):.3f}"
              f"    | {dist(out, source_out, fg):.3f} / {dist(out, target_out, fg):.3f}")

if __name__ == "__main__":
    main()
