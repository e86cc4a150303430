"""WanVACE: ``WanVACETransformer3DModel`` (Wan2.1 VACE).

Attention: the main ``blocks[i].attn1`` are locked exactly as in Wan (same attention
class, same stock processor).  The ``vace_blocks`` are NOT locked: they encode VACE's
control input (the masked control video and its mask, ``control_hidden_states``) into
hints that are added to the main stream after the VACE layers.  The editor gives every
branch the same control input, so the hints carry the same conditioning for source and
targets, and the background is locked where the hints land (the main blocks).  Cache
layer indices count the main blocks only.

Loop: Wan's flow matching; ``control_hidden_states`` (1, vace_in_channels, F, H, W) and
optionally ``control_hidden_states_scale`` go in ``transformer_kwargs`` (batch 1 is
expanded to every branch).
"""
from __future__ import annotations

from .base import LoopContext
from .wan import WanAdapter


class WanVACEAdapter(WanAdapter):
    """Wan's attention, processors and patching; its own model class and loop inputs."""

    name = "wan_vace"
    family = "WanVACE (WanVACETransformer3DModel)"
    model_class_paths = ("diffusers.models.transformers.transformer_wan_vace:WanVACETransformer3DModel",)
    # diffusers defines no _cp_plan for VACE: which tokens a rank holds is unknown.
    supports_context_parallel = False

    def loop_context(self, transformer, source_latents, *, transformer_kwargs=None, **unused):
        if unused:
            raise TypeError(f"{self.family} editing takes its control input in transformer_kwargs; got unexpected "
                            f"{sorted(unused)}")
        kwargs = dict(transformer_kwargs or {})
        control = kwargs.get("control_hidden_states")
        C = int(transformer.config.vace_in_channels)
        want = (1, C) + tuple(source_latents.shape[2:])
        if control is None:
            raise ValueError(f"WanVACE needs its control input: transformer_kwargs={{'control_hidden_states': "
                             f"tensor {want}}} (the masked control video latents and mask, as WanVACEPipeline "
                             "prepares them)")
        if tuple(getattr(control, "shape", ())) != want:
            raise ValueError(f"control_hidden_states must be {want}, got {tuple(getattr(control, 'shape', ()))}")
        return LoopContext(transformer_kwargs=kwargs)


ADAPTER = WanVACEAdapter()
