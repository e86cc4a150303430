"""kvlock-edit: edit a video with KV-Lock, from a video and a mask to an mp4.

    kvlock-edit --model DIR_OR_HUB_ID --video SRC --mask MASK --prompt TEXT --out OUT.mp4

Writes OUT.mp4 (the edited video, at the source's frame rate), OUT_compare.mp4 (source |
mask | edited, labelled), OUT_schedule.png (sigma2 / alpha / omega per step) and
OUT_report.json (arguments, per-step trace, wall time per phase, peak memory, background
PSNR / SSIM and the foreground change).  A local folder is loaded with
local_files_only; only a hub id (owner/name) that is not a local folder is downloaded,
by diffusers itself.  Exit status: 0 done, 2 bad input (a message, no traceback),
1 a failure while running (e.g. out of memory).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import resource
import sys
import time
import warnings
from typing import List, Optional

from .errors import USAGE_EXIT_CODE, EditInputError, KVLockEditWarning, UnsupportedModelError

__all__ = ["main", "build_parser", "output_paths", "load_pipeline"]

PROG = "kvlock-edit"
DTYPES = {"bfloat16": "bfloat16", "bf16": "bfloat16", "float16": "float16", "fp16": "float16", "half": "float16",
          "float32": "float32", "fp32": "float32", "float": "float32"}
OUT_EXTENSIONS = (".mp4", ".mkv", ".mov", ".webm", ".gif")
# Transformer classes whose checkpoints the edit loop runs, with the loop's prediction type (the
# adapters of kvlock_kernels.diffusers decide the rest after loading).
KNOWN_TRANSFORMERS = {"WanTransformer3DModel": "flow", "CogVideoXTransformer3DModel": "v_prediction"}
KNOWN_VAES = ("AutoencoderKLWan", "AutoencoderKLCogVideoX")
HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")


def _number(kind, low, what, *, strict=False):
    """An argparse type: ``kind`` (int or float), finite and >= low (> low when strict);
    ``what`` names the expectation in the message."""

    def parse(text):
        try:
            v = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        if v != v or v in (float("inf"), float("-inf")) or v < low or (strict and v == low):
            raise argparse.ArgumentTypeError(f"expected {what}, got {text}")
        return v

    return parse


_positive_int = _number(int, 1, "a positive integer")
_nonneg_int = _number(int, 0, "an integer >= 0")
_nonneg_float = _number(float, 0.0, "a finite number >= 0")
_positive_float = _number(float, 0.0, "a finite number > 0", strict=True)


def _dtype(text):
    key = text.lower().replace("torch.", "")
    if key not in DTYPES:
        raise argparse.ArgumentTypeError(f"expected one of bfloat16, float16, float32, got {text!r}")
    return DTYPES[key]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=PROG, description="Edit a video with KV-Lock: regenerate the masked region from a prompt, keep the "
        "background locked to the source.", epilog="Outputs: OUT, OUT_compare.mp4, OUT_schedule.png, "
        "OUT_report.json (paths can be changed with --compare, --plot, --report). Exit status 2: bad input.")
    io = p.add_argument_group("inputs and outputs")
    io.add_argument("--model", required=True, help="a diffusers pipeline folder (save_pretrained layout; loaded "
                    "with local_files_only) or a hub id such as Wan-AI/Wan2.1-T2V-1.3B-Diffusers (downloaded by "
                    "diffusers)")
    io.add_argument("--video", required=True, help="source video: mp4/webm/mkv/mov/gif, or a folder of frames")
    m = io.add_mutually_exclusive_group(required=True)
    m.add_argument("--mask", help="edit mask (white = edit): a video, one image for all frames, a folder of "
                   "frames, or .npy; thresholded at half the value range")
    m.add_argument("--box", help="edit a box instead: x0,y0,x1,y1 in source pixels (x1, y1 exclusive), or "
                   "fractions in [0, 1] written with a decimal point")
    io.add_argument("--prompt", required=True, help="what the masked region becomes")
    io.add_argument("--out", required=True, help="the edited video (.mp4; also .mkv, .mov, .webm, .gif)")
    io.add_argument("--report", help="report JSON (default: OUT_report.json)")
    io.add_argument("--compare", help="side-by-side comparison video (default: OUT_compare.mp4; a .png path "
                    "writes the middle frame)")
    io.add_argument("--plot", help="schedule plot PNG (default: OUT_schedule.png)")
    io.add_argument("--fps", type=_positive_float, help="frame rate of a folder of frames (default 16) or to "
                    "override the file's")
    e = p.add_argument_group("edit")
    e.add_argument("--negative-prompt", default="", help="unconditional prompt (default: empty, as the pipeline)")
    e.add_argument("--source-prompt", help="describes the source video; conditions the source branch / "
                   "inversion (default: the negative prompt)")
    e.add_argument("--steps", type=_positive_int, default=50, help="denoising steps (default 50); the schedule's "
                   "kappa and window scale with it: kappa = round(0.4 * steps), window = max(2, round(0.2 * steps))")
    e.add_argument("--seed", type=int, default=0, help="noise seed (default 0)")
    e.add_argument("--guidance", type=_nonneg_float, default=5.0, help="omega0, the base guidance scale "
                   "(default 5.0, Wan's)")
    e.add_argument("--source", choices=("branch", "inversion"), default="branch",
                   help="where source K/V come from: an in-batch source branch (default, O(1) memory) or an "
                   "inversion cache")
    e.add_argument("--kappa", type=_nonneg_int, help="the schedule is active in the last kappa steps "
                   "(default: round(0.4 * steps))")
    e.add_argument("--window", type=_positive_int, help="steps of x0-hat variance (default: max(2, "
                   "round(0.2 * steps)))")
    e.add_argument("--tau", type=_positive_float, help="variance scale of the schedule (default 0.01)")
    e.add_argument("--flow-shift", type=_positive_float, help="override the scheduler's flow shift (Wan: 3.0 "
                   "for 480p, 5.0 for 720p)")
    e.add_argument("--max-sequence-length", type=_positive_int, help="text tokens (default: the pipeline's, "
                   "Wan 512, CogVideoX 226)")
    g = p.add_argument_group("geometry and mask")
    g.add_argument("--height", type=_positive_int, help="output height (rounded down to the model's multiple; "
                   "default: the source's)")
    g.add_argument("--width", type=_positive_int, help="output width (likewise)")
    g.add_argument("--frames", type=_positive_int, help="use the first N frames (then trimmed to 4k+1; "
                   "default: all)")
    g.add_argument("--dilate", type=_nonneg_int, default=0, help="grow the mask by N pixels (default 0)")
    r = p.add_argument_group("runtime")
    r.add_argument("--device", help="torch device (default: cuda if available, else cpu)")
    r.add_argument("--dtype", type=_dtype, help="transformer and text encoder dtype (default: bfloat16 on CUDA, "
                   "float32 on CPU)")
    r.add_argument("--vae-dtype", type=_dtype, default="float32", help="VAE dtype (default float32)")
    r.add_argument("--backend", choices=("auto", "triton", "torch"), default="auto", help="kernel backend")
    r.add_argument("--cpu-offload", action="store_true", help="diffusers' model CPU offload (less GPU memory)")
    r.add_argument("--vae-tiling", action="store_true", help="tiled VAE encode / decode (less memory)")
    r.add_argument("--quiet", action="store_true", help="no progress bars")
    return p


def output_paths(args) -> dict:
    out = os.fspath(args.out)
    stem = os.path.splitext(out)[0]
    return {"video": out, "comparison": args.compare or f"{stem}_compare.mp4",
            "plot": args.plot or f"{stem}_schedule.png", "report": args.report or f"{stem}_report.json"}


def _check_args(args) -> None:
    """Checks that need no model: files exist, outputs can be written, options agree."""
    if not os.path.exists(args.video):
        raise EditInputError(f"--video: no such file or folder: {args.video!r}")
    if args.mask is not None and not os.path.exists(args.mask):
        raise EditInputError(f"--mask: no such file or folder: {args.mask!r}")
    if not args.prompt.strip():
        raise EditInputError("--prompt must not be empty")
    if not args.out.lower().endswith(OUT_EXTENSIONS):
        raise EditInputError(f"--out must be a video file ({', '.join(OUT_EXTENSIONS)}), got {args.out!r}")
    inputs = {os.path.realpath(p) for p in (args.video, args.mask) if p is not None}
    for name, path in output_paths(args).items():
        if os.path.realpath(path) in inputs:
            raise EditInputError(f"the {name} would be written to {path!r}, which is an input: choose another --out")
        d = os.path.dirname(os.path.abspath(path))
        if os.path.exists(d) and not os.path.isdir(d):
            raise EditInputError(f"cannot write the {name} to {path!r}: {d!r} is not a folder")
        if os.path.isdir(path):
            raise EditInputError(f"cannot write the {name} to {path!r}: it is a folder")
    if args.box is not None:
        from .masks_io import parse_box

        parse_box(args.box)
    _check_model_arg(args.model)


def _resolve_device(name: Optional[str]):
    import torch

    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except (RuntimeError, TypeError):
        raise EditInputError(f"--device: not a torch device: {name!r}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise EditInputError(f"--device {name}: CUDA is not available on this machine (use --device cpu)")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise EditInputError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s)")
    return dev


def _read_json(path):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        raise EditInputError(f"could not read {path!r}: {e}") from None


def _component_config(model: str, sub: str, filename: str = "config.json") -> Optional[dict]:
    """A component's config file of a pipeline folder, or None when it has none (or it is unreadable:
    loading the pipeline then says what is wrong)."""
    path = os.path.join(model, sub, filename)
    if not os.path.isfile(path):
        return None
    try:
        return _read_json(path)
    except EditInputError:
        return None


def _precheck_folder(model: str) -> dict:
    """Look at a local pipeline folder before loading any weights: refuse what its config files
    already show the edit cannot run (another family, an image-conditioned pipeline or transformer,
    a scheduler that does not fit the family's loop)."""
    from .pipeline import IMAGE_CONDITIONED_PIPELINES, IMAGE_CONDITIONED_WHY, check_scheduler_config

    index = os.path.join(model, "model_index.json")
    if not os.path.isfile(index):
        raise UnsupportedModelError(f"--model {model!r} is not a diffusers pipeline folder (no model_index.json): "
                                    "give a folder written by save_pretrained, or a hub id")
    info = _read_json(index)
    cls = info.get("_class_name", "?")

    def component(name):
        entry = info.get(name)
        return entry[1] if isinstance(entry, (list, tuple)) and len(entry) == 2 else None

    transformer, vae = component("transformer") or component("transformer_2"), component("vae")
    if transformer not in KNOWN_TRANSFORMERS or vae not in KNOWN_VAES:
        raise UnsupportedModelError(
            f"--model {model!r} is a {cls} (transformer {transformer}, VAE {vae}), not a supported pipeline: "
            "kvlock-edit runs Wan text-to-video checkpoints (WanTransformer3DModel with AutoencoderKLWan: Wan2.1 "
            "T2V 1.3B / 14B, Wan2.2 T2V A14B and TI2V-5B) and CogVideoX text-to-video (CogVideoXTransformer3DModel "
            "with AutoencoderKLCogVideoX)")
    if cls in IMAGE_CONDITIONED_PIPELINES:
        raise UnsupportedModelError(f"--model {model!r} is a {cls}: {IMAGE_CONDITIONED_WHY}")
    tcfg = _component_config(model, "transformer") or _component_config(model, "transformer_2") or {}
    vcfg = _component_config(model, "vae") or {}
    in_ch, channels = tcfg.get("in_channels"), vcfg.get("z_dim", vcfg.get("latent_channels"))
    if in_ch is not None and channels is not None and in_ch != channels:
        raise UnsupportedModelError(f"--model {model!r}: its transformer takes {in_ch} input channels but the VAE "
                                    f"makes {channels}-channel latents: {IMAGE_CONDITIONED_WHY}")
    scfg = _component_config(model, "scheduler", "scheduler_config.json")
    if scfg is not None and component("scheduler"):
        check_scheduler_config(component("scheduler"), scfg, KNOWN_TRANSFORMERS[transformer])
    return info


def constraints_from_folder(model: str):
    """The model's geometry from its config files (before loading weights), or None."""
    from .geometry import ModelConstraints

    vae = _component_config(model, "vae")
    tr = _component_config(model, "transformer") or _component_config(model, "transformer_2")
    if vae is None or tr is None:
        return None
    if "temporal_compression_ratio" in vae:  # AutoencoderKLCogVideoX
        t, s = int(vae["temporal_compression_ratio"]), 2 ** (len(vae.get("block_out_channels", [0] * 4)) - 1)
    else:  # AutoencoderKLWan
        t, s = int(vae.get("scale_factor_temporal") or 4), int(vae.get("scale_factor_spatial") or 8)
    return ModelConstraints.from_configs(t, s, tr)


def _check_model_arg(model: str) -> bool:
    """True for a local folder; a hub id is fine; anything else is an EditInputError."""
    if os.path.isdir(model):
        return True
    if os.path.exists(model):
        raise EditInputError(f"--model {model!r} is a file: give a diffusers pipeline folder or a hub id")
    if not HUB_ID.match(model):
        raise EditInputError(f"--model {model!r}: no such folder (and not a hub id of the form owner/name)")
    return False


def load_pipeline(model: str, *, dtype: str, vae_dtype: str, device, cpu_offload: bool = False, quiet: bool = False):
    """DiffusionPipeline.from_pretrained: a local folder with local_files_only, a hub id through
    diffusers' own download.  Returns the pipeline on ``device``."""
    import torch

    local = _check_model_arg(model)
    if local:
        _precheck_folder(model)
    try:
        from diffusers import DiffusionPipeline
        from diffusers.utils import logging as dlogging
    except ImportError as e:
        raise ImportError(f"kvlock-edit needs the diffusers extra: pip install 'kvlock-kernels[diffusers]' ({e})") \
            from None
    if quiet:
        dlogging.disable_progress_bar()
        try:
            from transformers.utils import logging as tlogging

            tlogging.disable_progress_bar()
        except ImportError:  # pragma: no cover - transformers comes with the extra
            pass
    torch_dtype = {"default": getattr(torch, dtype), "vae": getattr(torch, vae_dtype)}
    try:
        with warnings.catch_warnings():  # newer diffusers prefer `dtype`; torch_dtype works on every version
            warnings.filterwarnings("ignore", message=".*torch_dtype.*", category=FutureWarning)
            pipe = DiffusionPipeline.from_pretrained(model, torch_dtype=torch_dtype, local_files_only=local)
    except (OSError, ValueError, TypeError, KeyError, AttributeError, ImportError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UnsupportedModelError(f"could not load a pipeline from --model {model!r}: {first}") from None
    if cpu_offload:
        if device.type != "cuda":
            raise EditInputError("--cpu-offload needs a CUDA --device")
        pipe.enable_model_cpu_offload(device=device)
    else:
        pipe.to(device)
    return pipe


def _peak_memory(device) -> dict:
    import torch

    out = {"host_max_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}
    if device.type == "cuda":
        out["cuda_max_allocated_bytes"] = torch.cuda.max_memory_allocated(device)
        out["cuda_max_reserved_bytes"] = torch.cuda.max_memory_reserved(device)
    return out


class _Warnings:
    """Print kvlock-edit's warnings as one line each (no source line) and keep them for the report."""

    def __init__(self):
        self.messages: List[str] = []

    def __enter__(self):
        self._orig = warnings.showwarning

        def show(message, category, filename, lineno, file=None, line=None):
            if issubclass(category, KVLockEditWarning):
                print(f"{PROG}: warning: {message}", file=sys.stderr)
            else:
                self._orig(message, category, filename, lineno, file, line)

        warnings.showwarning = show
        return self

    def __exit__(self, *exc):
        warnings.showwarning = self._orig
        return False


# What kvlock-edit imports beyond the core package: the [diffusers] extra.
EXTRA_MODULES = ("numpy", "imageio", "imageio_ffmpeg", "diffusers", "transformers", "PIL", "matplotlib")


def _check_extras() -> None:
    import importlib.util

    missing = [m for m in EXTRA_MODULES if importlib.util.find_spec(m) is None]
    if missing:
        raise EditInputError(f"kvlock-edit needs the diffusers extra (missing: {', '.join(missing)}): "
                             "pip install 'kvlock-kernels[diffusers]'")


def run(args) -> int:
    t_start = time.perf_counter()
    timings = {}
    _check_extras()
    _check_args(args)
    import torch

    from .geometry import ModelConstraints
    from .outputs import plot_schedule, write_comparison, write_report
    from .pipeline import KVLockVideoEditor, prepare_inputs
    from .video_io import Video, write_video

    device = _resolve_device(args.device)
    dtype = args.dtype or ("bfloat16" if device.type == "cuda" else "float32")
    if args.cpu_offload and device.type != "cuda":
        raise EditInputError("--cpu-offload needs a CUDA --device")
    paths = output_paths(args)
    progress = not args.quiet

    # Read and check the inputs before loading any weights (a bad mask fails in seconds).
    t0 = time.perf_counter()
    local = os.path.isdir(args.model)
    if local:
        _precheck_folder(args.model)
    pre = (constraints_from_folder(args.model) if local else None) or ModelConstraints()
    fit = dict(box=args.box, frames=args.frames, height=args.height, width=args.width, dilate=args.dilate,
               fps=args.fps)
    source, pixel_mask, plan, fps, notes = prepare_inputs(args.video, args.mask, pre, **fit)
    timings["read"] = time.perf_counter() - t0

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    pipe = load_pipeline(args.model, dtype=dtype, vae_dtype=args.vae_dtype, device=device,
                         cpu_offload=args.cpu_offload, quiet=args.quiet)
    if args.flow_shift is not None:
        cfg = pipe.scheduler.config
        key = "flow_shift" if "flow_shift" in cfg else "shift" if "shift" in cfg else None
        if key is None:
            raise EditInputError(f"--flow-shift applies to flow-matching schedulers; this checkpoint's "
                                 f"{type(pipe.scheduler).__name__} has no shift")
        pipe.scheduler = type(pipe.scheduler).from_config(cfg, **{key: args.flow_shift})
    editor = KVLockVideoEditor.from_pipe(pipe, source=args.source, backend=args.backend, progress=progress,
                                         vae_tiling=args.vae_tiling)
    timings["load"] = time.perf_counter() - t0
    if editor.constraints != pre:  # a hub checkpoint: fit again with its real constraints
        t0 = time.perf_counter()
        source, pixel_mask, plan, fps, notes = prepare_inputs(args.video, args.mask, editor.constraints, **fit)
        timings["read"] += time.perf_counter() - t0
    for n in notes:
        print(f"{PROG}: {n}", file=sys.stderr)

    result = editor.edit(Video(source, fps, args.video), pixel_mask, args.prompt, negative_prompt=args.negative_prompt,
                         source_prompt=args.source_prompt, num_steps=args.steps, guidance=args.guidance,
                         seed=args.seed, kappa=args.kappa, window=args.window, tau=args.tau,
                         max_sequence_length=args.max_sequence_length, output_type="uint8")
    timings.update({k: v for k, v in result.timings.items() if k != "prepare"})
    timings["read"] += result.timings.get("prepare", 0.0)

    t0 = time.perf_counter()
    write_video(paths["video"], result.edited, fps)
    label = args.prompt if len(args.prompt) <= 40 else args.prompt[:39] + "…"
    write_comparison(paths["comparison"], result.source, result.mask.numpy(), result.edited, fps,
                     labels=("source", "mask (edit region)", f"edited: {label}"))
    plot_schedule(paths["plot"], result.trace, result.schedule, title=f"KV-Lock schedule: {label}")
    timings["write"] = time.perf_counter() - t0
    timings["total"] = time.perf_counter() - t_start
    report = {
        "tool": PROG,
        "version": _version(),
        "arguments": vars(args),
        "outputs": paths,
        "model": dict(result.model, path=args.model, vae_dtype=args.vae_dtype),
        "input": {"video": args.video, "mask": args.mask, "box": args.box, "source_frames": plan.source_frames,
                  "source_height": plan.source_height, "source_width": plan.source_width, "fps": fps},
        "output": {"frames": int(result.edited.shape[0]), "height": int(result.edited.shape[1]),
                   "width": int(result.edited.shape[2]), "fps": fps},
        "geometry": plan.to_dict(),
        "mask": result.fidelity.get("mask", {}),
        "schedule": result.schedule,
        "trace": result.trace,
        "timings": timings,
        "peak_memory": _peak_memory(device),
        "fidelity": _fidelity_block(result.fidelity),
        "notes": notes,
        "warnings": result.warnings,
    }
    write_report(paths["report"], report)
    bg, fg = report["fidelity"].get("background", {}), report["fidelity"].get("foreground", {})

    def fmt(v, unit=""):
        return "n/a" if v is None else f"{v:.2f}{unit}"

    print(f"{PROG}: wrote {paths['video']} ({result.edited.shape[0]} frames {result.edited.shape[1]}x"
          f"{result.edited.shape[2]} at {fps:g} fps), {paths['comparison']}, {paths['plot']}, {paths['report']}")
    print(f"{PROG}: background PSNR {fmt(bg.get('psnr'), ' dB')}, SSIM {fmt(bg.get('ssim'))}; foreground PSNR "
          f"{fmt(fg.get('psnr'), ' dB')}, mean |change| {fmt(fg.get('mean_abs_diff'))}")
    print(f"{PROG}: time " + ", ".join(f"{k} {v:.2f} s" for k, v in timings.items()))
    return 0


def _fidelity_block(fid: dict) -> dict:
    """The metrics per region, and the headline numbers flat beside them."""
    out = {k: v for k, v in fid.items() if k != "mask"}
    bg, fg = out.get("background", {}), out.get("foreground", {})
    out.update(background_psnr=bg.get("psnr"), background_ssim=bg.get("ssim"), foreground_psnr=fg.get("psnr"),
               foreground_ssim=fg.get("ssim"), foreground_mean_abs_diff=fg.get("mean_abs_diff"))
    return out


def _version() -> str:
    try:
        from .. import __version__
        return __version__
    except ImportError:  # pragma: no cover
        return "unknown"


def main(argv: Optional[List[str]] = None) -> int:
    """Run kvlock-edit with ``argv`` (default: sys.argv[1:]); returns the exit status
    (0 done, 2 bad input or usage, 1 a failure while running)."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # argparse: --help (0) or a usage error (2), message already printed
        return int(e.code) if isinstance(e.code, int) else USAGE_EXIT_CODE
    with _Warnings():
        try:
            return run(args)
        except (EditInputError, FileNotFoundError, IsADirectoryError, NotADirectoryError) as e:
            print(f"{PROG}: error: {e}", file=sys.stderr)
            return USAGE_EXIT_CODE
        except ImportError as e:
            print(f"{PROG}: error: {e}", file=sys.stderr)
            return 1
        except KeyboardInterrupt:
            print(f"{PROG}: interrupted", file=sys.stderr)
            return 130
        except MemoryError:
            print(f"{PROG}: error: out of host memory; try fewer --frames or a smaller --height / --width",
                  file=sys.stderr)
            return 1
        except RuntimeError as e:
            if "out of memory" in str(e).lower():
                print(f"{PROG}: error: out of device memory; try --cpu-offload, --vae-tiling, fewer --frames or "
                      "a smaller --height / --width", file=sys.stderr)
                return 1
            raise


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
