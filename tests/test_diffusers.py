"""KV-Lock processors inside diffusers' video transformers (tiny random-weight models of
every supported family, CPU): stock equality, the lock, the source, the attention path
diffusers dispatches, processor replacement, autograd, torch.compile, bad inputs."""
import pytest
import torch

diffusers = pytest.importorskip("diffusers")  # installed by the test command ([test] extra)

from kvlock_kernels import KVRingBuffer  # noqa: E402
from kvlock_kernels.diffusers import (  # noqa: E402
    SOURCE_INDEX,
    SUPPORTED_TRANSFORMERS,
    KVLockPlan,
    adapter_for,
    disable_kvlock,
    enable_kvlock,
    get_plan,
    is_kvlock_enabled,
    set_plan,
)
from kvlock_kernels.integrations.diffusers.testing import FAMILIES, tiny_inputs, tiny_model, tiny_tokens  # noqa: E402

TOKENS = tiny_tokens("wan")


def run(model, inputs):
    with torch.no_grad():
        return model(**inputs)[0]


def soft_mask(n, seed=3):
    return torch.rand(n, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def models():
    """One tiny model per family, shared (tests restore what they change)."""
    return {family: tiny_model(family) for family in FAMILIES}


@pytest.mark.parametrize("family", FAMILIES)
def test_off_and_zero_lock_equal_stock_bit_for_bit(models, family):
    model = models[family]
    inputs = tiny_inputs(family, 3)
    stock = run(model, inputs)
    enable_kvlock(model)
    try:
        assert torch.equal(run(model, inputs), stock)  # installed, plan off
        set_plan(model, KVLockPlan.branch(soft_mask(tiny_tokens(family)), 0.0, batch_size=3))
        assert torch.equal(run(model, inputs), stock)  # lock weights all 0
        set_plan(model, KVLockPlan.branch(soft_mask(tiny_tokens(family)), 0.9, batch_size=3))
        locked = run(model, inputs)
    finally:
        disable_kvlock(model)
    assert torch.equal(locked[SOURCE_INDEX], stock[SOURCE_INDEX])  # the source branch is not locked itself
    assert (locked[1:] - stock[1:]).abs().max() > 1e-3  # the targets are
    assert torch.equal(run(model, inputs), stock)  # disable restores the stock processors


@pytest.mark.parametrize("family", ["wan", "cogvideox", "hunyuan_video"])
def test_bf16_model_equals_stock_bit_for_bit(family):
    """model.to(bfloat16) casts Wan's RoPE tables too, and the stock processor then rotates in
    bf16: KV-Lock off or at alpha 0 still gives the stock output bit for bit, and locks at alpha > 0."""
    model = tiny_model(family).to(torch.bfloat16)
    inputs = {k: (v.to(torch.bfloat16) if isinstance(v, torch.Tensor) and v.is_floating_point() and k != "timestep"
                  else v) for k, v in tiny_inputs(family, 3).items()}
    stock = run(model, inputs)
    enable_kvlock(model)
    try:
        assert torch.equal(run(model, inputs), stock)
        set_plan(model, KVLockPlan.branch(soft_mask(tiny_tokens(family)), torch.tensor(0.0), batch_size=3))
        assert torch.equal(run(model, inputs), stock)
        set_plan(model, KVLockPlan.branch(soft_mask(tiny_tokens(family)), 0.9, batch_size=3))
        locked = run(model, inputs)
    finally:
        disable_kvlock(model)
    assert torch.equal(locked[SOURCE_INDEX], stock[SOURCE_INDEX])
    assert (locked[1:].float() - stock[1:].float()).abs().max() > 1e-2


@pytest.mark.parametrize("family", FAMILIES)
def test_full_lock_on_identical_source_equals_stock(models, family):
    """Weight 1 on every token toward a source identical to the targets changes nothing
    (up to the rounding by which a batched model's identical rows already differ)."""
    model = models[family]
    one = tiny_inputs(family, 1)
    inputs = {k: (v.expand(3, *v.shape[1:]) if isinstance(v, torch.Tensor) else v) for k, v in one.items()}
    stock = run(model, inputs)
    enable_kvlock(model, KVLockPlan.branch(torch.zeros(tiny_tokens(family)), 1.0, batch_size=3))
    try:
        torch.testing.assert_close(run(model, inputs), stock, atol=1e-6, rtol=1e-6)
    finally:
        disable_kvlock(model)


@pytest.mark.parametrize("family", ["wan", "cogvideox", "hunyuan_video"])
def test_capture_then_cache_equals_in_batch_branch(models, family):
    model = models[family]
    inputs = tiny_inputs(family, 3)
    mask = soft_mask(tiny_tokens(family))
    enable_kvlock(model, KVLockPlan.branch(mask, 0.7, batch_size=3))
    try:
        branch = run(model, inputs)
        adapter = adapter_for(model)
        layers = len(adapter.attention_modules(model))
        attn = adapter.attention_modules(model)[0][1]
        D = attn.to_k.out_features // attn.heads
        cache = KVRingBuffer(layers, (tiny_tokens(family), attn.heads, D), torch.float32, "cpu", host_spill=True)
        source = {k: (v[SOURCE_INDEX:SOURCE_INDEX + 1] if isinstance(v, torch.Tensor) else v)
                  for k, v in inputs.items()}
        set_plan(model, KVLockPlan.capture(cache, 5))
        run(model, source)
        assert sorted(cache.keys()) == [(5, layer) for layer in range(layers)]
        set_plan(model, KVLockPlan.cached(mask, 0.7, cache=cache, step=5))
        targets = {k: (v[1:] if isinstance(v, torch.Tensor) else v) for k, v in inputs.items()}
        cached = run(model, targets)
    finally:
        disable_kvlock(model)
    torch.testing.assert_close(cached, branch[1:], atol=2e-6, rtol=1e-5)


def test_fused_kernel_path_matches_the_dispatch_path(models):
    """attention='fused' (kv_lock_attention: the Triton kernel through the interpreter)
    gives the same model output as the epilogue lock + diffusers dispatch."""
    model = models["cogvideox"]
    inputs = tiny_inputs("cogvideox", 3)
    plan = KVLockPlan.branch(soft_mask(tiny_tokens("cogvideox")), 0.8, batch_size=3)
    enable_kvlock(model, plan)
    try:
        dispatched = run(model, inputs)
        enable_kvlock(model, plan, attention="fused", kernel_backend="triton")
        fused = run(model, inputs)
    finally:
        disable_kvlock(model)
    torch.testing.assert_close(fused, dispatched, atol=1e-4, rtol=1e-4)


def test_epilogue_kernel_inside_the_model(models):
    """The epilogue's Triton kernel (interpreter) in place of its PyTorch path."""
    model = models["wan"]
    inputs = tiny_inputs("wan", 3)
    plan = KVLockPlan.branch(soft_mask(TOKENS), 0.6, batch_size=3)
    enable_kvlock(model, plan)
    try:
        ref = run(model, inputs)
        enable_kvlock(model, plan, epilogue_backend="triton")
        out = run(model, inputs)
    finally:
        disable_kvlock(model)
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("family", ["wan", "cogvideox"])
def test_set_attention_backend_is_the_backend_that_runs(models, family, monkeypatch):
    from diffusers.models import attention_dispatch as ad

    model = models[family]
    inputs = tiny_inputs(family, 3)
    enable_kvlock(model, KVLockPlan.branch(soft_mask(tiny_tokens(family)), 0.8, batch_size=3))
    seen, ran = [], []
    real_dispatch = ad.dispatch_attention_fn

    def spy(*args, **kwargs):
        seen.append((kwargs.get("backend"), kwargs.get("parallel_config")))
        return real_dispatch(*args, **kwargs)

    name = ad.AttentionBackendName._NATIVE_MATH
    real_math = ad._AttentionBackendRegistry._backends[name]

    def math_spy(*args, **kwargs):
        ran.append(1)
        return real_math(*args, **kwargs)

    monkeypatch.setattr(ad, "dispatch_attention_fn", spy)
    monkeypatch.setitem(ad._AttentionBackendRegistry._backends, name, math_spy)
    active, _ = ad._AttentionBackendRegistry.get_active_backend()
    try:
        ref = run(model, inputs)
        model.set_attention_backend("_native_math")
        out = run(model, inputs)
    finally:
        model.reset_attention_backend()
        ad._AttentionBackendRegistry.set_active_backend(active)
        disable_kvlock(model)
    layers = len(adapter_for(model).attention_modules(model))
    locked_calls = [b for b, _ in seen[-layers:]]
    assert locked_calls == [name] * layers  # the KV-Lock processors dispatch to the user's backend ...
    assert len(ran) >= layers  # ... and that backend is what runs
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_dispatch_is_looked_up_where_the_stock_processor_looks(models, monkeypatch):
    """Wan's stock processor calls its module's dispatch_attention_fn: so does KV-Lock's."""
    from diffusers.models.transformers import transformer_wan

    model = models["wan"]
    calls = []
    real = transformer_wan.dispatch_attention_fn
    monkeypatch.setattr(transformer_wan, "dispatch_attention_fn", lambda *a, **k: calls.append(1) or real(*a, **k))
    enable_kvlock(model, KVLockPlan.branch(soft_mask(TOKENS), 0.8, batch_size=3))
    try:
        run(model, tiny_inputs("wan", 3))
    finally:
        disable_kvlock(model)
    assert len(calls) >= len(model.blocks)


def test_set_attention_backend_before_enable_is_kept(models):
    model = models["wan"]
    model.set_attention_backend("_native_math")
    try:
        enable_kvlock(model)
        procs = [attn.processor for _, attn in adapter_for(model).attention_modules(model)]
        assert all(p._attention_backend.value == "_native_math" for p in procs)
        disable_kvlock(model)
        assert all(attn.processor._attention_backend.value == "_native_math"
                   for _, attn in adapter_for(model).attention_modules(model))
    finally:
        model.reset_attention_backend()
        from diffusers.models.attention_dispatch import AttentionBackendName, _AttentionBackendRegistry

        _AttentionBackendRegistry.set_active_backend(AttentionBackendName.NATIVE)


def test_fuse_qkv_projections_after_enable_keeps_kvlock():
    """CogVideoX's fuse_qkv_projections swaps in FusedCogVideoXAttnProcessor2_0: KV-Lock
    re-installs itself over it (with a warning) instead of silently running stock."""
    from diffusers.models.attention_processor import CogVideoXAttnProcessor2_0, FusedCogVideoXAttnProcessor2_0

    model = tiny_model("cogvideox")
    inputs = tiny_inputs("cogvideox", 3)
    plan = KVLockPlan.branch(soft_mask(tiny_tokens("cogvideox")), 0.8, batch_size=3)
    enable_kvlock(model, plan)
    locked = run(model, inputs)
    model.fuse_qkv_projections()
    with pytest.warns(UserWarning, match="re-installs itself"):
        fused = run(model, inputs)
    torch.testing.assert_close(fused, locked, atol=1e-5, rtol=1e-5)  # still locked, fused projections
    model.unfuse_qkv_projections()  # puts KV-Lock's own (pre-fuse) processors back: adopted again
    torch.testing.assert_close(run(model, inputs), locked, atol=1e-5, rtol=1e-5)
    disable_kvlock(model)
    assert all(type(b.attn1.processor) is CogVideoXAttnProcessor2_0 for b in model.transformer_blocks)

    stock = run(model, inputs)
    enable_kvlock(model, plan)
    model.fuse_qkv_projections()
    with pytest.warns(UserWarning, match="re-installs itself"):
        run(model, inputs)
    disable_kvlock(model)  # restores the fused stock processors fuse_qkv_projections set
    assert all(isinstance(b.attn1.processor, FusedCogVideoXAttnProcessor2_0) for b in model.transformer_blocks)
    model.unfuse_qkv_projections()  # puts back what fuse recorded: KV-Lock processors, inert after disable
    assert torch.equal(run(model, inputs), stock)


def test_user_set_attn_processor_survives_disable_and_foreign_ones_are_detected(models):
    from diffusers.models.attention_processor import AttnProcessor2_0
    from diffusers.models.transformers.transformer_wan import WanAttnProcessor

    model = models["wan"]
    inputs = tiny_inputs("wan", 3)
    before = [b.attn1.processor for b in model.blocks]
    enable_kvlock(model, KVLockPlan.branch(soft_mask(TOKENS), 0.8, batch_size=3))
    mine = WanAttnProcessor()
    model.blocks[0].attn1.set_processor(mine)
    disable_kvlock(model)  # must not overwrite the user's processor on blocks.0
    assert model.blocks[0].attn1.processor is mine
    assert model.blocks[1].attn1.processor is before[1]
    model.blocks[0].attn1.set_processor(before[0])

    enable_kvlock(model, KVLockPlan.branch(soft_mask(TOKENS), 0.8, batch_size=3))
    model.blocks[1].attn1.set_processor(AttnProcessor2_0())  # not a Wan processor: cannot sit under KV-Lock
    with pytest.raises(RuntimeError, match=r"blocks\.1\.attn1 was replaced by AttnProcessor2_0"):
        run(model, inputs)
    disable_kvlock(model)
    model.blocks[1].attn1.set_processor(before[1])

    # A plan provider: the replacement is judged under the plan of the call itself (the first one too).
    provider = lambda call: KVLockPlan.branch(soft_mask(call.num_video_tokens), 0.8, batch_size=call.batch_size)  # noqa: E731
    enable_kvlock(model, provider)
    model.blocks[1].attn1.set_processor(AttnProcessor2_0())
    try:
        with pytest.raises(RuntimeError, match=r"blocks\.1\.attn1 was replaced by AttnProcessor2_0"):
            run(model, inputs)
    finally:
        disable_kvlock(model)
        model.blocks[1].attn1.set_processor(before[1])


def test_enable_twice_and_disable_restore_the_originals(models):
    model = models["hunyuan_video"]
    modules = adapter_for(model).attention_modules(model)
    before = [attn.processor for _, attn in modules]
    enable_kvlock(model)
    enable_kvlock(model, attention="diffusers")
    assert is_kvlock_enabled(model)
    disable_kvlock(model)
    assert [attn.processor for _, attn in modules] == before
    assert not is_kvlock_enabled(model) and get_plan(model).mode == "off"
    disable_kvlock(model)  # a second disable is a no-op


def test_gradients_flow_through_a_locked_wan():
    model = tiny_model("wan").train()
    inputs = tiny_inputs("wan", 3)
    enable_kvlock(model, KVLockPlan.branch(soft_mask(TOKENS), 0.7, batch_size=3))
    out = model(**inputs)[0]
    out.square().mean().backward()
    grads = [p.grad for p in model.blocks[0].attn1.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert model.blocks[0].attn1.to_k.weight.grad.abs().sum() > 0
    # The same gradients as a lock-free model at alpha 0 would not give: the lock is in the graph.
    model.zero_grad()
    model.enable_gradient_checkpointing()
    out2 = model(**inputs)[0]
    out2.square().mean().backward()
    torch.testing.assert_close(out2, out, atol=1e-6, rtol=1e-6)
    assert model.blocks[0].attn1.to_k.weight.grad.abs().sum() > 0


def test_compiled_lock_mode_never_recompiles_across_steps(monkeypatch):
    """fullgraph, a tensor alpha that changes every step, two calls per step (cond and
    uncond text): one graph."""
    monkeypatch.setattr(torch._dynamo.config, "error_on_recompile", True)
    torch._dynamo.reset()
    model = tiny_model("wan")
    enable_kvlock(model)
    compiled = torch.compile(model, fullgraph=True, backend="eager")
    inputs = tiny_inputs("wan", 3)
    texts = [inputs["encoder_hidden_states"], torch.randn_like(inputs["encoder_hidden_states"])]
    mask = soft_mask(TOKENS)
    with torch.no_grad():
        for step in range(4):
            alpha = torch.tensor(0.25 * step + 0.1)
            set_plan(model, KVLockPlan.branch(mask, alpha, batch_size=3, check_inputs=False))
            for text in texts:
                call = dict(inputs, timestep=torch.full((3,), 900.0 - 100 * step), encoder_hidden_states=text)
                got = compiled(**call)[0]
                torch.testing.assert_close(got, model(**call)[0], atol=1e-5, rtol=1e-5)
    # The ring buffer (capture / cache source) cannot be in a graph: a clear refusal under fullgraph.
    monkeypatch.setattr(torch._dynamo.config, "error_on_recompile", False)
    set_plan(model, KVLockPlan.capture(KVRingBuffer(2, (TOKENS, 2, 24), torch.float32, "cpu"), 0))
    with pytest.raises(torch._dynamo.exc.Unsupported, match="capture and cache modes .* compile without fullgraph"):
        compiled(**inputs)
    torch._dynamo.reset()


def test_compile_repeated_blocks_with_kvlock(monkeypatch):
    monkeypatch.setattr(torch._dynamo.config, "error_on_recompile", True)
    torch._dynamo.reset()
    model = tiny_model("wan")
    enable_kvlock(model)
    inputs = tiny_inputs("wan", 3)
    mask = soft_mask(TOKENS)
    expected = []
    with torch.no_grad():
        for step in range(3):
            set_plan(model, KVLockPlan.branch(mask, torch.tensor(0.3 * step), batch_size=3, check_inputs=False))
            expected.append(model(**inputs)[0])
        model.compile_repeated_blocks(fullgraph=True, backend="eager")
        for step in range(3):
            set_plan(model, KVLockPlan.branch(mask, torch.tensor(0.3 * step), batch_size=3, check_inputs=False))
            torch.testing.assert_close(model(**inputs)[0], expected[step], atol=1e-5, rtol=1e-5)
    torch._dynamo.reset()


# ---------------------------------------------------------------------------------- bad input
def test_unsupported_transformer_is_refused():
    for call in (lambda: enable_kvlock(torch.nn.Linear(2, 2)), lambda: adapter_for(torch.nn.Linear(2, 2))):
        with pytest.raises(TypeError, match="KV-Lock supports WanTransformer3DModel, WanVACETransformer3DModel, "
                                            "CogVideoXTransformer3DModel, HunyuanVideoTransformer3DModel; got Linear"):
            call()
    assert SUPPORTED_TRANSFORMERS == ("WanTransformer3DModel", "WanVACETransformer3DModel",
                                      "CogVideoXTransformer3DModel", "HunyuanVideoTransformer3DModel")


@pytest.mark.parametrize("family, latent", [("wan", (3, 8, 8)), ("wan", (2, 8, 12)), ("cogvideox", (3, 8, 8)),
                                            ("hunyuan_video", (2, 4, 8))])
def test_token_mask_of_the_wrong_length_is_refused_before_the_model_runs(models, family, latent):
    model = models[family]
    inputs = tiny_inputs(family, 3, latent=latent)
    tokens = tiny_tokens(family, latent)
    called = []
    first = adapter_for(model).attention_modules(model)[0][1]
    handle = first.to_q.register_forward_pre_hook(lambda *a: called.append(1))  # nothing may run
    enable_kvlock(model, KVLockPlan.branch(torch.zeros(tokens + 4), 1.0, batch_size=3))
    try:
        with pytest.raises(ValueError, match=f"lock weights cover {tokens + 4} video tokens but this .* call has "
                                             f"{tokens}"):
            run(model, inputs)
    finally:
        disable_kvlock(model)
        handle.remove()
    assert not called


def test_branch_plan_refuses_a_batch_without_the_source(models):
    """The stock CogVideoXPipeline calls with [uncond, cond]: entry 0 is no source."""
    model = models["cogvideox"]
    enable_kvlock(model, KVLockPlan.branch(torch.zeros(tiny_tokens("cogvideox")), 1.0, batch_size=3))
    try:
        with pytest.raises(ValueError, match=r"batch entry 0 of a batch of 3, but this call's batch is 2"):
            run(model, tiny_inputs("cogvideox", 2))
    finally:
        disable_kvlock(model)
    with pytest.raises(ValueError, match="source='branch' needs batch_size"):
        KVLockPlan(mode="lock", lock=torch.zeros(4))


def test_attention_mask_on_a_locked_layer_is_refused(models):
    model = models["wan"]
    attn = model.blocks[0].attn1
    enable_kvlock(model, KVLockPlan.branch(torch.zeros(TOKENS), 1.0, batch_size=3))
    try:
        x = torch.randn(3, TOKENS, 48)
        with pytest.raises(ValueError, match="attention mask on a locked self-attention layer"):
            attn(x, None, torch.ones(3, 1, 1, TOKENS, dtype=torch.bool))
    finally:
        disable_kvlock(model)
    with pytest.raises(ValueError, match="passes its own attention mask"):
        enable_kvlock(models["hunyuan_video"], attention="fused")


def test_parallel_configs_kvlock_cannot_serve_are_refused(models):
    from diffusers import ContextParallelConfig
    from diffusers.models._modeling_parallel import ParallelConfig

    inputs = {"wan": tiny_inputs("wan", 3), "cogvideox": tiny_inputs("cogvideox", 3)}

    def check(family, cp, match, **options):
        model = models[family]
        enable_kvlock(model, KVLockPlan.branch(torch.zeros(tiny_tokens(family)), 1.0, batch_size=3), **options)
        try:
            for _, attn in adapter_for(model).attention_modules(model):
                attn.processor._parallel_config = ParallelConfig(context_parallel_config=cp)
            with pytest.raises(ValueError, match=match):
                run(model, inputs[family])
        finally:
            disable_kvlock(model)

    check("cogvideox", ContextParallelConfig(ulysses_degree=2), "CogVideoX .* has no such plan")
    check("wan", ContextParallelConfig(ring_degree=2), "ring attention .* needs an attention backend that returns")
    check("wan", ContextParallelConfig(ring_degree=2, ulysses_degree=2), "not both at once", attention="fused")
    check("wan", ContextParallelConfig(ulysses_degree=2, ulysses_anything=True), "uneven shards", attention="fused")


def test_plan_bad_values():
    with pytest.raises(ValueError, match="mode must be one of"):
        KVLockPlan(mode="on")
    with pytest.raises(ValueError, match="needs a KVRingBuffer"):
        KVLockPlan(mode="capture")
    with pytest.raises(TypeError, match="cache must be a kvlock_kernels.KVRingBuffer"):
        KVLockPlan.capture({}, 0)
    with pytest.raises(TypeError, match="token_mask must be a torch.Tensor"):
        KVLockPlan.branch([0, 1], 1.0, batch_size=3)
    with pytest.raises(ValueError, match="alpha must be in"):
        KVLockPlan.branch(torch.zeros(4), 1.5, batch_size=3)
    with pytest.raises(ValueError, match="token_mask must be"):
        KVLockPlan.branch(torch.zeros(2, 4), 1.0, batch_size=3)
    m = tiny_model("cogvideox")
    with pytest.raises(TypeError, match="plan must be a KVLockPlan"):
        enable_kvlock(m, "lock")
    assert not is_kvlock_enabled(m)  # refused before anything was installed
    enable_kvlock(m)
    with pytest.raises(TypeError, match="plan must be a KVLockPlan"):
        set_plan(m, "lock")
    empty = KVRingBuffer(2, (tiny_tokens("cogvideox"), 2, 16), torch.float32, "cpu")
    set_plan(m, KVLockPlan.cached(torch.zeros(tiny_tokens("cogvideox")), cache=empty, step=4))
    with pytest.raises(ValueError, match=r"step 4 .* layers \[0, 1\] of this step were never captured"):
        run(m, tiny_inputs("cogvideox", 2))
    compact = KVRingBuffer(2, (4, 2, 8), torch.float32, "cpu", compact=True)
    with pytest.raises(ValueError, match="without compact=True"):
        KVLockPlan.capture(compact, 0)
    with pytest.raises(ValueError, match="without compact=True"):
        KVLockPlan.cached(torch.zeros(4), cache=compact, step=0)
    with pytest.raises(ValueError, match="latent_mask_to_tokens"):
        KVLockPlan.branch(torch.zeros(2, 4, 4), batch_size=3)
    ready = KVLockPlan.from_weights(torch.tensor([[0.5, 1.0, 0.0]], dtype=torch.float16), batch_size=3)
    assert ready.lock.dtype == torch.float32 and ready.lock.tolist() == [[0.5, 1.0, 0.0]]
    soft = KVLockPlan.branch(torch.tensor([0.0, 0.25, 1.0]), 0.8, batch_size=3)
    torch.testing.assert_close(soft.lock, torch.tensor([[0.8, 0.6, 0.0]]))  # soft masks stay soft
