"""Drop-in KV-Lock for diffusers video transformers, and the end-to-end editing loop.

    from kvlock_kernels.diffusers import KVLockEditor
    editor = KVLockEditor(pipe.transformer, pipe.scheduler)          # Wan2.1
    latents, trace = editor.edit(source_latents, fg_mask, prompt_embeds,
                                 negative_prompt_embeds, num_steps=50, generator=gen)
    video = pipe.vae.decode(latents / ...)                            # as the pipeline does

Lower level: ``enable_kvlock(transformer, controller)`` installs a KV-Lock attention
processor on every self-attention module (Wan ``attn1``; CogVideoX's joint text+video
``attn1``) that keeps the stock math (projections, QK-norm, RoPE) and replaces the
attention call with ``kv_lock_attention``; ``disable_kvlock`` restores the originals.
A ``KVLockController`` holds what the patched layers read: the mode, the lock weights,
where source K/V come from, and the current step.

diffusers is optional (``pip install -e .[diffusers]``) and imported lazily.
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from ...attention.kv_lock_attention import kv_lock_attention
from ...cache.ring_buffer import KVRingBuffer
from ...control.cfg_zero_star_scale import cfg_zero_star_scale
from ...control.kvlock_guidance import kvlock_guidance
from ...control.masks import latent_mask_to_tokens, lock_weights
from ...control.scheduler import KVLockScheduler

__all__ = ["KVLockController", "KVLockEditor", "enable_kvlock", "disable_kvlock", "SUPPORTED_TRANSFORMERS"]

MODES = ("off", "capture", "lock")
SOURCES = ("branch", "cache")
SUPPORTED_TRANSFORMERS = ("WanTransformer3DModel", "CogVideoXTransformer3DModel")


def _import_diffusers():
    try:
        import diffusers  # noqa: F401
    except ImportError as e:  # pragma: no cover - exercised only without the extra
        raise ImportError("kvlock_kernels.diffusers needs diffusers: pip install -e .[diffusers]") from e
    return diffusers


class KVLockController:
    """Per-run state read by every patched attention layer.

    Attributes:
        mode: "off" (stock attention), "capture" (store each layer's K/V of batch entry 0
            in ``cache`` under (step, layer), then stock attention) or "lock".
        source: where locked layers take source K/V: "branch" (batch entry 0 is the source
            branch, read in place as a batch-stride-0 view) or "cache" (``cache``).
        cache: a KVRingBuffer for the inversion cache.
        step: the current denoising step (the cache key's first half).
        token_fg_mask: (L,) foreground mask over the video tokens, (t, h, w) order.
        alpha: fusion ratio, a float or a 0-dim device tensor.
        backend: kv_lock_attention's backend ("auto", "triton", "torch").
        discard_after_use: with source "cache", drop each (step, layer) entry once its
            layer has run (one model call per step, as in KVLockEditor).
    The lock weights ``alpha * (1 - m)`` are computed once per ``set_step`` and shared
    by all layers; text tokens of joint-attention models get weight 0.
    """

    def __init__(self, *, token_fg_mask: Optional[torch.Tensor] = None, alpha=1.0, mode: str = "off",
                 source: str = "branch", cache: Optional[KVRingBuffer] = None, backend: str = "auto",
                 discard_after_use: bool = False):
        self.mode = mode
        self.discard_after_use = discard_after_use
        self.source = source
        self.cache = cache
        self.backend = backend
        self.step = 0
        self.token_fg_mask = token_fg_mask
        self.alpha = alpha
        self._lock: Optional[torch.Tensor] = None
        self._check()

    def _check(self):
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        if self.source not in SOURCES:
            raise ValueError(f"source must be one of {SOURCES}, got {self.source!r}")
        if (self.mode == "capture" or (self.mode == "lock" and self.source == "cache")) and self.cache is None:
            raise ValueError(f"mode={self.mode!r} with source={self.source!r} needs a KVRingBuffer in cache")
        if self.mode == "lock" and self.token_fg_mask is None:
            raise ValueError("mode='lock' needs token_fg_mask (see kvlock_kernels.masks)")

    def set_step(self, step: int, alpha=None, mode: Optional[str] = None) -> None:
        """Enter a step: optionally a new alpha (float or 0-dim tensor) and mode."""
        self.step = step
        if alpha is not None:
            self.alpha = alpha
        if mode is not None:
            self.mode = mode
        self._check()
        self._lock = None

    def lock(self, seqlen: int) -> torch.Tensor:
        """(1, L) per-key lock weights for a video sequence of `seqlen` tokens."""
        if self._lock is None:
            m = self.token_fg_mask
            if m.dim() != 1:
                raise ValueError(f"token_fg_mask must be (L,), got shape {tuple(m.shape)}")
            self._lock = lock_weights(m, self.alpha)[None]
        if self._lock.shape[1] != seqlen:
            raise ValueError(f"token_fg_mask has {self._lock.shape[1]} tokens but the model's video sequence has "
                             f"{seqlen}: build it with masks.latent_mask_to_tokens at the model's latent size")
        return self._lock

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *,
               text_tokens: int = 0) -> torch.Tensor:
        """Attention of one layer under the current mode.  q, k, v: (B, S, H, D) with the
        first `text_tokens` positions being text (never locked)."""
        if self.mode == "off":
            return kv_lock_attention(q, k, v, backend=self.backend)
        if self.mode == "capture":
            self.cache.put((self.step, layer), k[0], v[0])
            return kv_lock_attention(q, k, v, backend=self.backend)
        B = q.shape[0]
        if self.source == "branch":
            k_src, v_src = k[:1].expand(B, -1, -1, -1), v[:1].expand(B, -1, -1, -1)
        else:
            k_src, v_src = self.cache.get((self.step, layer))[:2]
            k_src, v_src = k_src[None].expand(B, -1, -1, -1), v_src[None].expand(B, -1, -1, -1)
        lock = self.lock(k.shape[1] - text_tokens)
        if text_tokens:
            lock = torch.cat([lock.new_zeros(1, text_tokens), lock], dim=1)
        # Lock weights are built in [0, 1] by lock_weights: no host-side value check.
        out = kv_lock_attention(q, k, v, k_src, v_src, lock, backend=self.backend, check_inputs=False)
        if self.source == "cache" and self.discard_after_use:
            self.cache.discard((self.step, layer))  # its slot is free for the next prefetch
        return out


# ----------------------------------------------------------------------------------------
# Attention processors
# ----------------------------------------------------------------------------------------
def _rotate_wan(x: torch.Tensor, freqs_cos: torch.Tensor, freqs_sin: torch.Tensor) -> torch.Tensor:
    """Wan's interleaved rotary embedding on (B, S, H, D), as the stock processor does it."""
    x1, x2 = x.unflatten(-1, (-1, 2)).unbind(-1)
    cos, sin = freqs_cos[..., 0::2], freqs_sin[..., 1::2]
    out = torch.empty_like(x)
    out[..., 0::2] = x1 * cos - x2 * sin
    out[..., 1::2] = x1 * sin + x2 * cos
    return out.type_as(x)


class KVLockWanAttnProcessor:
    """Wan self-attention (``attn1``) with the attention call replaced by kv_lock_attention."""

    def __init__(self, controller: KVLockController, layer: int):
        self.controller, self.layer = controller, layer

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary_emb=None):
        from diffusers.models.transformers.transformer_wan import _get_qkv_projections

        if encoder_hidden_states is not None or attn.add_k_proj is not None or attention_mask is not None:
            raise ValueError("KV-Lock patches Wan self-attention (attn1) only: got cross-attention inputs "
                             "or an attention mask")
        query, key, value = _get_qkv_projections(attn, hidden_states, None)
        query, key = attn.norm_q(query), attn.norm_k(key)
        query = query.unflatten(2, (attn.heads, -1))
        key = key.unflatten(2, (attn.heads, -1))
        value = value.unflatten(2, (attn.heads, -1))
        if rotary_emb is not None:
            query, key = _rotate_wan(query, *rotary_emb), _rotate_wan(key, *rotary_emb)
        out = self.controller.attend(self.layer, query, key, value)
        out = out.flatten(2, 3).type_as(query)
        return attn.to_out[1](attn.to_out[0](out))


class KVLockCogVideoXAttnProcessor:
    """CogVideoX joint text+video attention (``CogVideoXAttnProcessor2_0`` math) with the
    attention call replaced by kv_lock_attention; text positions get lock weight 0."""

    def __init__(self, controller: KVLockController, layer: int):
        self.controller, self.layer = controller, layer

    def __call__(self, attn, hidden_states, encoder_hidden_states, attention_mask=None, image_rotary_emb=None):
        if attention_mask is not None:
            raise ValueError("KV-Lock's CogVideoX processor does not take an attention mask")
        text_len = encoder_hidden_states.size(1)
        hidden_states = torch.cat([encoder_hidden_states, hidden_states], dim=1)
        B = hidden_states.shape[0]
        query, key, value = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
        head_dim = key.shape[-1] // attn.heads
        # (B, H, S, D) like the stock processor: norms and RoPE act on that layout.
        query = query.view(B, -1, attn.heads, head_dim).transpose(1, 2)
        key = key.view(B, -1, attn.heads, head_dim).transpose(1, 2)
        value = value.view(B, -1, attn.heads, head_dim).transpose(1, 2)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        if image_rotary_emb is not None:
            from diffusers.models.embeddings import apply_rotary_emb

            query[:, :, text_len:] = apply_rotary_emb(query[:, :, text_len:], image_rotary_emb)
            if not attn.is_cross_attention:
                key[:, :, text_len:] = apply_rotary_emb(key[:, :, text_len:], image_rotary_emb)
        out = self.controller.attend(self.layer, query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2),
                                     text_tokens=text_len)
        out = out.reshape(B, -1, attn.heads * head_dim)
        out = attn.to_out[1](attn.to_out[0](out))
        encoder_hidden_states, hidden_states = out.split([text_len, out.size(1) - text_len], dim=1)
        return hidden_states, encoder_hidden_states


def _self_attention_modules(transformer):
    """[(layer index, attention module, processor class)] of a supported transformer."""
    name = type(transformer).__name__
    if name == "WanTransformer3DModel":
        return [(i, block.attn1, KVLockWanAttnProcessor) for i, block in enumerate(transformer.blocks)]
    if name == "CogVideoXTransformer3DModel":
        return [(i, block.attn1, KVLockCogVideoXAttnProcessor)
                for i, block in enumerate(transformer.transformer_blocks)]
    raise TypeError(f"KV-Lock supports {', '.join(SUPPORTED_TRANSFORMERS)}; got {name}")


def enable_kvlock(transformer, controller: KVLockController) -> None:
    """Install KV-Lock processors on every self-attention module of `transformer`."""
    _import_diffusers()
    modules = _self_attention_modules(transformer)
    if not hasattr(transformer, "_kvlock_original_processors"):
        transformer._kvlock_original_processors = [attn.processor for _, attn, _ in modules]
    for layer, attn, processor_cls in modules:
        attn.processor = processor_cls(controller, layer)


def disable_kvlock(transformer) -> None:
    """Restore the processors that were installed before ``enable_kvlock``."""
    originals = getattr(transformer, "_kvlock_original_processors", None)
    if originals is None:
        return
    for (_, attn, _), processor in zip(_self_attention_modules(transformer), originals):
        attn.processor = processor
    del transformer._kvlock_original_processors


# ----------------------------------------------------------------------------------------
# The editing loop
# ----------------------------------------------------------------------------------------
class KVLockEditor:
    """SPEC's editing loop on a diffusers video transformer and flow-matching scheduler.

    Arguments:
        transformer: a WanTransformer3DModel (the loop is flow matching, as Wan2.1; CogVideoX
            is supported by ``enable_kvlock`` inside its own pipeline loop).
        noise_scheduler: diffusers' FlowMatchEulerDiscreteScheduler (or another scheduler
            with ``sigmas`` in flow-matching convention and ``step``).
        kv_lock: the KVLockScheduler for alpha/omega (built per edit from ``num_steps``
            when None, with kappa = min(20, num_steps)).
        source: "branch" (the source latent noised to each level, run in the same batch,
            its K/V read in place) or "inversion" (an inversion pass captures source K/V
            per (step, layer) in a KVRingBuffer, replayed while denoising).
        cache_capacity: device slots of the inversion ring (default: two steps of layers,
            so the next step is prefetched while the current one runs).
        backend: kv_lock_attention's backend.
        progress: show a tqdm progress bar.
    """

    def __init__(self, transformer, noise_scheduler, *, kv_lock: Optional[KVLockScheduler] = None,
                 source: str = "branch", cache_capacity: Optional[int] = None, backend: str = "auto",
                 progress: bool = True):
        _import_diffusers()
        self.modules = _self_attention_modules(transformer)
        if type(transformer).__name__ != "WanTransformer3DModel":
            raise TypeError("KVLockEditor runs SPEC's flow-matching loop, which matches Wan2.1 "
                            f"(WanTransformer3DModel); got {type(transformer).__name__}. CogVideoX checkpoints are "
                            "v-prediction DDPM models: use enable_kvlock with the pipeline's own loop")
        if source not in ("branch", "inversion"):
            raise ValueError(f"source must be 'branch' or 'inversion', got {source!r}")
        self.transformer, self.noise_scheduler = transformer, noise_scheduler
        self.kv_lock, self.source = kv_lock, source
        self.cache_capacity, self.backend, self.progress = cache_capacity, backend, progress
        self.model_dtype = transformer.dtype

    def _model(self, latents, t, embeds):
        """The transformer's velocity in fp32; inputs cast to its dtype as WanPipeline does."""
        timestep = t.expand(latents.shape[0]).to(latents.device)
        v = self.transformer(latents.to(self.model_dtype), timestep=timestep,
                             encoder_hidden_states=embeds.to(self.model_dtype), return_dict=False)[0]
        return v.float()

    @torch.no_grad()
    def edit(self, source_latents: torch.Tensor, fg_mask: torch.Tensor, prompt_embeds: torch.Tensor,
             negative_prompt_embeds: torch.Tensor, num_steps: int, generator: Optional[torch.Generator] = None, *,
             source_prompt_embeds: Optional[torch.Tensor] = None):
        """Regenerate the foreground of `source_latents` from the prompt, lock the background.

        Arguments:
            source_latents: (1, C, F, H, W) clean source latents (normalised as the pipeline's
                transformer expects them).
            fg_mask: (F, H, W) latent-resolution foreground mask (``masks.pixel_mask_to_latent``).
            prompt_embeds, negative_prompt_embeds: (1, L, D) text embeddings of the edit.
            num_steps: denoising steps.
            generator: for the initial noise and the source branch's fixed noise.
            source_prompt_embeds: conditioning of the source branch / inversion
                (default: negative_prompt_embeds).
        Returns:
            (latents, trace): the edited clean latents, fp32, same shape as source_latents, and a
            list of dicts per step with sigma2, alpha, omega and s_star (read from the device
            once, at the end).
        """
        from tqdm.auto import tqdm

        if source_latents.dim() != 5 or source_latents.shape[0] != 1:
            raise ValueError(f"source_latents must be (1, C, F, H, W), got {tuple(source_latents.shape)}")
        spatial = tuple(source_latents.shape[2:])
        if tuple(fg_mask.shape) != spatial:
            raise ValueError(f"fg_mask must be the latent-resolution mask (F, H, W) = {spatial}, "
                             f"got {tuple(fg_mask.shape)}")
        for name, e in (("prompt_embeds", prompt_embeds), ("negative_prompt_embeds", negative_prompt_embeds)):
            if e.dim() != 3 or e.shape[0] != 1:
                raise ValueError(f"{name} must be (1, L, D), got {tuple(e.shape)}")
        # The loop runs in fp32 (as WanPipeline keeps its latents); only model inputs are cast.
        device = source_latents.device
        source_latents = source_latents.float()
        src_embeds = negative_prompt_embeds if source_prompt_embeds is None else source_prompt_embeds
        fg_mask = fg_mask.to(device)
        tokens = latent_mask_to_tokens(fg_mask, patch=tuple(self.transformer.config.patch_size)).bool()
        kv_lock = self.kv_lock or KVLockScheduler(num_steps, kappa=min(20, num_steps), window=min(10, num_steps),
                                                  device=device)
        kv_lock.reset()
        if kv_lock.num_steps != num_steps:
            raise ValueError(f"kv_lock was built for {kv_lock.num_steps} steps, edit asks for {num_steps}")

        sched = self.noise_scheduler
        sched.set_timesteps(num_steps, device=device)
        sigmas = sched.sigmas.to(device=device, dtype=torch.float32)
        timesteps = sched.timesteps
        noise = torch.randn(source_latents.shape, generator=generator, device="cpu").to(device)
        eps = torch.randn(source_latents.shape, generator=generator, device="cpu").to(device)
        latents = noise

        controller = KVLockController(token_fg_mask=tokens, alpha=1.0, backend=self.backend)
        enable_kvlock(self.transformer, controller)
        try:
            if self.source == "inversion":
                cache = self._invert(source_latents, src_embeds, sigmas, timesteps, controller)
                controller.cache, controller.source, controller.discard_after_use = cache, "cache", True
                embeds = torch.cat([prompt_embeds, negative_prompt_embeds])
            else:
                embeds = torch.cat([src_embeds, prompt_embeds, negative_prompt_embeds])
            s_stars = []
            for k in tqdm(range(num_steps), disable=not self.progress, desc="KV-Lock edit"):
                t, sigma = timesteps[k], sigmas[k]
                alpha, omega = kv_lock.controls(k)
                controller.set_step(k, alpha=alpha, mode="lock")
                if self.source == "inversion" and k + 1 < num_steps:
                    # Bring the next step's layers back while this step computes.
                    controller.cache.prefetch([(k + 1, layer) for layer in range(len(self.modules))])
                if self.source == "branch":
                    z_src = (1 - sigma) * source_latents + sigma * eps
                    v = self._model(torch.cat([z_src, latents, latents]), t, embeds)[1:]
                else:
                    v = self._model(torch.cat([latents, latents]), t, embeds)
                v_cond, v_uncond = v[:1], v[1:]
                s_star = cfg_zero_star_scale(v_cond, v_uncond, backend=self.backend)
                guided, x0_hat = kvlock_guidance(v_cond, v_uncond, omega, s_star=s_star, latents=latents,
                                                 sigma=sigma, backend=self.backend, check_inputs=False)
                kv_lock.update(k, x0_hat, fg_mask)
                s_stars.append(s_star[0])
                latents = sched.step(guided, t, latents, return_dict=False)[0]
        finally:
            disable_kvlock(self.transformer)
        trace = [dict(step=k, sigma2=s2, alpha=a, omega=o, s_star=s)
                 for (k, s2, a, o), s in zip(kv_lock.trace, torch.stack(s_stars).tolist())]
        return latents, trace

    @torch.no_grad()
    def _invert(self, source_latents, src_embeds, sigmas, timesteps, controller) -> KVRingBuffer:
        """Euler inversion from the clean source up the noise levels, capturing each
        step's self-attention K/V (batch entry 0) under (step, layer)."""
        num_steps = len(timesteps)
        layers = len(self.modules)
        S, H, D = self._kv_shape(source_latents)
        cache = KVRingBuffer(self.cache_capacity or 2 * layers, (S, H, D), self.model_dtype, source_latents.device,
                             host_spill=True)
        controller.cache = cache
        z = source_latents
        controller.set_step(num_steps - 1, mode="off")
        num_train = getattr(self.noise_scheduler.config, "num_train_timesteps", 1000)
        v = self._model(z, sigmas[num_steps] * num_train, src_embeds)  # velocity at the clean end
        for k in reversed(range(num_steps)):
            z = z + (sigmas[k] - sigmas[k + 1]) * v
            controller.set_step(k, mode="capture")
            v = self._model(z, timesteps[k], src_embeds)
        controller.mode = "off"
        return cache

    def _kv_shape(self, latents):
        """(S, H, D) of one self-attention layer's K for one batch entry of these latents."""
        attn = self.modules[0][1]
        pt, ph, pw = self.transformer.config.patch_size
        S = math.prod((latents.shape[2] // pt, latents.shape[3] // ph, latents.shape[4] // pw))
        heads = attn.heads
        return S, heads, attn.to_k.out_features // heads
