"""kvlock-edit: edit a video with KV-Lock, from a video file and a mask to an mp4.

Command line (``kvlock-edit`` or ``python -m kvlock_kernels.edit``)::

    kvlock-edit --model Wan-AI/Wan2.1-T2V-1.3B-Diffusers --video in.mp4 --mask mask.mp4 \\
                --prompt "a red sports car" --out edited.mp4

Python API on a loaded diffusers pipeline::

    from kvlock_kernels.edit import KVLockVideoEditor
    frames = KVLockVideoEditor.from_pipe(pipe)("in.mp4", "mask.mp4", "a red sports car")

Modules: ``cli`` (the command), ``pipeline`` (the API), ``video_io`` (read / write video),
``masks_io`` (masks from files, thresholding, dilation), ``geometry`` (the one resize /
crop / trim rule), ``metrics`` (background PSNR / SSIM), ``outputs`` (comparison, plot,
report).  Heavy dependencies (diffusers, transformers) are imported only when used.
"""
import importlib

from .errors import EditInputError, KVLockEditWarning, UnsupportedModelError

# The rest is imported on first use (PEP 562), so that ``kvlock-edit`` can start, parse its
# arguments and say which extra is missing before numpy, imageio or diffusers are imported.
_LAZY = {
    "FitPlan": "geometry", "ModelConstraints": "geometry", "plan_fit": "geometry",
    "MASK_THRESHOLD": "masks_io", "binarize_mask": "masks_io", "box_mask": "masks_io", "dilate_mask": "masks_io",
    "read_mask": "masks_io",
    "fidelity": "metrics", "masked_psnr": "metrics", "masked_ssim": "metrics",
    "EditResult": "pipeline", "KVLockVideoEditor": "pipeline", "check_flow_matching": "pipeline",
    "check_pipeline": "pipeline", "check_scheduler_config": "pipeline", "prepare_inputs": "pipeline",
    "Video": "video_io", "read_video": "video_io", "write_video": "video_io",
}


def __getattr__(name):
    if name in _LAZY:
        return getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["EditInputError", "KVLockEditWarning", "UnsupportedModelError", *_LAZY]
