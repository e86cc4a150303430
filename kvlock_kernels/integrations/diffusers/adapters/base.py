"""What a model adapter says about one diffusers video transformer family.

An adapter (one file per family, listed in ``adapters/__init__.py``'s table) tells the
integration
- which diffusers classes it serves (imported lazily, matched with ``isinstance``),
- where the self-attention modules are (the ones KV-Lock patches, in layer order) and which
  KV-Lock processor reproduces their stock processor,
- the token layout: how the video tokens are counted from the model input (per
  resolution),
- how its sampling loop differs: flow matching or DDPM v-prediction, the latent layout of
  its input, extra model inputs (image conditioning, per-token timesteps, ...).
"""
from __future__ import annotations

import importlib
import math
from abc import ABC, abstractmethod

import torch

from ...._validate import describe

__all__ = ["ModelAdapter", "LoopContext"]


class LoopContext(dict):
    """Per-edit model inputs an adapter prepared (a dict with attribute access)."""

    __getattr__ = dict.get


class ModelAdapter(ABC):
    """Base class; a family subclasses it in its own file (see the module docstring)."""

    name: str = ""
    #: human-readable family name used in messages
    family: str = ""
    #: "module:Class" paths of the diffusers classes served (imported on first use)
    model_class_paths: tuple = ()
    #: "module:Class" paths of stock processors KV-Lock may be installed over / re-install over
    stock_processor_paths: tuple = ()
    #: "flow" (flow matching, velocity) or "v_prediction" (DDPM)
    prediction: str = "flow"
    #: the model's input layout: "bcfhw" (Wan, HunyuanVideo) or "bfchw" (CogVideoX)
    input_layout: str = "bcfhw"
    #: the model passes its own key-padding attention mask to the locked layers
    model_attention_mask: bool = False
    #: diffusers shards this family's video tokens under ContextParallelConfig (a _cp_plan)
    supports_context_parallel: bool = False
    #: the KV-Lock processor class (set by the family file)
    processor_cls = None
    #: the module whose ``dispatch_attention_fn`` global the stock processor calls (None:
    #: the stock processor calls SDPA itself; KV-Lock then uses ``attention_dispatch``'s)
    dispatch_module = None

    # ------------------------------------------------------------------ classes
    def model_classes(self) -> tuple:
        return tuple(_load(p) for p in self.model_class_paths)

    def matches(self, transformer) -> bool:
        return isinstance(transformer, self.model_classes())

    def stock_processor_classes(self) -> tuple:
        return tuple(_load(p) for p in self.stock_processor_paths)

    # ------------------------------------------------------------------ modules
    @abstractmethod
    def attention_modules(self, transformer) -> list:
        """[(qualified name, attention module)] in layer order (the cache's layer index)."""

    def heads(self, transformer) -> int:
        return int(transformer.config.num_attention_heads)

    # ------------------------------------------------------------------ tokens
    @abstractmethod
    def patch_size(self, transformer) -> tuple:
        """(pt, ph, pw) the DiT patchifies latents with."""

    def latent_dims(self, hidden_states: torch.Tensor) -> tuple:
        """(F, H, W) of a model input."""
        if self.input_layout == "bfchw":
            return tuple(hidden_states.shape[1:2]) + tuple(hidden_states.shape[3:5])
        return tuple(hidden_states.shape[2:5])

    def video_grid(self, transformer, hidden_states) -> tuple:
        """(T, H, W) token grid of a model input; ValueError if the input does not patchify."""
        if not isinstance(hidden_states, torch.Tensor) or hidden_states.dim() != 5:
            raise ValueError(f"{self.family} takes 5-D hidden_states, got {describe(hidden_states)}")
        dims = self.latent_dims(hidden_states)
        patch = self.patch_size(transformer)
        if any(d % p for d, p in zip(dims, patch)):
            raise ValueError(f"{self.family} input of latent size (F, H, W) = {dims} is not divisible by the "
                             f"patch size {patch}")
        return tuple(d // p for d, p in zip(dims, patch))

    def num_video_tokens(self, transformer, hidden_states) -> int:
        return math.prod(self.video_grid(transformer, hidden_states))

    # ------------------------------------------------------------------ the model call
    @staticmethod
    def hidden_states_of(args, kwargs):
        """The ``hidden_states`` argument of a transformer call (positional or keyword)."""
        if "hidden_states" in kwargs:
            return kwargs["hidden_states"]
        return args[0] if args else None

    def loop_context(self, transformer, source_latents: torch.Tensor, *, transformer_kwargs=None,
                     **unused) -> LoopContext:
        """Check and prepare this family's extra edit inputs once per edit (the default
        family takes none besides ``transformer_kwargs``)."""
        if unused:
            raise TypeError(f"{self.family} editing takes its extra model inputs in transformer_kwargs (and "
                            f"per-branch ones in *_prompt_kwargs); got unexpected {sorted(unused)}")
        in_channels = getattr(transformer.config, "in_channels", None)
        if in_channels is not None and int(in_channels) != source_latents.shape[1]:
            raise ValueError(f"source_latents have {source_latents.shape[1]} channels but this {self.family} "
                             f"transformer takes {in_channels} (an image-conditioned variant the editor does not "
                             "build inputs for)")
        return LoopContext(transformer_kwargs=transformer_kwargs or {})

    def to_model_layout(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, F, H, W) editor latents -> the model's input layout."""
        return x.permute(0, 2, 1, 3, 4) if self.input_layout == "bfchw" else x

    def from_model_layout(self, x: torch.Tensor) -> torch.Tensor:
        return x.permute(0, 2, 1, 3, 4) if self.input_layout == "bfchw" else x

    def model_inputs(self, transformer, latents: torch.Tensor, t: torch.Tensor, embeds: torch.Tensor,
                     ctx: LoopContext, branch_kwargs: dict) -> dict:
        """Keyword arguments of one transformer call on (B, C, F, H, W) latents at
        timestep t (0-dim) with text embeddings (B, L, D)."""
        dtype = transformer.dtype
        kwargs = dict(hidden_states=self.to_model_layout(latents).to(dtype), timestep=t.expand(latents.shape[0]),
                      encoder_hidden_states=embeds.to(dtype), return_dict=False)
        kwargs.update(_batched(ctx.transformer_kwargs or {}, latents.shape[0], dtype))
        kwargs.update(branch_kwargs)
        return kwargs

    def finalize(self, latents: torch.Tensor, ctx: LoopContext) -> torch.Tensor:
        """The edit's output latents from the loop's last latents."""
        return latents


def _batched(kwargs: dict, batch: int, dtype) -> dict:
    """Tensors of batch 1 expanded to the call's batch (floating ones cast to the model
    dtype); everything else as given."""
    out = {}
    for key, value in kwargs.items():
        if isinstance(value, torch.Tensor) and value.dim() >= 1 and value.shape[0] == 1 and batch > 1:
            value = value.expand(batch, *value.shape[1:])
        if isinstance(value, torch.Tensor) and value.is_floating_point():
            value = value.to(dtype)
        out[key] = value
    return out


def _load(path: str):
    module, _, name = path.partition(":")
    return getattr(importlib.import_module(module), name)
