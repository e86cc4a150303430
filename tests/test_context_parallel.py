"""KV-Lock under diffusers' context parallelism, on CPU: torch.distributed with gloo, two
processes on 127.0.0.1 (spawned; results go through files).

- Ulysses through diffusers' own attention (``attention="diffusers"``): a tiny Wan with
  ``enable_parallelism(ContextParallelConfig(ulysses_degree=2))`` gives the single-process
  KV-Lock output, with an in-batch source branch and with source K/V cached without
  context parallelism (each rank takes its shard);
- KV-Lock's own Ulysses and ring around the fused kernel (``attention="fused"``) inside
  the model, and the ring math alone: per-chunk ``kv_lock_attention(..., return_lse=True)``
  merged with ``merge_attention_states``;
- ring through diffusers' native backend (no LSE) is refused before the model runs.

Two shims for the test only (diffusers on a CPU-only machine): ``torch.accelerator
.device_count()`` is 0 there (diffusers takes ``rank % device_count()``), and one sharding
path calls ``logger.warning_once`` on a stdlib logger.
"""
import os
import socket

import pytest
import torch

diffusers = pytest.importorskip("diffusers")  # installed by the test command ([test] extra)
dist = pytest.importorskip("torch.distributed")
# Builds of torch without distributed or gloo cannot start the 2-process group at all;
# the project machines and CI have both, so these tests run there.
if not dist.is_available() or not dist.is_gloo_available():
    pytest.skip("torch.distributed with gloo is not available", allow_module_level=True)

from kvlock_kernels import kv_lock_attention  # noqa: E402
from kvlock_kernels.diffusers import KVLockPlan, enable_kvlock  # noqa: E402
from kvlock_kernels.integrations.diffusers.testing import tiny_inputs, tiny_model, tiny_tokens  # noqa: E402

WORLD = 2
ALPHA = 0.7


def _mask():
    return torch.rand(tiny_tokens("wan"), generator=torch.Generator().manual_seed(3))


def _shims():
    torch.accelerator.device_count = lambda: 1
    import diffusers.hooks.context_parallel as hooks

    if not hasattr(hooks.logger, "warning_once"):
        hooks.logger.warning_once = hooks.logger.warning


def _ring_inputs():
    g = torch.Generator().manual_seed(7)
    B, S, H, D = 3, 16, 2, 16
    q, k, v, ks, vs = (torch.randn(B if i < 3 else 1, S, H, D, generator=g) for i in range(5))
    return q, k, v, ks, vs, torch.rand(1, S, generator=g)


def _worker(rank, port, out_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    _shims()
    from diffusers import ContextParallelConfig

    from kvlock_kernels import KVRingBuffer
    from kvlock_kernels.diffusers import set_plan
    from kvlock_kernels.integrations.diffusers.parallel import ring_kv_lock_attention

    results = {}
    inputs = tiny_inputs("wan", 3)
    plan = KVLockPlan.branch(_mask(), ALPHA, batch_size=3)

    def forward(model, inp=inputs):
        with torch.no_grad():
            return model(**inp)[0]

    # Ulysses through diffusers' dispatch; KV-Lock enabled after enable_parallelism.
    model = tiny_model("wan")
    model.enable_parallelism(config=ContextParallelConfig(ulysses_degree=WORLD))
    enable_kvlock(model, plan)
    results["ulysses"] = forward(model)

    # Cached source K/V captured on the full sequence (before parallelism), read as shards.
    model = tiny_model("wan")
    enable_kvlock(model)
    attn = model.blocks[0].attn1
    cache = KVRingBuffer(2, (tiny_tokens("wan"), attn.heads, 24), torch.float32, "cpu")
    set_plan(model, KVLockPlan.capture(cache, 0))
    forward(model, {k: (v[:1] if isinstance(v, torch.Tensor) else v) for k, v in inputs.items()})
    model.enable_parallelism(config=ContextParallelConfig(ulysses_degree=WORLD))
    set_plan(model, KVLockPlan.cached(_mask(), ALPHA, cache=cache, step=0))
    results["ulysses_cache"] = forward(model, {k: (v[1:] if isinstance(v, torch.Tensor) else v)
                                               for k, v in inputs.items()})

    # KV-Lock's own Ulysses and ring around the fused kernel.
    for kind, config in (("fused_ulysses", ContextParallelConfig(ulysses_degree=WORLD)),
                         ("fused_ring", ContextParallelConfig(ring_degree=WORLD))):
        model = tiny_model("wan")
        enable_kvlock(model, plan, attention="fused", kernel_backend="torch")
        model.enable_parallelism(config=config)
        results[kind] = forward(model)

    # Ring through diffusers' native SDPA cannot merge (no LSE): refused before the model runs.
    model = tiny_model("wan")
    enable_kvlock(model, plan)
    model.enable_parallelism(config=ContextParallelConfig(ring_degree=WORLD))
    try:
        forward(model)
        results["ring_native"] = "ran"
    except ValueError as e:
        results["ring_native"] = str(e)

    # The ring math alone: this rank's query shard against every rank's K/V chunk.
    q, k, v, ks, vs, lock = _ring_inputs()
    shard = lambda t: t.chunk(WORLD, dim=1)[rank]  # noqa: E731
    results["ring_math"] = ring_kv_lock_attention(shard(q), shard(k), shard(v), shard(ks), shard(vs), shard(lock),
                                                  group=dist.group.WORLD, world=WORLD, rank=rank, backend="torch")
    torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    import torch.multiprocessing as mp

    out = tmp_path_factory.mktemp("cp")
    mp.start_processes(_worker, args=(_free_port(), str(out)), nprocs=WORLD, start_method="spawn", join=True)
    return [torch.load(out / f"rank{r}.pt") for r in range(WORLD)]


@pytest.fixture(scope="module")
def single():
    model = tiny_model("wan")
    enable_kvlock(model, KVLockPlan.branch(_mask(), ALPHA, batch_size=3))
    with torch.no_grad():
        return model(**tiny_inputs("wan", 3))[0]


def test_ulysses_through_diffusers_equals_one_process(ranks, single):
    for r in ranks:  # diffusers gathers the full output on every rank
        torch.testing.assert_close(r["ulysses"], single, atol=1e-6, rtol=1e-6)


def test_ulysses_with_cached_full_sequence_source(ranks, single):
    for r in ranks:
        torch.testing.assert_close(r["ulysses_cache"], single[1:], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", ["fused_ulysses", "fused_ring"])
def test_kvlock_fused_kernel_under_ulysses_and_ring(ranks, single, kind):
    for r in ranks:
        torch.testing.assert_close(r[kind], single, atol=1e-5, rtol=1e-5)


def test_ring_math_with_lse_merges(ranks):
    q, k, v, ks, vs, lock = _ring_inputs()
    full = kv_lock_attention(q, k, v, ks.expand(3, -1, -1, -1), vs.expand(3, -1, -1, -1), lock, backend="torch")
    got = torch.cat([r["ring_math"] for r in ranks], dim=1)
    torch.testing.assert_close(got, full, atol=1e-5, rtol=1e-5)


def test_ring_through_native_sdpa_is_refused(ranks):
    for r in ranks:
        assert "ring attention (ring_degree > 1) needs an attention backend that returns the log-sum-exp" in \
            r["ring_native"]
