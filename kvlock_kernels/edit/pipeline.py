"""The Python API of kvlock-edit: edit a video with KV-Lock on a loaded diffusers pipeline.

    from diffusers import WanPipeline
    from kvlock_kernels.edit import KVLockVideoEditor

    pipe = WanPipeline.from_pretrained("Wan-AI/Wan2.1-T2V-1.3B-Diffusers", torch_dtype=torch.bfloat16).to("cuda")
    pipe.vae.to(torch.float32)
    editor = KVLockVideoEditor.from_pipe(pipe)
    frames = editor("input.mp4", "mask.mp4", "a red sports car", num_steps=50, seed=0)   # (F, H, W, 3) in [0, 1]
    result = editor.edit("input.mp4", "mask.mp4", "a red sports car")   # frames + trace, timings, fidelity

What one edit does (``KVLockVideoEditor.edit``):

1. **prepare**: read the video and the mask (files, arrays or a box), threshold the mask
   (``masks_io``), fit both to the model with the one geometry rule (``geometry``), dilate.
2. **encode**: the pipeline's own ``encode_prompt`` (prompt, negative prompt and, when given,
   the source prompt), then the VAE: pixels to [-1, 1], ``latent_dist.mode()``, normalised
   with the VAE's ``latents_mean`` / ``latents_std`` exactly as the Wan pipelines do
   (``(z - mean) / std``).
3. **edit**: the pixel mask to the latent grid with ``kvlock_kernels.masks.pixel_mask_to_latent``
   (the VAE's causal frame grouping), then the KV-Lock loop of ``KVLockEditor`` (from
   ``kvlock_kernels.diffusers``) with a copy of the checkpoint's own scheduler and a
   ``KVLockScheduler.for_steps(num_steps, omega0=guidance)`` schedule.  Wan2.2 A14B's two
   experts (``transformer_2``, ``boundary_ratio``) are handed to the editor.
4. **decode**: ``z * std + mean``, ``vae.decode``, back to 8-bit RGB; then background PSNR /
   SSIM and the foreground change (``metrics``).

Supported (the families of ``kvlock_kernels.diffusers`` whose loop kvlock-edit runs whole):

- **Wan** text-to-video (``WanPipeline`` / ``WanVideoToVideoPipeline`` checkpoints): Wan2.1 T2V
  1.3B / 14B, Wan2.2 T2V A14B (two experts), Wan2.2 TI2V-5B in text-to-video mode
  (``expand_timesteps``).  Scheduler: flow matching, ``FlowMatchEulerDiscreteScheduler`` or a
  multistep solver with ``prediction_type="flow_prediction"`` and ``use_flow_sigmas=True``
  (Wan's UniPC with ``flow_shift``); anything else is refused.
- **CogVideoX** text-to-video: VAE ``scaling_factor``, the pipeline's rotary embeddings, and
  its DDPM v-prediction scheduler (``CogVideoXDDIMScheduler`` / ``CogVideoXDPMScheduler``).

Refused with ``UnsupportedModelError`` before any work is done: other pipelines,
image-conditioned checkpoints (I2V, VACE), HunyuanVideo (guidance-distilled), a scheduler
that does not fit the family's loop.
"""
from __future__ import annotations

import contextlib
import inspect
import numbers
import os
import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

import numpy as np
import torch

from ..control.scheduler import KVLockScheduler
from .errors import EditInputError, KVLockEditWarning, UnsupportedModelError
from .geometry import FitPlan, ModelConstraints, config_getter, plan_fit
from .masks_io import box_mask, dilate_mask, fit_mask_to_video, mask_from_array, parse_box, read_mask
from .metrics import fidelity as fidelity_metrics
from .video_io import DEFAULT_FPS, Video, read_video

__all__ = ["KVLockVideoEditor", "EditResult", "check_flow_matching", "check_v_prediction", "check_scheduler_config",
           "check_pipeline", "prepare_inputs", "as_video", "OUTPUT_TYPES", "VIDEO_FAMILIES",
           "IMAGE_CONDITIONED_PIPELINES"]

OUTPUT_TYPES = ("np", "uint8", "pt", "pil")
SOURCES = ("branch", "inversion")


# ----------------------------------------------------------------------------------------
# What can be edited
# ----------------------------------------------------------------------------------------
def check_scheduler_config(name: str, config, prediction: str = "flow") -> str:
    """Refuse (UnsupportedModelError) a scheduler, from its class name and config alone, that does
    not fit the family's loop; return a short description of one that does.

    Arguments:
        name: the scheduler's class name (``_class_name`` of a ``scheduler_config.json``).
        config: its config (a dict, a diffusers FrozenDict or an object with attributes).
        prediction: "flow" (Wan: flow matching) or "v_prediction" (CogVideoX: DDPM v-prediction).
    """
    get = config_getter(config or {})
    if prediction == "v_prediction":
        if get("prediction_type", None) != "v_prediction":
            raise UnsupportedModelError(
                f"the checkpoint's scheduler {name} (prediction_type={get('prediction_type', None)!r}) does not fit "
                "CogVideoX's loop: KV-Lock runs CogVideoX as a DDPM v-prediction model (CogVideoXDDIMScheduler, "
                "CogVideoXDPMScheduler or DDIMScheduler with prediction_type='v_prediction', as its checkpoints ship)")
        return f"{name}(prediction_type='v_prediction')"
    if name.startswith("FlowMatch"):
        if get("use_dynamic_shifting", False):
            raise UnsupportedModelError(f"the checkpoint's scheduler {name} uses dynamic shifting (its timesteps "
                                        "depend on the image size through `mu`), which KV-Lock's loop does not set; "
                                        "use a scheduler config with use_dynamic_shifting=False")
        return f"{name}(shift={get('shift', 1.0)})"
    kind = get("prediction_type", None)
    if kind == "flow_prediction" and get("use_flow_sigmas", False):
        return f"{name}(prediction_type='flow_prediction', flow_shift={get('flow_shift', 1.0)})"
    raise UnsupportedModelError(
        f"the checkpoint's scheduler {name} (prediction_type={kind!r}, use_flow_sigmas="
        f"{get('use_flow_sigmas', None)!r}) is not flow matching: KV-Lock's loop noises the source as "
        "z = (1 - sigma) x0 + sigma * eps and predicts x0 = z - sigma * v, which needs "
        "FlowMatchEulerDiscreteScheduler or a solver with prediction_type='flow_prediction' and "
        "use_flow_sigmas=True (Wan's UniPCMultistepScheduler)")


def check_flow_matching(scheduler) -> str:
    """Refuse (UnsupportedModelError) a scheduler that is not flow matching; return a short
    description of the one that is."""
    name = type(scheduler).__name__
    if not (hasattr(scheduler, "set_timesteps") and hasattr(scheduler, "step")):
        raise UnsupportedModelError(f"the pipeline's scheduler {name} is not a diffusers scheduler")
    return check_scheduler_config(name, getattr(scheduler, "config", None), "flow")


def check_v_prediction(scheduler) -> str:
    """Refuse (UnsupportedModelError) a scheduler that is not a DDPM v-prediction one (CogVideoX's loop)."""
    name = type(scheduler).__name__
    if not hasattr(scheduler, "alphas_cumprod"):
        raise UnsupportedModelError(f"the checkpoint's scheduler {name} has no alphas_cumprod: CogVideoX's loop "
                                    "needs a DDPM scheduler with prediction_type='v_prediction'")
    return check_scheduler_config(name, getattr(scheduler, "config", None), "v_prediction")


def _check_scheduler(scheduler, prediction: str) -> str:
    return check_flow_matching(scheduler) if prediction == "flow" else check_v_prediction(scheduler)


def _editor_class():
    try:
        from ..diffusers import KVLockEditor
    except ImportError as e:  # diffusers missing: the [diffusers] extra
        raise ImportError(f"kvlock-edit needs the diffusers extra: pip install 'kvlock-kernels[diffusers]' ({e})") \
            from None
    return KVLockEditor


def _adapter(transformer):
    """The integration's adapter for this transformer (its family, loop form)."""
    from ..diffusers import adapter_for

    try:
        return adapter_for(transformer)
    except TypeError as e:
        raise UnsupportedModelError(f"not a supported transformer: {e}") from None


# Families whose whole pipeline (VAE normalisation, prompts, the loop) kvlock-edit runs.
VIDEO_FAMILIES = {"wan": "Wan2.1 / Wan2.2 text-to-video", "cogvideox": "CogVideoX text-to-video"}
# Pipelines of those families that need inputs a mask edit does not have (a conditioning image
# or control video): refused by class, whatever their transformer (VACE's transformer is
# refused by its family).
IMAGE_CONDITIONED_PIPELINES = ("WanImageToVideoPipeline", "WanAnimatePipeline", "CogVideoXImageToVideoPipeline",
                               "CogVideoXFunControlPipeline")
IMAGE_CONDITIONED_WHY = ("an image-conditioned pipeline (its conditioning image or control video would pin the "
                         "source's content, which the edit may change) is not run by kvlock-edit; use a text-to-video "
                         "checkpoint")


def check_pipeline(pipe) -> Dict[str, Any]:
    """Refuse (UnsupportedModelError) a pipeline the edit loop cannot run; describe one it can."""
    name = type(pipe).__name__
    vae = getattr(pipe, "vae", None)
    transformer = getattr(pipe, "transformer", None)
    transformer_2 = getattr(pipe, "transformer_2", None)
    main = transformer if transformer is not None else transformer_2
    if vae is None or main is None or not callable(getattr(pipe, "encode_prompt", None)):
        raise UnsupportedModelError(f"{name} is not a supported pipeline: kvlock-edit needs a video VAE, a "
                                    "transformer and encode_prompt (Wan2.1 / Wan2.2 text-to-video checkpoints, "
                                    "CogVideoX text-to-video)")
    if transformer is None:
        raise UnsupportedModelError(f"{name} has no high-noise transformer (only transformer_2)")
    if any(c.__name__ in IMAGE_CONDITIONED_PIPELINES for c in type(pipe).__mro__):
        raise UnsupportedModelError(f"{name}: {IMAGE_CONDITIONED_WHY}")
    adapter = _adapter(transformer)
    family = adapter.name
    if family not in VIDEO_FAMILIES:
        why = {"wan_vace": "WanVACE needs its control video and reference inputs, which an edit from a mask does not "
                           "provide",
               "hunyuan_video": "HunyuanVideo is guidance-distilled (embedded guidance, Llama + CLIP prompts with "
                                "attention masks); kvlock-edit's CFG loop does not drive it — use "
                                "kvlock_kernels.diffusers.KVLockEditor with its transformer_kwargs"}.get(family, "")
        raise UnsupportedModelError(f"{name} with {type(transformer).__name__} is not a supported pipeline for "
                                    f"kvlock-edit ({', '.join(VIDEO_FAMILIES.values())})" + (f": {why}" if why else ""))
    vcfg = vae.config
    if family == "wan":
        if getattr(vcfg, "latents_mean", None) is None or getattr(vcfg, "latents_std", None) is None:
            raise UnsupportedModelError(f"{name}'s VAE {type(vae).__name__} has no latents_mean / latents_std: "
                                        "Wan checkpoints ship AutoencoderKLWan")
        channels = int(getattr(vcfg, "z_dim", len(vcfg.latents_mean)))
        norm = "latents_mean/latents_std"
    else:
        if getattr(vcfg, "scaling_factor", None) is None:
            raise UnsupportedModelError(f"{name}'s VAE {type(vae).__name__} has no scaling_factor")
        channels = int(getattr(vcfg, "latent_channels", 16))
        norm = "scaling_factor"
    in_ch = getattr(transformer.config, "in_channels", None)
    if in_ch is not None and in_ch != channels:
        raise UnsupportedModelError(
            f"{name}'s transformer takes {in_ch} input channels but the VAE makes {channels}-channel latents: "
            f"{IMAGE_CONDITIONED_WHY}")
    get = config_getter(getattr(pipe, "config", {}) or {})
    boundary = get("boundary_ratio", None)
    expand = bool(get("expand_timesteps", False))
    prediction = adapter.prediction
    sched = _check_scheduler(pipe.scheduler, prediction)
    return {"pipeline": name, "family": family, "transformer": type(transformer).__name__,
            "transformer_2": type(transformer_2).__name__ if transformer_2 is not None else None,
            "boundary_ratio": boundary if transformer_2 is not None else None, "expand_timesteps": expand,
            "prediction": prediction, "scheduler": type(pipe.scheduler).__name__, "scheduler_config": sched,
            "vae": type(vae).__name__, "vae_normalisation": norm, "latent_channels": channels}


# ----------------------------------------------------------------------------------------
# Results
# ----------------------------------------------------------------------------------------
@dataclass
class EditResult:
    """Everything one edit produced.

    Attributes:
        frames: the edited video in the requested output type ("np": (F, H, W, 3) float32
            in [0, 1]; "uint8": (F, H, W, 3) uint8; "pt": (F, 3, H, W) float32 in [0, 1];
            "pil": list of PIL images).
        edited, source: (F, H, W, 3) uint8, the edited video and the source after the
            geometry rule (what was encoded).
        mask: (F, H, W) bool pixel foreground mask used (after geometry and dilation).
        latent_mask: (T, h, w) bool latent-resolution mask handed to the editor.
        latents: (1, C, T, h, w) float32 edited latents (normalised), on the CPU.
        trace: one dict per step: step, timestep, sigma, sigma2, alpha, omega, s_star
            (and expert for two-expert checkpoints); sigma2 is NaN where undefined.
        timings: seconds per phase (prepare, encode, edit, decode, metrics).
        fidelity: ``metrics.fidelity`` of edited vs source (background / foreground).
        plan: the geometry rule's decision; fps: the source's frame rate.
        schedule: the KV-Lock schedule's settings (num_steps, kappa, window, ...).
        model: what was run (pipeline, transformer(s), scheduler, dtype, device).
        notes: what was done to the inputs; warnings: what changes the edit's meaning.
    """

    frames: Any
    edited: np.ndarray
    source: np.ndarray
    mask: torch.Tensor
    latent_mask: torch.Tensor
    latents: torch.Tensor
    trace: List[dict]
    timings: Dict[str, float]
    fidelity: Dict[str, Any]
    plan: FitPlan
    fps: float
    schedule: Dict[str, Any]
    model: Dict[str, Any]
    notes: List[str] = field(default_factory=list)
    warnings: List[str] = field(default_factory=list)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class _Timer:
    def __init__(self, device):
        self.device, self.times = device, {}

    @contextlib.contextmanager
    def phase(self, name):
        _sync(self.device)
        t0 = time.perf_counter()
        try:
            yield
        finally:
            _sync(self.device)
            self.times[name] = self.times.get(name, 0.0) + time.perf_counter() - t0


def _bar(total, desc, enabled):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, disable=not enabled, leave=True)


def _is_box(x) -> bool:
    return isinstance(x, (tuple, list)) and len(x) == 4 and all(
        isinstance(v, numbers.Real) and not isinstance(v, bool) for v in x)


# ----------------------------------------------------------------------------------------
# Inputs
# ----------------------------------------------------------------------------------------
def as_video(video, frames: Optional[int] = None, fps: Optional[float] = None) -> Video:
    """A path, ``Video``, array, tensor or list of PIL images -> Video ((F, H, W, 3) uint8)."""
    if isinstance(video, Video):
        return video if frames is None else Video(video.frames[:frames], video.fps, video.path)
    if isinstance(video, (str, os.PathLike)):
        return read_video(video, max_frames=frames, fps=fps)
    if isinstance(video, (list, tuple)) and video and all(hasattr(v, "convert") for v in video):  # PIL
        video = np.stack([np.asarray(v.convert("RGB")) for v in video])
    if isinstance(video, torch.Tensor):
        t = video.detach().cpu()
        if t.dim() == 4 and t.shape[-1] not in (1, 3) and t.shape[1] in (1, 3):
            t = t.permute(0, 2, 3, 1)  # (F, C, H, W) -> (F, H, W, C)
        video = t.float().numpy() if t.is_floating_point() else t.numpy()
    if not isinstance(video, np.ndarray):
        raise TypeError("video must be a path, a Video, a (F, H, W, 3) array or tensor, or a list of PIL images; "
                        f"got {type(video).__name__}")
    a = video
    if a.ndim == 3:
        a = a[..., None]
    if a.ndim != 4 or a.shape[-1] not in (1, 3) or 0 in a.shape:
        raise EditInputError(f"video must be (F, H, W, 3) (or (F, 3, H, W) as a tensor), got shape {video.shape}")
    if a.shape[-1] == 1:
        a = np.repeat(a, 3, axis=-1)
    if np.issubdtype(a.dtype, np.floating):
        if not np.isfinite(a).all() or a.min() < 0.0 or a.max() > 1.0:
            raise EditInputError("a float video must have finite values in [0, 1]")
        a = (a * 255.0).round().astype(np.uint8)
    elif a.dtype != np.uint8:
        raise EditInputError(f"video must be uint8 or float in [0, 1], got {a.dtype}")
    if frames is not None:
        a = a[:frames]
    return Video(np.ascontiguousarray(a), float(fps or DEFAULT_FPS), None)


def prepare_inputs(video, mask=None, constraints: Optional[ModelConstraints] = None, *, box=None,
                   frames: Optional[int] = None, height: Optional[int] = None, width: Optional[int] = None,
                   dilate: int = 0, fps: Optional[float] = None, notes: Optional[List[str]] = None):
    """Read the video and the mask, threshold the mask, fit both to ``constraints`` with the one
    geometry rule, dilate the mask.

    Returns:
        (source, mask, plan, fps, notes): (F, H, W, 3) uint8 frames, (F, H, W) bool mask,
        the FitPlan, the frame rate and what was done (list of strings).
    """
    notes = [] if notes is None else notes
    vid = as_video(video, frames, fps)
    nf, sh, sw = vid.frames.shape[:3]
    plan = plan_fit(nf, sh, sw, constraints or ModelConstraints(), frames=frames, height=height, width=width)
    if plan.changed:
        notes.append(plan.message)
    if mask is None and box is None:
        raise EditInputError("give a mask (a file, an array) or a box")
    if mask is not None and box is not None:
        raise EditInputError("give either a mask or a box, not both")
    if box is not None or _is_box(mask):
        pixel = box_mask(parse_box(box if box is not None else mask), plan.frames, sh, sw)
    else:
        if isinstance(mask, (str, os.PathLike)):
            raw = read_mask(mask, max_frames=nf, notes=notes)
        else:
            raw = mask_from_array(mask, notes=notes)
        pixel = fit_mask_to_video(raw, plan.frames, sh, sw, video_frames=nf, notes=notes)
    source = plan.apply_video(vid.frames)
    fitted = plan.apply_mask(pixel)
    if not bool(fitted.any()) and bool(pixel.any()):
        notes.append("the mask's foreground lies only in the frames or the border that the geometry rule cut away")
    return source, dilate_mask(fitted, dilate), plan, vid.fps, notes


# ----------------------------------------------------------------------------------------
# The editor
# ----------------------------------------------------------------------------------------
class KVLockVideoEditor:
    """Edit videos with KV-Lock on a loaded diffusers pipeline (see the module docstring).

    Arguments:
        pipe: a loaded pipeline (WanPipeline / WanVideoToVideoPipeline: Wan2.1 T2V 1.3B and 14B,
            Wan2.2 T2V A14B), already on its device.  Its scheduler is copied per edit.
        source: "branch" (the source latent noised to each step's level runs in the same
            batch; O(1) memory) or "inversion" (an inversion pass caches source K/V per step
            in a ring buffer with host spill).
        backend: kernel backend ("auto", "triton", "torch").
        progress: show progress bars for encode, edit and decode.
        cache_capacity: device slots of the inversion cache (default: the editor's).
        vae_tiling: decode/encode the VAE in spatial tiles (less memory for large videos).
    """

    def __init__(self, pipe, *, source: str = "branch", backend: str = "auto", progress: bool = True,
                 cache_capacity: Optional[int] = None, vae_tiling: bool = False):
        if source not in SOURCES:
            raise EditInputError(f"source must be one of {SOURCES}, got {source!r}")
        if backend not in ("auto", "triton", "torch"):
            raise EditInputError(f"backend must be 'auto', 'triton' or 'torch', got {backend!r}")
        self.model_info = check_pipeline(pipe)
        self.pipe, self.source, self.backend, self.progress = pipe, source, backend, progress
        self.cache_capacity = cache_capacity
        self.constraints = ModelConstraints.from_pipe(pipe)
        if vae_tiling and hasattr(pipe.vae, "enable_tiling"):
            pipe.vae.enable_tiling()

    @classmethod
    def from_pipe(cls, pipe, **kwargs) -> "KVLockVideoEditor":
        """The editor for a loaded pipeline (keyword arguments as the constructor)."""
        return cls(pipe, **kwargs)

    # -- properties of the pipeline ------------------------------------------------------
    @property
    def device(self) -> torch.device:
        dev = getattr(self.pipe, "_execution_device", None)
        return torch.device(dev) if dev is not None else next(self.pipe.transformer.parameters()).device

    @property
    def transformer_dtype(self) -> torch.dtype:
        return self.pipe.transformer.dtype

    def _vae_stats(self, device):
        """(mean, std) broadcastable to (1, C, T, h, w): Wan's latents_mean / latents_std, or
        (0, 1 / scaling_factor) for VAEs with one scaling factor (CogVideoX)."""
        cfg = self.pipe.vae.config
        if self.model_info["vae_normalisation"] == "scaling_factor":
            c = self.model_info["latent_channels"]
            mean = torch.zeros(1, c, 1, 1, 1, device=device)
            return mean, torch.full_like(mean, 1.0 / float(cfg.scaling_factor))
        c = len(cfg.latents_mean)
        mean = torch.tensor(cfg.latents_mean, dtype=torch.float32, device=device).view(1, c, 1, 1, 1)
        std = torch.tensor(cfg.latents_std, dtype=torch.float32, device=device).view(1, c, 1, 1, 1)
        return mean, std

    def prepare(self, video, mask=None, **kwargs):
        """``prepare_inputs`` with this pipeline's constraints."""
        return prepare_inputs(video, mask, self.constraints, **kwargs)

    @torch.no_grad()
    def encode_video(self, frames: np.ndarray) -> torch.Tensor:
        """(F, H, W, 3) uint8 -> (1, C, T, h, w) float32 latents, normalised as the pipeline's transformer
        expects them: ``(z - latents_mean) / latents_std`` (Wan) or ``z * scaling_factor`` (CogVideoX);
        z is the posterior's mode (deterministic)."""
        vae, device = self.pipe.vae, self.device
        x = torch.from_numpy(np.ascontiguousarray(frames)).to(device).permute(3, 0, 1, 2)[None]
        x = (x.float() / 127.5 - 1.0).to(vae.dtype)
        dist = vae.encode(x).latent_dist
        z = dist.mode() if hasattr(dist, "mode") else dist.mean
        mean, std = self._vae_stats(z.device)
        return (z.float() - mean) / std

    @torch.no_grad()
    def decode_latents(self, latents: torch.Tensor) -> np.ndarray:
        """(1, C, T, h, w) normalised latents -> (F, H, W, 3) uint8 (the inverse normalisation, ``vae.decode``)."""
        vae = self.pipe.vae
        mean, std = self._vae_stats(latents.device)
        z = (latents.float() * std + mean).to(vae.dtype)
        video = vae.decode(z, return_dict=False)[0]
        video = ((video[0].float().clamp(-1, 1) + 1.0) * 127.5).round().to(torch.uint8)
        return video.permute(1, 2, 3, 0).cpu().numpy()

    def default_max_sequence_length(self) -> int:
        """The text length the pipeline itself uses: CogVideoX's transformer fixes it
        (``max_text_seq_length``, 226); otherwise the pipeline's __call__ default (Wan 512)."""
        limit = getattr(self.pipe.transformer.config, "max_text_seq_length", None)
        if self.model_info["family"] == "cogvideox" and limit is not None:
            return int(limit)
        try:
            default = inspect.signature(self.pipe.__call__).parameters["max_sequence_length"].default
        except (KeyError, TypeError, ValueError):
            default = inspect.Parameter.empty
        return int(default) if isinstance(default, int) else 512

    def _check_text_length(self, n: int) -> None:
        limit = getattr(self.pipe.transformer.config, "max_text_seq_length", None)
        if self.model_info["family"] == "cogvideox" and limit is not None and n != int(limit):
            raise EditInputError(f"--max-sequence-length {n}: CogVideoX's transformer takes exactly {limit} text "
                                 "tokens (max_text_seq_length)")

    def _transformer_kwargs(self, plan, latent_shape_) -> Optional[dict]:
        """Model inputs shared by every branch: CogVideoX's rotary embeddings, built by the pipeline's
        own ``_prepare_rotary_positional_embeddings`` for this size."""
        cfg = self.pipe.transformer.config
        if self.model_info["family"] == "cogvideox" and getattr(cfg, "use_rotary_positional_embeddings", False):
            rope = self.pipe._prepare_rotary_positional_embeddings(plan.height, plan.width, latent_shape_[0],
                                                                    self.device)
            return {"image_rotary_emb": rope}
        return None

    @torch.no_grad()
    def encode_prompts(self, prompt: str, negative_prompt: str = "", source_prompt: Optional[str] = None, *,
                       max_sequence_length: Optional[int] = None):
        """The pipeline's own encode_prompt -> (prompt_embeds, negative_prompt_embeds, source_embeds or None),
        in the transformer's dtype."""
        if not isinstance(prompt, str) or not prompt.strip():
            raise EditInputError("prompt must be a non-empty string")
        enc = self.pipe.encode_prompt
        params = inspect.signature(enc).parameters
        kw = {"device": self.device}
        n = self.default_max_sequence_length() if max_sequence_length is None else int(max_sequence_length)
        self._check_text_length(n)
        if "max_sequence_length" in params:
            kw["max_sequence_length"] = n
        pos, neg = enc(prompt, negative_prompt=negative_prompt or "", do_classifier_free_guidance=True, **kw)
        src = None
        if source_prompt is not None:
            src = enc(source_prompt, negative_prompt=None, do_classifier_free_guidance=False, **kw)[0]
        dt = self.transformer_dtype
        return pos.to(dt), neg.to(dt), (src.to(dt) if src is not None else None)

    def make_schedule(self, num_steps: int, *, guidance: float = 5.0, kappa: Optional[int] = None,
                      window: Optional[int] = None, tau: Optional[float] = None, hold: bool = False,
                      device=None):
        """The KV-Lock schedule for ``num_steps`` (``KVLockScheduler.for_steps``: kappa and window
        scale with the step count unless given).  ``hold``: alpha_pre and omega0 at every step
        (kappa = 0; used for an empty mask).  Returns (scheduler, warnings as strings)."""
        if isinstance(num_steps, bool) or not isinstance(num_steps, numbers.Integral) or num_steps < 1:
            raise EditInputError(f"--steps must be a positive integer, got {num_steps!r}")
        if not isinstance(guidance, numbers.Real) or isinstance(guidance, bool) or not np.isfinite(guidance) \
                or guidance < 0:
            raise EditInputError(f"--guidance (omega0) must be a finite number >= 0, got {guidance!r}")
        kw = {"omega0": float(guidance), "device": device or self.device}
        if tau is not None:
            kw["tau"] = tau
        msgs: List[str] = []
        try:
            if hold:
                window = window or 2
                return KVLockScheduler(num_steps, kappa=0, window=window, **kw), msgs
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                sched = KVLockScheduler.for_steps(num_steps, kappa=kappa, window=window, **kw)
        except (TypeError, ValueError) as e:
            raise EditInputError(f"KV-Lock schedule: {e}") from None
        for w in caught:  # for_steps' own "never activates" warning is restated below, with the CLI's names
            if "for_steps" not in str(w.message):
                warnings.warn(str(w.message), w.category, stacklevel=3)
        if not sched.can_activate and kappa != 0:
            k_how = f"round(0.4 * steps) = {sched.kappa}" if kappa is None else f"{sched.kappa} (--kappa)"
            w_how = f"max(2, round(0.2 * steps)) = {sched.window}" if window is None else f"{sched.window} (--window)"
            need = KVLockScheduler.min_active_steps(kappa=kappa, window=window)
            msgs.append(
                f"--steps {num_steps} is below what KV-Lock's schedule needs: it runs in the last kappa = {k_how} "
                f"steps and measures the x0-hat variance over a window of {w_how} steps, and no step can see "
                f"{sched.window} recorded steps inside the last {sched.kappa}; so alpha stays alpha_pre = "
                f"{sched.alpha_pre:g} (full background lock) and omega stays omega0 = {sched.omega0:g} for the "
                "whole run"
                + (f"; the schedule activates from {need} steps (SPEC: 50 steps, kappa 20, window 10)" if need else ""))
        return sched, msgs

    # -- the edit --------------------------------------------------------------------------
    def edit(self, video, mask=None, prompt: str = None, *, negative_prompt: str = "",
             source_prompt: Optional[str] = None, num_steps: int = 50, guidance: float = 5.0,
             seed: Optional[int] = None, generator: Optional[torch.Generator] = None, box=None,
             frames: Optional[int] = None, height: Optional[int] = None, width: Optional[int] = None,
             dilate: int = 0, fps: Optional[float] = None, kv_lock=None, kappa: Optional[int] = None,
             window: Optional[int] = None, tau: Optional[float] = None, max_sequence_length: Optional[int] = None,
             output_type: str = "np", compute_metrics: bool = True, num_inference_steps: Optional[int] = None,
             guidance_scale: Optional[float] = None, num_frames: Optional[int] = None) -> EditResult:
        """Edit ``video`` inside ``mask`` toward ``prompt``; the background is locked to the source.

        Arguments:
            video: a path (video file, GIF, image folder), a ``Video``, a (F, H, W, 3) uint8 or
                [0, 1] float array / tensor ((F, 3, H, W) tensors too), or a list of PIL images.
            mask: a path (video, image for all frames, folder, .npy), an (F, H, W) / (H, W)
                array or tensor (bool, uint8 0/255, float in [0, 1]), or a box (x0, y0, x1, y1).
            prompt: what the foreground becomes.
            negative_prompt: the unconditional branch's prompt (default "": the pipeline's).
            source_prompt: conditioning of the source branch / inversion (default: the negative
                prompt's embeddings, the editor's default).
            num_steps: denoising steps; the schedule scales with it (``KVLockScheduler.for_steps``).
            guidance: omega0, the base guidance scale (Wan: 5.0).
            seed / generator: the initial and source-branch noise (a CPU generator).
            box: a box instead of a mask (pixels of the source, or fractions in [0, 1]).
            frames, height, width: fit the video to these (see ``geometry``); default: all of
                the video at its own size, trimmed / cropped to the model's constraints.
            dilate: grow the mask by this many pixels at the model's resolution.
            fps: frame rate of array inputs and image folders (default 16).
            kv_lock: a ready KVLockScheduler (overrides kappa / window / tau / guidance).
            kappa, window, tau: schedule settings (default: scaled from num_steps; tau 0.01).
            max_sequence_length: text tokens (default: the pipeline's own, Wan 512, CogVideoX 226).
            output_type: "np" (float32 [0, 1], like diffusers), "uint8", "pt" or "pil".
            compute_metrics: compute background PSNR / SSIM and the foreground change.
            num_inference_steps, guidance_scale, num_frames: diffusers' names for num_steps,
                guidance and frames (either may be given, not both).
        Returns:
            EditResult (``.frames`` is the edited video).
        """
        for alias, value, name, current, default in (("num_inference_steps", num_inference_steps, "num_steps",
                                                      num_steps, 50),
                                                     ("guidance_scale", guidance_scale, "guidance", guidance, 5.0),
                                                     ("num_frames", num_frames, "frames", frames, None)):
            if value is not None and current != default:
                raise EditInputError(f"give {name} or {alias}, not both")
        num_steps = num_steps if num_inference_steps is None else num_inference_steps
        guidance = guidance if guidance_scale is None else guidance_scale
        frames = frames if num_frames is None else num_frames
        if output_type not in OUTPUT_TYPES:
            raise EditInputError(f"output_type must be one of {OUTPUT_TYPES}, got {output_type!r}")
        if prompt is None:
            raise EditInputError("prompt is required")
        device = self.device
        timer = _Timer(device)
        notes: List[str] = []
        warns: List[str] = []

        def warn(msg):
            warns.append(msg)
            warnings.warn(msg, KVLockEditWarning, stacklevel=3)

        with timer.phase("prepare"):
            source, pixel_mask, plan, fps, notes = self.prepare(video, mask, box=box, frames=frames, height=height,
                                                                width=width, dilate=dilate, fps=fps, notes=notes)
            fg_fraction = float(pixel_mask.float().mean())
            empty, full = not bool(pixel_mask.any()), bool(pixel_mask.all())
            if empty:
                warn("the mask has no foreground pixel: there is nothing to edit. KV-Lock locks every token to the "
                     "source; with no foreground to measure, the schedule is held at alpha = alpha_pre (1.0, full "
                     "lock) and omega = omega0 for every step, so the output reconstructs the source through the model")
            elif full:
                warn("the mask covers every pixel: no token is locked (lock weight alpha * (1 - m) = 0 everywhere), "
                     "so the source never reaches the edit and KV-Lock reduces to generating a new video from the "
                     "prompt with CFG-Zero* guidance (omega still follows the whole-frame x0-hat variance); "
                     "background fidelity is undefined")
            if kv_lock is None:
                kv_lock, sched_msgs = self.make_schedule(num_steps, guidance=guidance, kappa=kappa, window=window,
                                                         tau=tau, hold=empty, device=device)
                for m in sched_msgs:
                    warn(m)
            elif not isinstance(kv_lock, KVLockScheduler):
                raise TypeError(f"kv_lock must be a KVLockScheduler, got {type(kv_lock).__name__}")
            elif kv_lock.num_steps != num_steps:
                raise EditInputError(f"kv_lock was built for {kv_lock.num_steps} steps, the edit asks for {num_steps}")
            if generator is None:
                generator = torch.Generator("cpu").manual_seed(0 if seed is None else int(seed))
            elif not isinstance(generator, torch.Generator) or generator.device.type != "cpu":
                raise EditInputError("generator must be a CPU torch.Generator (the editor draws its noise on the CPU "
                                     "so that a seed gives the same edit on every device); or pass seed=")
        # pipe.scheduler may have been replaced since from_pipe: check the copy this edit runs, before encoding
        scheduler = self._scheduler_copy()
        scheduler_config = _check_scheduler(scheduler, self.model_info["prediction"])
        schedule = {k: getattr(kv_lock, k, None) for k in ("num_steps", "kappa", "window", "tau", "omega0", "b",
                                                           "alpha_pre", "omega_lower")}
        schedule["activates"] = bool(kv_lock.can_activate)
        schedule["held_for_empty_mask"] = empty

        bar = _bar(2, "encode", self.progress)
        with timer.phase("encode"):
            pos, neg, src = self.encode_prompts(prompt, negative_prompt, source_prompt,
                                                max_sequence_length=max_sequence_length)
            bar.update(1)
            latents = self.encode_video(source)
            bar.update(1)
        bar.close()
        from ..control.masks import latent_size, pixel_mask_to_latent

        expected = latent_size(plan.frames, plan.height, plan.width, self.constraints.vae_stride)
        latent_mask = pixel_mask_to_latent(pixel_mask.to(device), vae_stride=self.constraints.vae_stride).bool()
        if tuple(latents.shape[2:]) != expected or tuple(latent_mask.shape) != tuple(latents.shape[2:]):
            raise RuntimeError(f"latent shapes disagree: VAE {tuple(latents.shape[2:])}, planned {expected}, "
                               f"mask {tuple(latent_mask.shape)} (kvlock_kernels.masks.pixel_mask_to_latent must "
                               "group frames as the VAE does)")
        model = dict(self.model_info, dtype=str(self.transformer_dtype).replace("torch.", ""), device=str(device),
                     source=self.source, backend=self.backend, scheduler=type(scheduler).__name__,
                     scheduler_config=scheduler_config)

        with timer.phase("edit"):
            editor = self._make_editor(scheduler, kv_lock)
            kw = {"generator": generator}
            if src is not None:
                kw["source_prompt_embeds"] = src
            extra = self._transformer_kwargs(plan, tuple(latents.shape[2:]))
            if extra:
                kw["transformer_kwargs"] = extra
            edited_latents, trace = editor.edit(latents, latent_mask, pos, neg, num_steps, **kw)
        trace = self._complete_trace(trace, scheduler)

        bar = _bar(1, "decode", self.progress)
        with timer.phase("decode"):
            edited = self.decode_latents(edited_latents)
            bar.update(1)
        bar.close()
        if edited.shape != source.shape:
            raise RuntimeError(f"decoded video {edited.shape} differs from the source {source.shape}")
        fid = {}
        if compute_metrics:
            with timer.phase("metrics"):
                fid = fidelity_metrics(torch.from_numpy(source).to(device), torch.from_numpy(edited).to(device),
                                       pixel_mask.to(device))
        fid["mask"] = {"foreground_fraction": fg_fraction, "empty": empty, "all_foreground": full,
                       "latent_foreground_fraction": float(latent_mask.float().mean())}
        return EditResult(frames=_convert(edited, output_type), edited=edited, source=source, mask=pixel_mask.cpu(),
                          latent_mask=latent_mask.cpu(), latents=edited_latents.float().cpu(), trace=trace,
                          timings=dict(timer.times), fidelity=fid, plan=plan, fps=fps, schedule=schedule, model=model,
                          notes=notes, warnings=warns)

    def __call__(self, video, mask=None, prompt: str = None, **kwargs):
        """``edit(...).frames``: the edited video ((F, H, W, 3) float32 in [0, 1] by default)."""
        return self.edit(video, mask, prompt, **kwargs).frames

    # -- helpers ---------------------------------------------------------------------------
    def _scheduler_copy(self):
        s = self.pipe.scheduler
        return type(s).from_config(s.config)

    def _make_editor(self, scheduler, kv_lock):
        kw = {"kv_lock": kv_lock, "source": self.source, "backend": self.backend, "progress": self.progress}
        if self.cache_capacity is not None:
            kw["cache_capacity"] = self.cache_capacity
        t2 = getattr(self.pipe, "transformer_2", None)
        if t2 is not None:
            kw["transformer_2"] = t2
            kw["boundary_ratio"] = self.model_info["boundary_ratio"]
        if self.model_info["expand_timesteps"]:
            kw["expand_timesteps"] = True
        # The checkpoint passed check_pipeline: what KVLockEditor refuses now is an argument
        # (source, backend, cache capacity, progress), a usage error, not an unsupported model.
        try:
            return _editor_class()(self.pipe.transformer, scheduler, **kw)
        except (TypeError, ValueError) as e:
            raise EditInputError(f"KVLockEditor refused the edit's settings: {e}") from None

    def _complete_trace(self, trace, scheduler) -> List[dict]:
        """The editor's rows (step, sigma2, alpha, omega, s_star, expert index) with the step's timestep,
        its sigma (flow matching) and the expert's name."""
        timesteps = scheduler.timesteps
        sigmas = getattr(scheduler, "sigmas", None) if self.model_info["prediction"] == "flow" else None
        out = []
        for row in trace:
            k = int(row["step"])
            row = dict(row, timestep=float(timesteps[k]),
                       expert="transformer_2" if int(row.get("expert", 0)) == 1 else "transformer")
            if sigmas is not None:
                row["sigma"] = float(sigmas[k])
            out.append(row)
        return out


def _convert(frames: np.ndarray, output_type: str):
    if output_type == "uint8":
        return frames
    if output_type == "np":
        return frames.astype(np.float32) / 255.0
    if output_type == "pt":
        return torch.from_numpy(frames).permute(0, 3, 1, 2).float() / 255.0
    from PIL import Image

    return [Image.fromarray(f) for f in frames]
