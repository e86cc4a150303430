"""KV-Lock as a drop-in for diffusers' Wan and CogVideoX transformers (tiny random-weight
models on CPU), and the KVLockEditor loop."""
import math

import pytest
import torch

diffusers = pytest.importorskip("diffusers")  # installed by the test command ([test] extra)

from diffusers import CogVideoXTransformer3DModel, FlowMatchEulerDiscreteScheduler, WanTransformer3DModel  # noqa: E402

from kvlock_kernels import KVLockScheduler, KVRingBuffer  # noqa: E402
from kvlock_kernels.diffusers import KVLockController, KVLockEditor, disable_kvlock, enable_kvlock  # noqa: E402
from kvlock_kernels.masks import latent_mask_to_tokens  # noqa: E402

F, H, W = 3, 8, 8
TOKENS = F * (H // 2) * (W // 2)


def tiny_wan():
    torch.manual_seed(0)
    return WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=24, in_channels=4,
                                 out_channels=4, text_dim=32, freq_dim=32, ffn_dim=64, num_layers=2,
                                 rope_max_seq_len=32).eval()


def tiny_cogvideox():
    torch.manual_seed(0)
    return CogVideoXTransformer3DModel(num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4,
                                       time_embed_dim=8, text_embed_dim=32, num_layers=2, sample_width=W,
                                       sample_height=H, sample_frames=9, patch_size=2, temporal_compression_ratio=4,
                                       max_text_seq_length=7).eval()


MODELS = {"wan": (tiny_wan, (4, F, H, W)), "cogvideox": (tiny_cogvideox, (F, 4, H, W))}


def inputs(kind, batch, seed=1):
    g = torch.Generator().manual_seed(seed)
    shape = MODELS[kind][1]
    x = torch.randn(batch, *shape, generator=g)
    e = torch.randn(batch, 7, 32, generator=g)
    return x, torch.full((batch,), 500.0), e


def run(model, x, t, e):
    with torch.no_grad():
        return model(x, timestep=t, encoder_hidden_states=e, return_dict=False)[0]


def fg_tokens(seed=3):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(TOKENS, generator=g) > 0.5


@pytest.mark.parametrize("kind", ["wan", "cogvideox"])
def test_off_and_zero_lock_equal_stock(kind):
    model = MODELS[kind][0]()
    x, t, e = inputs(kind, 3)
    stock = run(model, x, t, e)
    ctl = KVLockController(token_fg_mask=fg_tokens(), alpha=0.0, mode="off", backend="torch")
    enable_kvlock(model, ctl)
    assert (run(model, x, t, e) - stock).abs().max() <= 1e-6
    ctl.set_step(0, alpha=0.0, mode="lock")  # lock weights all 0
    assert (run(model, x, t, e) - stock).abs().max() <= 1e-6
    disable_kvlock(model)


@pytest.mark.parametrize("kind", ["wan", "cogvideox"])
def test_full_lock_on_identical_source_equals_stock(kind):
    """Lock weight 1 on every token, source = target: the blend changes nothing."""
    model = MODELS[kind][0]()
    x, t, e = inputs(kind, 1)
    x3, t3, e3 = x.expand(3, *x.shape[1:]), t.expand(3), e.expand(3, -1, -1)
    stock = run(model, x3, t3, e3)
    enable_kvlock(model, KVLockController(token_fg_mask=torch.zeros(TOKENS, dtype=torch.bool), alpha=1.0,
                                          mode="lock", backend="torch"))
    assert (run(model, x3, t3, e3) - stock).abs().max() <= 1e-6
    disable_kvlock(model)


@pytest.mark.parametrize("kind", ["wan", "cogvideox"])
def test_lock_changes_only_what_it_should(kind):
    """Locking toward a different source changes the target branches' outputs, and the
    Triton kernel (interpreter) agrees with the PyTorch path inside the model."""
    model = MODELS[kind][0]()
    x, t, e = inputs(kind, 3)
    stock = run(model, x, t, e)
    outs = {}
    for backend in ("torch", "triton"):
        enable_kvlock(model, KVLockController(token_fg_mask=fg_tokens(), alpha=0.8, mode="lock", backend=backend))
        outs[backend] = run(model, x, t, e)
        disable_kvlock(model)
    assert (outs["torch"][0] - stock[0]).abs().max() <= 1e-5  # the source branch itself is unaffected
    assert (outs["torch"][1:] - stock[1:]).abs().max() > 1e-3
    torch.testing.assert_close(outs["triton"], outs["torch"], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("kind", ["wan", "cogvideox"])
def test_capture_then_cache_lock_equals_in_batch_branch(kind):
    model = MODELS[kind][0]()
    x, t, e = inputs(kind, 3)
    mask = fg_tokens()
    ctl = KVLockController(token_fg_mask=mask, alpha=0.7, mode="lock", backend="torch")
    enable_kvlock(model, ctl)
    branch = run(model, x, t, e)
    # Capture the source (batch entry 0) alone, then lock the targets from the cache.
    text = e.shape[1] if kind == "cogvideox" else 0
    head_dim = 24 if kind == "wan" else 16
    cache = KVRingBuffer(4, (TOKENS + text, 2, head_dim), torch.float32, "cpu", host_spill=True)
    ctl.cache = cache
    ctl.set_step(5, mode="capture")
    run(model, x[:1], t[:1], e[:1])
    assert len(cache) == 2 and (5, 0) in cache and (5, 1) in cache
    ctl.source = "cache"
    ctl.set_step(5, mode="lock")
    cached = run(model, x[1:], t[1:], e[1:])
    torch.testing.assert_close(cached, branch[1:], atol=1e-6, rtol=1e-6)
    disable_kvlock(model)


@pytest.mark.parametrize("kind", ["wan", "cogvideox"])
def test_disable_restores_processors_exactly(kind):
    model = MODELS[kind][0]()
    before = [blk.attn1.processor for blk in (model.blocks if kind == "wan" else model.transformer_blocks)]
    x, t, e = inputs(kind, 2)
    stock = run(model, x, t, e)
    enable_kvlock(model, KVLockController(token_fg_mask=fg_tokens(), alpha=0.5, mode="lock", backend="torch"))
    run(model, x, t, e)
    disable_kvlock(model)
    after = [blk.attn1.processor for blk in (model.blocks if kind == "wan" else model.transformer_blocks)]
    assert all(a is b for a, b in zip(before, after))
    assert torch.equal(run(model, x, t, e), stock)


def spec_controls(sigma2, tau=0.01, omega0=5.0, b=2.0):
    r = sigma2 / tau
    return min(max(r, 0.0), 1.0), omega0 * min(max(r, 1.0), b)


@pytest.mark.parametrize("kind, source", [("wan", "branch"), ("wan", "inversion")])
def test_editor_runs_and_follows_the_schedule(kind, source):
    model = MODELS[kind][0]()
    shape = MODELS[kind][1]
    g = torch.Generator().manual_seed(0)
    src = torch.randn(1, *shape, generator=g)
    fg = torch.zeros(F, H, W, dtype=torch.bool)
    fg[:, 2:6, 2:6] = True
    pe, ne = torch.randn(1, 7, 32, generator=g), torch.randn(1, 7, 32, generator=g)
    sched = KVLockScheduler(8, kappa=4, window=3, tau=1e-4, device="cpu")
    editor = KVLockEditor(model, FlowMatchEulerDiscreteScheduler(shift=3.0), kv_lock=sched, source=source,
                          backend="torch", progress=False)
    with torch.no_grad():
        out, trace = editor.edit(src, fg, pe, ne, num_steps=8, generator=torch.Generator().manual_seed(1))
    assert out.shape == src.shape and torch.isfinite(out).all()
    assert [r["step"] for r in trace] == list(range(8)) and len(trace) == 8
    for r in trace:
        if r["step"] < 4:
            assert (r["alpha"], r["omega"]) == (1.0, 5.0) and math.isnan(r["sigma2"])
        else:
            a, o = spec_controls(r["sigma2"], tau=1e-4)
            assert r["alpha"] == pytest.approx(a, rel=1e-5) and r["omega"] == pytest.approx(o, rel=1e-5)
        assert math.isfinite(r["s_star"])
    assert not hasattr(model, "_kvlock_original_processors")  # processors restored


def test_editor_bad_inputs():
    model = tiny_wan()
    editor = KVLockEditor(model, FlowMatchEulerDiscreteScheduler(), backend="torch", progress=False)
    src = torch.randn(1, 4, F, H, W)
    pe = torch.randn(1, 7, 32)
    with pytest.raises(ValueError, match=r"fg_mask must be the latent-resolution mask \(F, H, W\) = \(3, 8, 8\)"):
        editor.edit(src, torch.zeros(F, H, W + 2, dtype=torch.bool), pe, pe, num_steps=4)
    with pytest.raises(ValueError, match=r"source_latents must be \(1, C, F, H, W\)"):
        editor.edit(torch.randn(2, 4, F, H, W), torch.zeros(F, H, W), pe, pe, num_steps=4)
    with pytest.raises(TypeError, match="KV-Lock supports WanTransformer3DModel, CogVideoXTransformer3DModel"):
        KVLockEditor(torch.nn.Linear(2, 2), FlowMatchEulerDiscreteScheduler())
    with pytest.raises(TypeError, match="KV-Lock supports"):
        enable_kvlock(torch.nn.Linear(2, 2), KVLockController())
    # CogVideoX is a v-prediction DDPM model: patched by enable_kvlock, not run by the flow-matching editor.
    with pytest.raises(TypeError, match="KVLockEditor runs SPEC's flow-matching loop"):
        KVLockEditor(tiny_cogvideox(), FlowMatchEulerDiscreteScheduler())


def test_editor_keeps_fp32_latents_for_a_bf16_model():
    """As WanPipeline: latents and the sampler stay fp32, model inputs are cast to its dtype."""
    model = tiny_wan().to(torch.bfloat16)
    src = torch.randn(1, 4, F, H, W)
    fg = torch.zeros(F, H, W, dtype=torch.bool)
    fg[:, :4] = True
    pe = torch.randn(1, 7, 32)
    for source in ("branch", "inversion"):
        editor = KVLockEditor(model, FlowMatchEulerDiscreteScheduler(), source=source,
                              kv_lock=KVLockScheduler(3, kappa=2, window=2, device="cpu"), backend="torch",
                              progress=False)
        out, trace = editor.edit(src, fg, pe, pe, num_steps=3)
        assert out.dtype == torch.float32 and torch.isfinite(out).all() and len(trace) == 3


def test_token_mask_of_wrong_length_is_rejected():
    model = tiny_wan()
    x, t, e = inputs("wan", 2)
    enable_kvlock(model, KVLockController(token_fg_mask=torch.zeros(TOKENS + 1, dtype=torch.bool), mode="lock",
                                          backend="torch"))
    with pytest.raises(ValueError, match=f"token_fg_mask has {TOKENS + 1} tokens but the model's video sequence "
                                         f"has {TOKENS}"):
        run(model, x, t, e)
    disable_kvlock(model)


def test_controller_bad_configuration():
    with pytest.raises(ValueError, match="mode must be one of"):
        KVLockController(mode="on")
    with pytest.raises(ValueError, match="needs a KVRingBuffer"):
        KVLockController(mode="capture")
    with pytest.raises(ValueError, match="needs token_fg_mask"):
        KVLockController(mode="lock")


def test_token_mask_helper_matches_model_sequence():
    fg = torch.zeros(F, H, W, dtype=torch.bool)
    assert latent_mask_to_tokens(fg).numel() == TOKENS
