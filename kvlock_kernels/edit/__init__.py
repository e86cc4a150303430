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
from .errors import EditInputError, KVLockEditWarning, UnsupportedModelError
from .geometry import FitPlan, ModelConstraints, plan_fit
from .masks_io import MASK_THRESHOLD, binarize_mask, box_mask, dilate_mask, read_mask
from .metrics import fidelity, masked_psnr, masked_ssim
from .pipeline import (
    EditResult,
    KVLockVideoEditor,
    check_flow_matching,
    check_pipeline,
    check_scheduler_config,
    prepare_inputs,
)
from .video_io import Video, read_video, write_video

__all__ = [
    "EditInputError", "EditResult", "FitPlan", "KVLockEditWarning", "KVLockVideoEditor", "MASK_THRESHOLD",
    "ModelConstraints", "UnsupportedModelError", "Video", "binarize_mask", "box_mask", "check_flow_matching",
    "check_pipeline", "check_scheduler_config", "dilate_mask", "fidelity", "masked_psnr", "masked_ssim", "plan_fit",
    "prepare_inputs", "read_mask", "read_video", "write_video",
]
