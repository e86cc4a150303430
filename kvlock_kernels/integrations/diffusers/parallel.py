"""KV-Lock under diffusers' context parallelism (``ContextParallelConfig``: Ulysses, ring).

How diffusers shards (``hooks/context_parallel.py``): the model's ``_cp_plan`` splits the
video token sequence (Wan: the hidden states entering ``blocks.0`` and the RoPE tables)
into ``ring_degree * ulysses_degree`` contiguous chunks along the sequence, chunk r to
rank r of the flattened (ring, ulysses) mesh (``torch.chunk``; ``tensor_split`` in the
"anything" modes), and gathers the output after ``proj_out``.  So every rank's processors
see their own shard of the video tokens.

What KV-Lock shards the same way (``shard_tokens``):
- the plan's lock weights (one per video token): each rank takes its chunk;
- cached source K/V captured without context parallelism (full sequence): each rank takes
  its chunk (a cache captured under the same config already holds the rank's shard);
- an in-batch source branch is a batch entry: sharded with everything else for free.

Where attention runs:
- ``attention="diffusers"`` (default): the lock is applied to the rank's K/V shard in the
  epilogue, then diffusers' own ``dispatch_attention_fn`` with the module's parallel config
  does Ulysses (all-to-all of heads) or ring (K/V rotation with LSE merges) exactly as for
  the stock model.  Ring needs a backend that returns the log-sum-exp (flash, cuDNN, ...):
  diffusers' native SDPA does not, and KV-Lock refuses that combination up front.
- ``attention="fused"``: KV-Lock's own Ulysses (``ulysses_kv_lock_attention``: all-to-all
  of q, K, V, K_src, V_src to head shards, all-gather of the lock weights, the fused
  kernel, all-to-all back) or ring (``ring_kv_lock_attention``: all-gather of the K/V,
  source and lock chunks, the fused kernel with ``return_lse=True`` per chunk,
  ``merge_attention_states``).  Ring x Ulysses together and the uneven "anything" modes
  are refused for this path.

Group and rank come from the config diffusers set up (its flattened, ring and Ulysses
meshes), so shards match diffusers' own.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist

from ...attention.kv_lock_attention import kv_lock_attention
from ...attention.merge_attention_states import merge_attention_states

__all__ = ["cp_config", "cp_degree", "cp_rank", "shard_tokens", "check_servable", "ulysses_kv_lock_attention",
           "ring_kv_lock_attention", "context_parallel_kv_lock_attention"]

# Context-parallel backends of diffusers that cannot return the LSE that ring attention merges with.
_NO_LSE_BACKENDS = ("native", "_native_npu")


def cp_config(processor):
    """The context-parallel config a processor's ``_parallel_config`` (set by diffusers'
    ``enable_parallelism``) carries, or None (also for ``processor`` None)."""
    pc = getattr(processor, "_parallel_config", None)
    return None if pc is None else getattr(pc, "context_parallel_config", None)


def cp_degree(cp) -> int:
    """Number of sequence shards: ring_degree * ulysses_degree."""
    return int(cp.ring_degree) * int(cp.ulysses_degree)


def _uneven(cp) -> bool:
    return bool(getattr(cp, "ulysses_anything", False) or getattr(cp, "ring_anything", False))


def cp_rank(cp) -> int:
    """This process's shard index: its rank in the flattened (ring, ulysses) mesh, as
    diffusers' sharder takes it."""
    mesh = getattr(cp, "_flattened_mesh", None)
    if mesh is not None:
        return dist.get_rank(mesh.get_group())
    return dist.get_rank() % cp_degree(cp)


def shard_tokens(x: torch.Tensor, dim: int, cp, *, name: str, expected: int, layer: Optional[int] = None
                 ) -> torch.Tensor:
    """The rank's shard of a full-sequence tensor along ``dim``, cut as diffusers cuts the
    sequence (chunk r of ``torch.chunk`` / ``tensor_split`` for rank r).  Without a context
    parallel config, or when the shard is not ``expected`` tokens long, a ValueError names
    both lengths."""
    where = f" at layer {layer}" if layer is not None else ""
    full = x.shape[dim]
    if cp is None:
        raise ValueError(f"KV-Lock {name} cover {full} video tokens but the model's video sequence{where} has "
                         f"{expected}: build the token mask at the model's latent size (masks.latent_mask_to_tokens "
                         "with the transformer's patch size)")
    world = cp_degree(cp)
    shards = x.tensor_split(world, dim=dim) if _uneven(cp) else x.chunk(world, dim=dim)
    rank = cp_rank(cp)
    shard = shards[rank] if rank < len(shards) else x.narrow(dim, 0, 0)  # torch.chunk may give fewer chunks
    if shard.shape[dim] != expected:
        raise ValueError(f"KV-Lock {name} cover {full} video tokens; under context parallelism over {world} ranks "
                         f"this rank's shard has {shard.shape[dim]} but its sequence{where} has {expected}: the "
                         "token mask must cover the model's full (unsharded) video sequence")
    return shard


def _backend_name(processor_backend) -> str:
    """The backend a processor dispatches to: its own (``set_attention_backend``), else the
    active one (an ``attention_backend(...)`` context, else DIFFUSERS_ATTN_BACKEND)."""
    backend = processor_backend
    if backend is None:
        from diffusers.models import attention_dispatch

        # diffusers has no public getter for the active backend: read its registry defensively.
        backend = getattr(getattr(attention_dispatch, "_AttentionBackendRegistry", None), "_active_backend", None)
    if backend is None:
        from diffusers.utils.constants import DIFFUSERS_ATTN_BACKEND

        backend = DIFFUSERS_ATTN_BACKEND
    return getattr(backend, "value", str(backend))


def check_servable(cp, *, family: str, supports_cp: bool, attention: str, processor_backend, heads: int) -> None:
    """ValueError, before the model runs, for a context-parallel config KV-Lock cannot
    serve (see the module docstring)."""
    if cp is None:
        return
    if not supports_cp:
        raise ValueError(f"KV-Lock under context parallelism needs the video sequence sharded as diffusers' Wan "
                         f"_cp_plan shards it; {family} has no such plan in diffusers, so KV-Lock cannot tell which "
                         "tokens each rank holds. Run it without enable_parallelism")
    if attention == "diffusers":
        if cp.ring_degree > 1 and _backend_name(processor_backend) in _NO_LSE_BACKENDS:
            raise ValueError("ring attention (ring_degree > 1) needs an attention backend that returns the "
                             "log-sum-exp (e.g. 'flash', '_flash_3_hub', '_native_cudnn'); diffusers' native SDPA "
                             "does not. Use ulysses_degree, set_attention_backend(...) to such a backend, or "
                             "enable_kvlock(..., attention='fused') (KV-Lock's own ring with LSE merges)")
        return
    if cp.ring_degree > 1 and cp.ulysses_degree > 1:
        raise ValueError("attention='fused' serves Ulysses or ring context parallelism, not both at once; use "
                         "attention='diffusers' for unified ring x Ulysses")
    if _uneven(cp):
        raise ValueError("attention='fused' does not serve ulysses_anything / ring_anything (uneven shards); use "
                         "attention='diffusers'")
    if cp.ulysses_degree > 1 and heads % cp.ulysses_degree:
        raise ValueError(f"Ulysses over {cp.ulysses_degree} ranks needs heads divisible by it, got {heads} heads")


# --------------------------------------------------------------------------------------
# KV-Lock's own context-parallel attention around the fused kernel
# --------------------------------------------------------------------------------------
def _all_to_all_heads(x: torch.Tensor, group, world: int) -> torch.Tensor:
    """(B, S_local, H, D) sequence shard -> (B, S, H / world, D) head shard."""
    B, S, H, D = x.shape
    send = x.reshape(B, S, world, H // world, D).permute(2, 0, 1, 3, 4).contiguous()
    recv = torch.empty_like(send)
    dist.all_to_all_single(recv, send, group=group)
    return recv.permute(1, 0, 2, 3, 4).reshape(B, world * S, H // world, D)


def _all_to_all_sequence(x: torch.Tensor, group, world: int) -> torch.Tensor:
    """(B, S, H_local, D) head shard -> (B, S / world, H_local * world, D) sequence shard."""
    B, S, H, D = x.shape
    send = x.reshape(B, world, S // world, H, D).permute(1, 0, 2, 3, 4).contiguous()
    recv = torch.empty_like(send)
    dist.all_to_all_single(recv, send, group=group)
    return recv.permute(1, 2, 0, 3, 4).reshape(B, S // world, world * H, D)


def _all_gather(x: torch.Tensor, group, world: int) -> list:
    x = x.contiguous()
    parts = [torch.empty_like(x) for _ in range(world)]
    dist.all_gather(parts, x, group=group)
    return parts


def ulysses_kv_lock_attention(q, k, v, k_src, v_src, lock, *, group, world: int, backend: str = "auto"):
    """Ulysses around the fused kernel.  q, k, v, k_src, v_src: the rank's sequence shard
    (B|1 for the source, S_local, H, D); lock (1, S_local) or None.  Returns the rank's
    (B, S_local, H, D) output, equal to attention over the full sequence."""
    q, k, v = (_all_to_all_heads(t, group, world) for t in (q, k, v))
    if lock is None:
        out = kv_lock_attention(q, k, v, backend=backend)
    else:
        k_src, v_src = (_all_to_all_heads(t, group, world) for t in (k_src, v_src))
        lock = torch.cat(_all_gather(lock, group, world), dim=1)
        out = kv_lock_attention(q, k, v, k_src, v_src, lock, backend=backend, check_inputs=False)
    return _all_to_all_sequence(out, group, world)


def ring_kv_lock_attention(q, k, v, k_src, v_src, lock, *, group, world: int, rank: int, backend: str = "auto"):
    """Ring (all-gather rotation, as diffusers' "allgather" method) around the fused
    kernel: every rank attends its query shard to each rank's K/V chunk, blended with
    that chunk's source and lock weights, and merges the partial results by their LSE
    (``merge_attention_states``).  Same shapes as ``ulysses_kv_lock_attention``."""
    ks, vs = _all_gather(k, group, world), _all_gather(v, group, world)
    if lock is not None:
        kss, vss = _all_gather(k_src, group, world), _all_gather(v_src, group, world)
        locks = _all_gather(lock, group, world)
    out = lse = None
    for i in [rank] + [r for r in range(world) if r != rank]:
        if lock is None:
            o, s = kv_lock_attention(q, ks[i], vs[i], return_lse=True, backend=backend)
        else:
            o, s = kv_lock_attention(q, ks[i], vs[i], kss[i], vss[i], locks[i], return_lse=True, backend=backend,
                                     check_inputs=False)
        out, lse = (o, s) if out is None else merge_attention_states(out, lse, o, s)
    return out


def context_parallel_kv_lock_attention(q, k, v, k_src, v_src, lock, cp, *, backend: str = "auto"):
    """The fused kernel under the config's Ulysses or ring degree (checked servable)."""
    if cp.ulysses_degree > 1:
        mesh = cp._ulysses_mesh
        return ulysses_kv_lock_attention(q, k, v, k_src, v_src, lock, group=mesh.get_group(),
                                         world=cp.ulysses_degree, backend=backend)
    mesh = cp._ring_mesh
    return ring_kv_lock_attention(q, k, v, k_src, v_src, lock, group=mesh.get_group(), world=cp.ring_degree,
                                  rank=dist.get_rank(mesh.get_group()), backend=backend)
