"""KVLockEditor: SPEC's editing loop on a diffusers video transformer.

    from kvlock_kernels.diffusers import KVLockEditor
    editor = KVLockEditor.from_pipeline(pipe)               # or KVLockEditor(pipe.transformer, pipe.scheduler)
    latents, trace = editor.edit(source_latents, fg_mask, prompt_embeds, negative_prompt_embeds,
                                 num_steps=50, generator=gen)

Each step the editor asks the KVLockScheduler for (alpha, omega), builds the step's
``KVLockPlan`` (lock weights ``alpha * (1 - m)`` over the video tokens, computed once on
the device) and hands it to the transformer(s) with ``set_plan``; then one model call on
the batch [source, cond, uncond] (source branch at ``SOURCE_INDEX``) or [cond, uncond]
(inversion cache), CFG-Zero* guidance, the x0-hat the scheduler's variance is measured on,
and the noise scheduler's own step.  The family's adapter supplies the model inputs
(image conditioning, per-token timesteps, ...), the latent layout and the loop form:
flow matching (Wan family, HunyuanVideo) or DDPM v-prediction (CogVideoX).
"""
from __future__ import annotations

import contextlib
import math
import numbers
from typing import Optional

import torch

from ..._validate import check_backend, check_bool, check_choice, check_int, check_mask, describe
from ...cache.ring_buffer import KVRingBuffer
from ...control.cfg_zero_star_scale import cfg_zero_star_scale
from ...control.kvlock_guidance import kvlock_guidance
from ...control.masks import latent_mask_to_tokens
from ...control.scheduler import KVLockScheduler
from .adapters import adapter_for
from .install import _unwrap, check_attention, installed, set_plan
from .parallel import cp_config, cp_degree
from .plan import SOURCE_INDEX, KVLockPlan

__all__ = ["KVLockEditor"]

SOURCES = ("branch", "inversion")


def _with_source(source, targets: list) -> list:
    """The batch order of branch mode: the source at SOURCE_INDEX among the targets."""
    return targets[:SOURCE_INDEX] + [source] + targets[SOURCE_INDEX:]


def _without_source(x: torch.Tensor) -> torch.Tensor:
    return torch.cat([x[:SOURCE_INDEX], x[SOURCE_INDEX + 1:]])


def _scheduler_kind(sched) -> str:
    """"flow" for flow-matching schedulers, "v_prediction" for DDPM v-prediction ones;
    TypeError / ValueError for anything else."""
    from diffusers import (
        CogVideoXDDIMScheduler,
        CogVideoXDPMScheduler,
        DDIMScheduler,
        DPMSolverMultistepScheduler,
        FlowMatchEulerDiscreteScheduler,
        UniPCMultistepScheduler,
    )

    config = getattr(sched, "config", None)
    if isinstance(sched, FlowMatchEulerDiscreteScheduler):
        if config.use_dynamic_shifting:
            raise ValueError("FlowMatchEulerDiscreteScheduler with use_dynamic_shifting=True needs a resolution-"
                             "dependent mu the editor does not compute; use the checkpoint's fixed shift "
                             "(use_dynamic_shifting=False, shift=...)")
        return "flow"
    if isinstance(sched, (UniPCMultistepScheduler, DPMSolverMultistepScheduler)):
        if config.use_flow_sigmas and config.prediction_type == "flow_prediction":
            return "flow"
        raise ValueError(f"{type(sched).__name__} runs flow matching only with use_flow_sigmas=True and "
                         f"prediction_type='flow_prediction' (as Wan's checkpoints configure it); got "
                         f"use_flow_sigmas={config.use_flow_sigmas}, prediction_type={config.prediction_type!r}")
    if isinstance(sched, (DDIMScheduler, CogVideoXDDIMScheduler, CogVideoXDPMScheduler)):
        if config.prediction_type == "v_prediction":
            return "v_prediction"
        raise ValueError(f"{type(sched).__name__} with prediction_type={config.prediction_type!r}: the editor runs "
                         "DDPM loops in v-prediction form (CogVideoX's checkpoints); set "
                         "prediction_type='v_prediction'")
    raise TypeError(
        f"noise_scheduler must be a flow-matching scheduler (FlowMatchEulerDiscreteScheduler, or UniPC / DPM-Solver "
        f"multistep with use_flow_sigmas=True and prediction_type='flow_prediction') for flow-matching models, or a "
        f"v-prediction DDIM scheduler (CogVideoXDDIMScheduler, CogVideoXDPMScheduler, DDIMScheduler) for CogVideoX; "
        f"got {describe(sched)}")


def _check_embeds(name, e, text_dim):
    if not isinstance(e, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor (1, L, D) of text-encoder embeddings (encode prompts with "
                        f"the pipeline's encode_prompt), got {describe(e)}")
    if not e.is_floating_point():
        raise TypeError(f"{name} must be floating point, got {e.dtype}")
    if e.dim() != 3 or e.shape[0] != 1:
        raise ValueError(f"{name} must be (1, L, D), got {tuple(e.shape)}")
    if text_dim is not None and e.shape[2] != text_dim:
        raise ValueError(f"{name} must have the transformer's text width D = {text_dim}, got {tuple(e.shape)}")


class KVLockEditor:
    """SPEC's KV-Lock editing loop on a diffusers video transformer.

    Arguments:
        transformer: a supported diffusers video transformer (``adapter_for``): Wan2.1/2.2
            (WanTransformer3DModel), WanVACE, CogVideoX, HunyuanVideo.
        noise_scheduler: the checkpoint's scheduler: flow matching
            (FlowMatchEulerDiscreteScheduler; UniPC / DPM-Solver with flow sigmas) for Wan
            and HunyuanVideo, v-prediction DDIM (CogVideoXDDIMScheduler /
            CogVideoXDPMScheduler / DDIMScheduler) for CogVideoX.
        transformer_2: Wan2.2 A14B's low-noise expert; used for timesteps below
            ``boundary_ratio * num_train_timesteps`` exactly as WanPipeline switches.
        boundary_ratio: the switch point, in (0, 1) (``pipe.config.boundary_ratio``).
        kv_lock: the KVLockScheduler for alpha / omega; default
            ``KVLockScheduler.for_steps(num_steps)`` per edit (SPEC's 50-step kappa and
            window scaled to the step count).
        source: "branch" (the source latent noised to each level runs in the same batch,
            its K/V read in place) or "inversion" (an inversion pass captures the source's
            K/V per (step, layer) in a KVRingBuffer with host spill, replayed while
            denoising; "cache" is accepted as a synonym).
        cache_capacity: device slots of the inversion ring (an int >= 1; default two steps
            of layers, so the next step is prefetched while the current one runs).
        backend: backend of the control ops (guidance, CFG-Zero*), and of the fused kernel
            with attention="fused".
        attention: "diffusers" (lock in the epilogue, then diffusers' attention dispatch)
            or "fused" (the library's single-pass kernel); see ``enable_kvlock``.
        expand_timesteps: Wan2.2 TI2V per-token timesteps (``pipe.config.expand_timesteps``);
            None: from the model (48-channel Wan latents).
        progress: show a tqdm progress bar.
    """

    def __init__(self, transformer, noise_scheduler, *, transformer_2=None, boundary_ratio: Optional[float] = None,
                 kv_lock: Optional[KVLockScheduler] = None, source: str = "branch",
                 cache_capacity: Optional[int] = None, backend: str = "auto", progress: bool = True,
                 attention: str = "diffusers", expand_timesteps: Optional[bool] = None):
        self.adapter = adapter_for(transformer)
        if transformer_2 is not None:
            if adapter_for(transformer_2) is not self.adapter or type(_unwrap(transformer_2)) is not type(
                    _unwrap(transformer)):
                raise TypeError(f"transformer_2 must be the same kind of model as transformer "
                                f"({type(transformer).__name__}), got {describe(transformer_2)}")
            if len(self.adapter.attention_modules(transformer_2)) != len(self.adapter.attention_modules(transformer)):
                raise ValueError("transformer_2 must have as many attention layers as transformer")
            if boundary_ratio is None:
                raise ValueError("transformer_2 (Wan2.2 A14B's low-noise expert) needs boundary_ratio "
                                 "(pipe.config.boundary_ratio: the expert switch point, e.g. 0.875)")
        if boundary_ratio is not None:
            if transformer_2 is None:
                raise ValueError("boundary_ratio switches to transformer_2 below the boundary: pass transformer_2")
            if isinstance(boundary_ratio, bool) or not isinstance(boundary_ratio, numbers.Real):
                raise TypeError(f"boundary_ratio must be a number in (0, 1), got {describe(boundary_ratio)}")
            if not 0.0 < float(boundary_ratio) < 1.0:
                raise ValueError(f"boundary_ratio must be in (0, 1), got {boundary_ratio}")
        if kv_lock is not None and not isinstance(kv_lock, KVLockScheduler):
            raise TypeError(f"kv_lock must be a KVLockScheduler or None, got {describe(kv_lock)}")
        check_choice("source", source, SOURCES + ("cache",))
        if cache_capacity is not None:
            cache_capacity = check_int("cache_capacity", cache_capacity, low=1)
        if expand_timesteps is not None and not isinstance(expand_timesteps, bool):
            raise TypeError(f"expand_timesteps must be a bool or None, got {describe(expand_timesteps)}")
        check_backend(backend)
        check_bool("progress", progress)
        check_attention(self.adapter, attention)
        self.loop = _scheduler_kind(noise_scheduler)
        if self.loop != self.adapter.prediction:
            want = ("a flow-matching scheduler" if self.adapter.prediction == "flow"
                    else "a v-prediction DDIM scheduler (CogVideoXDDIMScheduler / CogVideoXDPMScheduler)")
            raise TypeError(f"{self.adapter.family} is a {self.adapter.prediction} model and needs {want}, got "
                            f"{type(noise_scheduler).__name__}")
        self.transformer, self.transformer_2 = transformer, transformer_2
        self.boundary_ratio = None if boundary_ratio is None else float(boundary_ratio)
        self.noise_scheduler = noise_scheduler
        self.kv_lock = kv_lock
        self.source = "inversion" if source == "cache" else source
        self.cache_capacity, self.backend, self.progress = cache_capacity, backend, progress
        self.attention, self.expand_timesteps = attention, expand_timesteps

    @classmethod
    def from_pipeline(cls, pipe, **kwargs) -> "KVLockEditor":
        """An editor on a diffusers pipeline's transformer(s) and scheduler, with its
        ``boundary_ratio`` (Wan2.2 A14B) and ``expand_timesteps`` (Wan2.2 TI2V)."""
        config = getattr(pipe, "config", {})
        kwargs.setdefault("transformer_2", getattr(pipe, "transformer_2", None))
        kwargs.setdefault("boundary_ratio", config.get("boundary_ratio") if kwargs["transformer_2"] is not None
                          else None)
        if config.get("expand_timesteps") is not None:
            kwargs.setdefault("expand_timesteps", bool(config.get("expand_timesteps")))
        return cls(pipe.transformer, pipe.scheduler, **kwargs)

    # ------------------------------------------------------------------ helpers
    @property
    def experts(self) -> list:
        return [m for m in (self.transformer, self.transformer_2) if m is not None]

    def _expert(self, t) -> torch.nn.Module:
        """WanPipeline's rule: the high-noise expert while t >= boundary (t: a number, or a
        0-dim tensor, read on the host)."""
        if self.transformer_2 is None:
            return self.transformer
        boundary = self.boundary_ratio * self.noise_scheduler.config.num_train_timesteps
        return self.transformer if float(t) >= boundary else self.transformer_2

    def _predict(self, model, latents, t, embeds, ctx, branch_kwargs) -> torch.Tensor:
        """The model's prediction in fp32, (B, C, F, H, W); inputs cast to its dtype."""
        kwargs = self.adapter.model_inputs(model, latents, t, embeds, ctx, branch_kwargs)
        out = model(**kwargs)[0]
        return self.adapter.from_model_layout(out).float()

    def _text_dim(self) -> Optional[int]:
        config = self.transformer.config
        for key in ("text_dim", "text_embed_dim"):
            if key in config:
                return int(config[key])
        return None

    def _kv_shape(self, source_latents) -> tuple:
        """(S, H, D) of one layer's video K for one batch entry (this rank's shard under
        context parallelism)."""
        grid = self.adapter.video_grid(self.transformer, self.adapter.to_model_layout(source_latents))
        S = math.prod(grid)
        _, attn = self.adapter.attention_modules(self.transformer)[0]
        cp = cp_config(attn.processor)
        if cp is not None:
            S //= cp_degree(cp)
        heads = attn.heads
        return S, heads, attn.to_k.out_features // heads

    def _branch_kwargs(self, prompt_kwargs, negative_prompt_kwargs, source_prompt_kwargs, with_source: bool) -> dict:
        """Per-branch model inputs concatenated in the batch order."""
        required = getattr(self.adapter, "branch_inputs", ())
        for name, d in (("prompt_kwargs", prompt_kwargs), ("negative_prompt_kwargs", negative_prompt_kwargs),
                        ("source_prompt_kwargs", source_prompt_kwargs)):
            if d is not None and not isinstance(d, dict):
                raise TypeError(f"{name} must be a dict of per-branch model inputs or None, got {describe(d)}")
        dicts = [prompt_kwargs or {}, negative_prompt_kwargs or {}]
        if with_source:
            src = source_prompt_kwargs if source_prompt_kwargs is not None else negative_prompt_kwargs
            dicts = _with_source(src or {}, dicts)
        names = set().union(*dicts)
        for name in required:
            if any(name not in d for d in dicts):
                raise ValueError(f"{self.adapter.family} needs {name!r} per branch: pass it in prompt_kwargs and "
                                 "negative_prompt_kwargs (and source_prompt_kwargs for the source prompt)")
        out = {}
        for name in names:
            parts = [d.get(name) for d in dicts]
            if any(p is None for p in parts):
                raise ValueError(f"per-branch input {name!r} must be given for every branch")
            for p in parts:
                if not isinstance(p, torch.Tensor) or p.dim() == 0 or p.shape[0] != 1:
                    raise ValueError(f"per-branch input {name!r} must be a tensor with batch 1, got {describe(p)}")
            out[name] = torch.cat(parts)
        return out

    # ------------------------------------------------------------------ the edit
    @torch.no_grad()
    def edit(self, source_latents: torch.Tensor, fg_mask: torch.Tensor, prompt_embeds: torch.Tensor,
             negative_prompt_embeds: torch.Tensor, num_steps: int, generator: Optional[torch.Generator] = None, *,
             source_prompt_embeds: Optional[torch.Tensor] = None, condition: Optional[torch.Tensor] = None,
             image_embeds: Optional[torch.Tensor] = None, transformer_kwargs: Optional[dict] = None,
             prompt_kwargs: Optional[dict] = None, negative_prompt_kwargs: Optional[dict] = None,
             source_prompt_kwargs: Optional[dict] = None):
        """Regenerate the foreground of ``source_latents`` from the prompt, lock the background.

        Arguments:
            source_latents: (1, C, F, H, W) clean source latents, normalised as the
                transformer expects them (the VAE's latents_mean/std applied).  CogVideoX
                latents too are given in this layout (the editor permutes them).
            fg_mask: (F, H, W) latent-resolution foreground mask (``masks.pixel_mask_to_latent``);
                bool/uint8 (nonzero = foreground) or float in [0, 1] (soft values give
                partial locks ``alpha * (1 - m)`` and weight the variance).
            prompt_embeds, negative_prompt_embeds: (1, L, D) text embeddings of the edit.
            num_steps: denoising steps (>= 1).
            generator: for the initial noise and the source branch's fixed noise.
            source_prompt_embeds: conditioning of the source branch / inversion
                (default: negative_prompt_embeds).
            condition: image conditioning channels (Wan I2V: (1, 20, F, H, W) as
                WanImageToVideoPipeline.prepare_latents builds them; Wan2.2 TI2V: the first
                frame's latents (1, C, 1, H, W); CogVideoX I2V: (1, C_img, F, H, W)).
            image_embeds: Wan2.1 I2V CLIP image embeddings (1, N, image_dim).
            transformer_kwargs: other model inputs shared by every branch (tensors with
                batch 1 are expanded): WanVACE's control_hidden_states, CogVideoX's
                image_rotary_emb, HunyuanVideo's guidance, ...
            prompt_kwargs, negative_prompt_kwargs, source_prompt_kwargs: per-branch model
                inputs (batch 1 each; HunyuanVideo: encoder_attention_mask, pooled_projections).
        Returns:
            (latents, trace): the edited clean latents, fp32, same shape as source_latents,
            and one dict per step with step, sigma2, alpha, omega, s_star (floats, read
            from the device once, at the end) and expert (0, or 1 for transformer_2).
        """
        if not isinstance(source_latents, torch.Tensor):
            raise TypeError(f"source_latents must be a torch.Tensor (1, C, F, H, W), got {describe(source_latents)}")
        if not source_latents.is_floating_point():
            raise TypeError(f"source_latents must be floating point, got {source_latents.dtype}")
        if source_latents.dim() != 5 or source_latents.shape[0] != 1:
            raise ValueError(f"source_latents must be (1, C, F, H, W), got {tuple(source_latents.shape)}")
        if not isinstance(fg_mask, torch.Tensor):
            raise TypeError(f"fg_mask must be a torch.Tensor (F, H, W) (convert a numpy mask with torch.from_numpy), "
                            f"got {describe(fg_mask)}")
        spatial = tuple(source_latents.shape[2:])
        patch = self.adapter.patch_size(self.transformer)
        if any(d % p for d, p in zip(spatial, patch)):
            raise ValueError(f"source_latents (F, H, W) = {spatial} must be divisible by the transformer's patch size "
                             f"{patch} (pad or crop the video to a multiple of it)")
        check_mask("fg_mask", fg_mask, ndim=3, layout="(F, H, W)")  # kind, dtype and values (one host read)
        if tuple(fg_mask.shape) != spatial:
            raise ValueError(f"fg_mask must be the latent-resolution mask (F, H, W) = {spatial}, "
                             f"got {tuple(fg_mask.shape)}")
        text_dim = self._text_dim()
        embeds = {"prompt_embeds": prompt_embeds, "negative_prompt_embeds": negative_prompt_embeds}
        if source_prompt_embeds is not None:
            embeds["source_prompt_embeds"] = source_prompt_embeds
        for name, e in embeds.items():
            _check_embeds(name, e, text_dim)
        for name, t in dict(source_latents=source_latents, **embeds).items():
            if not torch.isfinite(t).all():  # one host read per input per edit: NaN would run the whole loop
                raise ValueError(f"{name} contains NaN or inf")
        if len({tuple(e.shape) for e in embeds.values()}) > 1:
            shapes = ", ".join(f"{n} {tuple(e.shape)}" for n, e in embeds.items())
            raise ValueError(f"the text embeddings must have one shape (1, L, D) to share a batch: got {shapes}; "
                             "encode all prompts with the same max_sequence_length")
        if isinstance(num_steps, bool) or not isinstance(num_steps, numbers.Integral):
            raise TypeError(f"num_steps must be an int >= 1, got {describe(num_steps)}")
        if num_steps < 1:
            raise ValueError(f"num_steps must be >= 1 denoising steps, got {num_steps}")
        num_steps = int(num_steps)
        if transformer_kwargs is not None and not isinstance(transformer_kwargs, dict):
            raise TypeError(f"transformer_kwargs must be a dict of model inputs or None, got "
                            f"{describe(transformer_kwargs)}")
        if generator is not None and not isinstance(generator, torch.Generator):
            raise TypeError(f"generator must be a torch.Generator or None, got {describe(generator)}")

        device = source_latents.device
        source_latents = source_latents.float()
        prompt_embeds, negative_prompt_embeds = prompt_embeds.to(device), negative_prompt_embeds.to(device)
        if source_prompt_embeds is not None:
            source_prompt_embeds = source_prompt_embeds.to(device)
        family_inputs = {k: v for k, v in dict(condition=condition, image_embeds=image_embeds,
                                               transformer_kwargs=transformer_kwargs).items() if v is not None}
        if self.expand_timesteps is not None:
            family_inputs["expand_timesteps"] = self.expand_timesteps
        ctx = self.adapter.loop_context(self.transformer, source_latents, **family_inputs)
        src_embeds = negative_prompt_embeds if source_prompt_embeds is None else source_prompt_embeds
        branch_inputs = (prompt_kwargs, negative_prompt_kwargs, source_prompt_kwargs)
        branch_kwargs = self._branch_kwargs(*branch_inputs, with_source=True)  # checked before anything runs
        src_kwargs = None
        if self.source == "inversion":  # the source runs alone (inversion); the edit's batch has no source entry
            src_kwargs = {name: value[SOURCE_INDEX:SOURCE_INDEX + 1] for name, value in branch_kwargs.items()}
            branch_kwargs = self._branch_kwargs(*branch_inputs, with_source=False)
        fg_mask = fg_mask.to(device)
        # The mask is checked (one host read) here, once; per step nothing is read back.
        tokens = latent_mask_to_tokens(fg_mask, patch=self.adapter.patch_size(self.transformer), check_values=False)
        kv_lock = self.kv_lock if self.kv_lock is not None else KVLockScheduler.for_steps(num_steps, device=device)
        if kv_lock.num_steps != num_steps:
            raise ValueError(f"kv_lock was built for {kv_lock.num_steps} steps, edit asks for {num_steps}")
        kv_lock.reset()

        sched = self.noise_scheduler
        sched.set_timesteps(num_steps, device=device)
        if hasattr(sched, "set_begin_index"):
            sched.set_begin_index(0)  # as WanPipeline: no step-index lookup (a host sync) per step
        timesteps = sched.timesteps
        if len(timesteps) != num_steps:
            raise ValueError(f"the scheduler made {len(timesteps)} timesteps for num_steps={num_steps} (a multi-order "
                             "scheduler?): the editor takes one model call per step")
        noise = torch.randn(source_latents.shape, generator=generator, device="cpu").to(device)
        eps = torch.randn(source_latents.shape, generator=generator, device="cpu").to(device)
        latents = noise * getattr(sched, "init_noise_sigma", 1.0)

        with contextlib.ExitStack() as stack:  # a KV-Lock the caller had installed is put back after the edit
            for model in self.experts:
                stack.enter_context(installed(model, attention=self.attention,
                                              kernel_backend=self.backend if self.attention == "fused" else "auto"))
            return self._run(source_latents, fg_mask, tokens, prompt_embeds, negative_prompt_embeds, src_embeds,
                             num_steps, timesteps, latents, eps, kv_lock, ctx, branch_kwargs, src_kwargs)

    def _set_plan(self, plan: KVLockPlan) -> None:
        for model in self.experts:
            set_plan(model, plan)

    def _run(self, x0, fg_mask, tokens, prompt_embeds, negative_prompt_embeds, src_embeds, num_steps, timesteps,
             latents, eps, kv_lock, ctx, branch_kwargs, src_kwargs):
        from tqdm.auto import tqdm

        sched = self.noise_scheduler
        device = x0.device
        flow = self.loop == "flow"
        if flow:
            sigmas = sched.sigmas.to(device=device, dtype=torch.float32)
        else:
            abar = sched.alphas_cumprod.to(device=device, dtype=torch.float32)
        cache = None
        if self.source == "inversion":
            cache = self._invert(x0, src_embeds, timesteps, ctx, src_kwargs)
            embeds = torch.cat([prompt_embeds, negative_prompt_embeds])
        else:
            embeds = torch.cat(_with_source(src_embeds, [prompt_embeds, negative_prompt_embeds]))
        batch = embeds.shape[0]
        layers = len(self.adapter.attention_modules(self.transformer))
        s_stars, experts = [], []
        old_pred = None
        ts = timesteps.tolist()  # one host read: the expert switch and abar's index need the values
        for k in tqdm(range(num_steps), disable=not self.progress, desc="KV-Lock edit"):
            t = timesteps[k]
            model = self._expert(ts[k])
            alpha, omega = kv_lock.controls(k)
            if cache is None:
                plan = KVLockPlan.branch(tokens, alpha, batch_size=batch, check_inputs=False)
            else:
                plan = KVLockPlan.cached(tokens, alpha, cache=cache, step=k, discard_after_use=True,
                                         check_inputs=False)
                if k + 1 < num_steps:  # bring the next step's layers back while this step computes
                    cache.prefetch([(k + 1, layer) for layer in range(layers)])
            self._set_plan(plan)
            if flow:
                sigma = sigmas[k]
                scale, level = None, sigma
                z_src = (1 - sigma) * x0 + sigma * eps
            else:
                a = abar[int(ts[k])]
                scale, level = a.sqrt(), (1 - a).sqrt()
                z_src = sched.add_noise(x0, eps, t.reshape(1))
            targets = [latents, latents]
            x = torch.cat(targets if cache is not None else _with_source(z_src, targets))
            if not flow:
                x = sched.scale_model_input(x, t)
            v = self._predict(model, x, t, embeds, ctx, branch_kwargs)
            if cache is None:
                v = _without_source(v)
            v_cond, v_uncond = v[:1], v[1:]
            s_star = cfg_zero_star_scale(v_cond, v_uncond, backend=self.backend)
            # x0-hat = z - sigma v (flow) or sqrt(abar) z - sqrt(1 - abar) v (v-prediction)
            guided, x0_hat = kvlock_guidance(v_cond, v_uncond, omega, s_star=s_star,
                                             latents=latents if scale is None else scale * latents, sigma=level,
                                             backend=self.backend, check_inputs=False)
            kv_lock.update(k, x0_hat, fg_mask)
            s_stars.append(s_star[0])
            experts.append(0 if model is self.transformer else 1)
            latents, old_pred = self._step(sched, guided, t, latents, old_pred, timesteps, k)
        self._set_plan(KVLockPlan.off())
        latents = self.adapter.finalize(latents, ctx)
        trace = [dict(step=k, sigma2=s2, alpha=a, omega=o, s_star=s, expert=e)
                 for (k, s2, a, o), s, e in zip(kv_lock.trace, torch.stack(s_stars).tolist(), experts)]
        return latents, trace

    @staticmethod
    def _step(sched, guided, t, latents, old_pred, timesteps, k):
        from diffusers import CogVideoXDPMScheduler

        if isinstance(sched, CogVideoXDPMScheduler):
            back = timesteps[k - 1] if k > 0 else None
            latents, old_pred = sched.step(guided, old_pred, t, back, latents, return_dict=False)
            return latents.float(), old_pred
        return sched.step(guided, t, latents, return_dict=False)[0].float(), None

    def _invert(self, x0, src_embeds, timesteps, ctx, src_kwargs) -> KVRingBuffer:
        """Inversion from the clean source up the noise levels (Euler in sigma for flow
        matching, DDIM for v-prediction), capturing each step's self-attention K/V of the
        source under (step, layer) with the expert that denoises that step.
        ``src_kwargs``: the source branch's per-branch model inputs (batch 1)."""
        sched = self.noise_scheduler
        num_steps = len(timesteps)
        layers = len(self.adapter.attention_modules(self.transformer))
        S, H, D = self._kv_shape(x0)
        cache = KVRingBuffer(self.cache_capacity or 2 * layers, (S, H, D), self.transformer.dtype, x0.device,
                             host_spill=True)
        device = x0.device
        self._set_plan(KVLockPlan.off())
        z = x0
        ts = timesteps.tolist()  # one host read: the expert switch and abar's index need the values
        if self.loop == "flow":
            sigmas = sched.sigmas.to(device=device, dtype=torch.float32)
            t_clean = sigmas[num_steps] * sched.config.num_train_timesteps
            v = self._predict(self._expert(t_clean), z, t_clean, src_embeds, ctx, src_kwargs)
            for k in reversed(range(num_steps)):
                z = z + (sigmas[k] - sigmas[k + 1]) * v
                self._set_plan(KVLockPlan.capture(cache, k))
                v = self._predict(self._expert(ts[k]), z, timesteps[k], src_embeds, ctx, src_kwargs)
        else:
            abar = sched.alphas_cumprod.to(device=device, dtype=torch.float32)
            t_cur = torch.zeros((), dtype=timesteps.dtype, device=device)
            a_cur = abar[0]
            v = self._predict(self._expert(t_cur), sched.scale_model_input(z, t_cur), t_cur, src_embeds, ctx,
                              src_kwargs)
            for k in reversed(range(num_steps)):
                a_next = abar[int(ts[k])]
                x0_hat = a_cur.sqrt() * z - (1 - a_cur).sqrt() * v
                eps_hat = (1 - a_cur).sqrt() * z + a_cur.sqrt() * v
                z = a_next.sqrt() * x0_hat + (1 - a_next).sqrt() * eps_hat
                self._set_plan(KVLockPlan.capture(cache, k))
                v = self._predict(self._expert(ts[k]), sched.scale_model_input(z, timesteps[k]), timesteps[k],
                                  src_embeds, ctx, src_kwargs)
                a_cur = a_next
        self._set_plan(KVLockPlan.off())
        return cache
