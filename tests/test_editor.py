"""KVLockEditor on tiny random-weight models of every family: the loop per family
(flow matching, DDPM v-prediction), Wan2.2 experts, I2V / TI2V conditioning, VACE,
HunyuanVideo, the schedule, and bad inputs (issue 12 item 11)."""
import math
import types
import warnings

import numpy as np
import pytest
import torch

diffusers = pytest.importorskip("diffusers")  # installed by the test command ([test] extra)

from diffusers import (  # noqa: E402
    CogVideoXDDIMScheduler,
    CogVideoXDPMScheduler,
    EulerDiscreteScheduler,
    FlowMatchEulerDiscreteScheduler,
    UniPCMultistepScheduler,
)

from kvlock_kernels import KVLockScheduler  # noqa: E402
from kvlock_kernels.control.cfg_zero_star_scale import cfg_zero_star_scale  # noqa: E402
from kvlock_kernels.diffusers import (  # noqa: E402
    SOURCE_INDEX,
    KVLockEditor,
    KVLockPlan,
    disable_kvlock,
    enable_kvlock,
    get_plan,
    is_kvlock_enabled,
)
from kvlock_kernels.integrations.diffusers.testing import LATENT, tiny_model  # noqa: E402

F, H, W = LATENT


def flow_sched():
    return FlowMatchEulerDiscreteScheduler(shift=3.0)


def ddim_sched():
    return CogVideoXDDIMScheduler(prediction_type="v_prediction", timestep_spacing="trailing")


def fg_mask():
    m = torch.zeros(F, H, W, dtype=torch.bool)
    m[:, 2:6, 2:6] = True
    return m


def embeds(seed=0, L=7):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(1, L, 32, generator=g), torch.randn(1, L, 32, generator=g)


def source(C=4, seed=2):
    return torch.randn(1, C, F, H, W, generator=torch.Generator().manual_seed(seed))


def record_inputs(model):
    """Record every forward's keyword inputs (and the plan in force)."""
    calls = []
    handle = model.register_forward_pre_hook(
        lambda m, a, kw: calls.append(dict(kw, plan=get_plan(m))), with_kwargs=True)
    return calls, handle


def spec_controls(sigma2, tau=0.01, omega0=5.0, b=2.0):
    r = sigma2 / tau
    return min(max(r, 0.0), 1.0), omega0 * min(max(r, 1.0), b)


@pytest.mark.parametrize("source_mode", ["branch", "inversion"])
def test_wan_edit_follows_the_schedule(source_mode):
    model = tiny_model("wan")
    pe, ne = embeds()
    sched = KVLockScheduler(8, kappa=4, window=3, tau=1e-4, device="cpu")
    editor = KVLockEditor(model, flow_sched(), kv_lock=sched, source=source_mode, backend="torch", progress=False)
    out, trace = editor.edit(source(), fg_mask(), pe, ne, num_steps=8, generator=torch.Generator().manual_seed(1))
    assert out.shape == (1, 4, F, H, W) and out.dtype == torch.float32 and torch.isfinite(out).all()
    assert [r["step"] for r in trace] == list(range(8))
    for r in trace:
        if r["step"] < 4:
            assert (r["alpha"], r["omega"]) == (1.0, 5.0) and math.isnan(r["sigma2"])
        else:
            a, o = spec_controls(r["sigma2"], tau=1e-4)
            assert r["alpha"] == pytest.approx(a, rel=1e-5) and r["omega"] == pytest.approx(o, rel=1e-5)
        assert math.isfinite(r["s_star"]) and r["expert"] == 0
    assert not is_kvlock_enabled(model)  # processors restored


def test_all_foreground_edit_equals_a_plain_cfg_zero_star_loop():
    """With every token foreground the lock weights are 0: the editor's loop is then plain
    flow-matching sampling with CFG-Zero* guidance on the stock model."""
    model = tiny_model("wan")
    pe, ne = embeds()
    steps = 4
    sched = KVLockScheduler(steps, kappa=0, window=2, device="cpu")  # omega stays omega0 = 5
    editor = KVLockEditor(model, flow_sched(), kv_lock=sched, backend="torch", progress=False)
    out, _ = editor.edit(source(), torch.ones(F, H, W), pe, ne, num_steps=steps,
                         generator=torch.Generator().manual_seed(1))

    ref_sched = flow_sched()
    ref_sched.set_timesteps(steps)
    latents = torch.randn(1, 4, F, H, W, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        for t in ref_sched.timesteps:
            v = model(hidden_states=torch.cat([latents, latents]), timestep=t.expand(2),
                      encoder_hidden_states=torch.cat([pe, ne]), return_dict=False)[0]
            vc, vu = v[:1], v[1:]
            s = cfg_zero_star_scale(vc, vu)
            guided = (1 - 5.0) * s.view(-1, 1, 1, 1, 1) * vu + 5.0 * vc
            latents = ref_sched.step(guided, t, latents, return_dict=False)[0]
    torch.testing.assert_close(out, latents, atol=1e-4, rtol=1e-4)


def test_source_branch_is_the_noised_source_at_source_index():
    model = tiny_model("wan")
    pe, ne = embeds()
    calls, handle = record_inputs(model)
    x0 = source()
    editor = KVLockEditor(model, flow_sched(), backend="torch", progress=False)
    try:
        editor.edit(x0, fg_mask(), pe, ne, num_steps=3, generator=torch.Generator().manual_seed(1))
    finally:
        handle.remove()
    g = torch.Generator().manual_seed(1)
    torch.randn(x0.shape, generator=g)
    eps = torch.randn(x0.shape, generator=g)  # the second draw: the source branch's fixed noise
    sched = flow_sched()
    sched.set_timesteps(3)
    for k, call in enumerate(calls):
        sigma = sched.sigmas[k]
        torch.testing.assert_close(call["hidden_states"][SOURCE_INDEX:SOURCE_INDEX + 1], (1 - sigma) * x0 + sigma * eps)
        plan = call["plan"]
        assert plan.mode == "lock" and plan.source == "branch" and plan.batch_size == 3


def test_cogvideox_runs_its_ddpm_v_prediction_loop():
    model = tiny_model("cogvideox")
    pe, ne = embeds()
    x0 = source()
    for sched in (ddim_sched(), CogVideoXDPMScheduler(prediction_type="v_prediction", timestep_spacing="trailing")):
        calls, handle = record_inputs(model)
        try:
            out, trace = KVLockEditor(model, sched, backend="torch", progress=False).edit(
                x0, fg_mask(), pe, ne, num_steps=4, generator=torch.Generator().manual_seed(1))
        finally:
            handle.remove()
        assert out.shape == x0.shape and torch.isfinite(out).all() and len(trace) == 4
        g = torch.Generator().manual_seed(1)
        torch.randn(x0.shape, generator=g)
        eps = torch.randn(x0.shape, generator=g)
        for k, call in enumerate(calls):  # CogVideoX's (B, F, C, H, W) input; the source noised by add_noise
            t = sched.timesteps[k]
            want = sched.add_noise(x0, eps, t.reshape(1)).permute(0, 2, 1, 3, 4)
            torch.testing.assert_close(call["hidden_states"][SOURCE_INDEX:SOURCE_INDEX + 1], want)
    out, trace = KVLockEditor(model, ddim_sched(), source="inversion", backend="torch", progress=False).edit(
        x0, fg_mask(), pe, ne, num_steps=3)
    assert torch.isfinite(out).all() and len(trace) == 3


def test_wan22_a14b_switches_experts_at_the_boundary():
    high, low = tiny_model("wan"), tiny_model("wan", seed=5)
    pe, ne = embeds()
    calls_high, h1 = record_inputs(high)
    calls_low, h2 = record_inputs(low)
    pipe = types.SimpleNamespace(transformer=high, transformer_2=low, scheduler=flow_sched(),
                                 config={"boundary_ratio": 0.875, "expand_timesteps": False})
    editor = KVLockEditor.from_pipeline(pipe, backend="torch", progress=False)
    try:
        for source_mode in ("branch", "inversion"):
            editor.source = source_mode
            _, trace = editor.edit(source(), fg_mask(), pe, ne, num_steps=6)
            sched = editor.noise_scheduler
            want = [0 if float(t) >= 0.875 * 1000 else 1 for t in sched.timesteps]
            assert [r["expert"] for r in trace] == want and 0 in want and 1 in want
    finally:
        h1.remove()
        h2.remove()
    for calls in (calls_high, calls_low):  # both experts ran under KV-Lock: locked, and captured by the inversion
        assert {c["plan"].mode for c in calls} >= {"lock", "capture"}
        assert all(c["plan"].mode != "off" for c in calls if c["plan"].source == "branch" and
                   c["hidden_states"].shape[0] == 3)
    assert not is_kvlock_enabled(high) and not is_kvlock_enabled(low)


def test_wan_i2v_takes_its_conditioning_channels():
    model = tiny_model("wan_i2v")  # 4 latent + 8 conditioning channels, image cross-attention
    pe, ne = embeds(L=512)
    editor = KVLockEditor(model, flow_sched(), backend="torch", progress=False)
    cond, img = torch.randn(1, 8, F, H, W), torch.randn(1, 5, 16)
    with pytest.raises(ValueError, match=r"takes 12 input channels: 4 latent channels plus 8 conditioning .* "
                                         r"pass condition=\(1, 8, F, H, W\)"):
        editor.edit(source(), fg_mask(), pe, ne, num_steps=2, image_embeds=img)
    with pytest.raises(ValueError, match="needs image_embeds"):
        editor.edit(source(), fg_mask(), pe, ne, num_steps=2, condition=cond)
    calls, handle = record_inputs(model)
    try:
        out, _ = editor.edit(source(), fg_mask(), pe, ne, num_steps=3, condition=cond, image_embeds=img)
    finally:
        handle.remove()
    assert out.shape == (1, 4, F, H, W) and torch.isfinite(out).all()
    x = calls[0]["hidden_states"]
    assert x.shape == (3, 12, F, H, W) and torch.equal(x[:, 4:], cond.expand(3, -1, -1, -1, -1))
    assert calls[0]["encoder_hidden_states_image"].shape == (3, 5, 16)


def test_wan22_ti2v_expands_timesteps_per_token():
    model = tiny_model("wan_ti2v")
    pe, ne = embeds()
    cond = torch.randn(1, 48, 1, H, W)
    calls, handle = record_inputs(model)
    try:
        out, _ = KVLockEditor(model, flow_sched(), backend="torch", progress=False).edit(
            source(48), fg_mask(), pe, ne, num_steps=3, condition=cond)
    finally:
        handle.remove()
    tokens = F * (H // 2) * (W // 2)
    t = calls[0]["timestep"]
    assert t.shape == (3, tokens)
    assert (t[:, : tokens // F] == 0).all() and (t[:, tokens // F:] > 0).all()  # first frame: the image, t = 0
    assert torch.equal(calls[0]["hidden_states"][:, :, :1], cond.expand(3, -1, -1, -1, -1))
    assert torch.equal(out[:, :, :1], cond)  # the output's first frame is the condition


def test_wan_vace_needs_its_control_input():
    model = tiny_model("wan_vace")
    pe, ne = embeds()
    editor = KVLockEditor(model, flow_sched(), backend="torch", progress=False)
    with pytest.raises(ValueError, match="WanVACE needs its control input"):
        editor.edit(source(), fg_mask(), pe, ne, num_steps=2)
    out, _ = editor.edit(source(), fg_mask(), pe, ne, num_steps=3,
                         transformer_kwargs={"control_hidden_states": torch.randn(1, 8, F, H, W)})
    assert torch.isfinite(out).all()


def test_hunyuan_video_edit_with_per_branch_inputs():
    model = tiny_model("hunyuan_video")
    pe, ne = embeds()
    editor = KVLockEditor(model, FlowMatchEulerDiscreteScheduler(shift=7.0), backend="torch", progress=False)
    with pytest.raises(ValueError, match="needs 'encoder_attention_mask' per branch"):
        editor.edit(source(), fg_mask(), pe, ne, num_steps=2)
    mask = torch.ones(1, 7)
    branch = dict(encoder_attention_mask=mask, pooled_projections=torch.randn(1, 8))
    out, trace = editor.edit(source(), fg_mask(), pe, ne, num_steps=3, prompt_kwargs=branch,
                             negative_prompt_kwargs=dict(branch, pooled_projections=torch.randn(1, 8)),
                             transformer_kwargs={"guidance": torch.tensor([3500.0])})
    assert torch.isfinite(out).all() and len(trace) == 3
    with pytest.raises(TypeError, match=r"got unexpected \['condition'\]"):
        editor.edit(source(), fg_mask(), pe, ne, num_steps=3, condition=torch.randn(1, 4, F, H, W),
                    prompt_kwargs=branch, negative_prompt_kwargs=branch)


@pytest.mark.parametrize("source_mode", ["branch", "inversion"])
def test_fused_kernel_edit_matches_the_dispatch_edit(source_mode):
    """attention='fused' (the blend inside kv_lock_attention, PyTorch path) edits as the
    epilogue lock + diffusers' dispatch does, with the in-batch source and the cache."""
    model = tiny_model("cogvideox")
    pe, ne = embeds()
    outs = []
    for attention in ("diffusers", "fused"):
        editor = KVLockEditor(model, ddim_sched(), source=source_mode, attention=attention, backend="torch",
                              progress=False)
        gen = torch.Generator().manual_seed(1)
        outs.append(editor.edit(source(), fg_mask(), pe, ne, num_steps=3, generator=gen)[0])
    torch.testing.assert_close(outs[1], outs[0], atol=1e-4, rtol=1e-4)


def test_compiled_transformer_edits_without_recompiling(monkeypatch):
    """A torch.compile'd transformer (fullgraph) in the editor: new lock weights and alpha every
    step, one graph, the eager edit's result."""
    monkeypatch.setattr(torch._dynamo.config, "error_on_recompile", True)
    torch._dynamo.reset()
    model = tiny_model("wan")
    pe, ne = embeds()
    outs = [KVLockEditor(m, flow_sched(), backend="torch", progress=False).edit(
        source(), fg_mask(), pe, ne, num_steps=3, generator=torch.Generator().manual_seed(1))[0]
        for m in (torch.compile(model, fullgraph=True, backend="eager"), model)]
    torch.testing.assert_close(outs[0], outs[1], atol=1e-5, rtol=1e-5)
    assert not is_kvlock_enabled(model)
    torch._dynamo.reset()


def test_bf16_model_keeps_fp32_latents():
    model = tiny_model("wan").to(torch.bfloat16)
    pe, ne = embeds()
    for source_mode in ("branch", "inversion"):
        editor = KVLockEditor(model, flow_sched(), source=source_mode, backend="torch", progress=False)
        out, trace = editor.edit(source(), fg_mask(), pe, ne, num_steps=3)
        assert out.dtype == torch.float32 and torch.isfinite(out).all() and len(trace) == 3


def test_soft_masks_stay_soft_lock_weights():
    model = tiny_model("wan")
    pe, ne = embeds()
    soft = torch.full((F, H, W), 0.25)
    calls, handle = record_inputs(model)
    try:
        KVLockEditor(model, flow_sched(), backend="torch", progress=False).edit(source(), soft, pe, ne, num_steps=3)
    finally:
        handle.remove()
    lock = calls[0]["plan"].lock  # alpha_pre = 1 on step 0: weight 1 * (1 - 0.25)
    torch.testing.assert_close(lock, torch.full_like(lock, 0.75))


def test_short_runs_scale_the_schedule():
    model = tiny_model("wan")
    pe, ne = embeds()
    editor = KVLockEditor(model, flow_sched(), backend="torch", progress=False)
    _, trace = editor.edit(source(), fg_mask(), pe, ne, num_steps=5)  # kappa 2, window 2: steps 3, 4 active
    assert [math.isnan(r["sigma2"]) for r in trace] == [True, True, True, False, False]
    mine = KVLockPlan.branch(torch.zeros(F * H * W // 4), 0.5, batch_size=3)
    enable_kvlock(model, mine, attention="fused")  # the caller's own install: put back after the edit
    with pytest.warns(UserWarning, match="needs at least 3 steps"):
        out, trace = editor.edit(source(), fg_mask(), pe, ne, num_steps=1)
    assert len(trace) == 1 and torch.isfinite(out).all()
    assert get_plan(model) is mine and model.blocks[0].attn1.processor._install.attention == "fused"
    disable_kvlock(model)


# ---------------------------------------------------------------------------------- bad input
def test_schedulers_that_do_not_fit_the_model_are_refused():
    model = tiny_model("wan")
    with pytest.raises(TypeError, match="noise_scheduler must be a flow-matching scheduler .* got EulerDiscrete"):
        KVLockEditor(model, EulerDiscreteScheduler())
    with pytest.raises(ValueError, match="use_flow_sigmas=True and prediction_type='flow_prediction'"):
        KVLockEditor(model, UniPCMultistepScheduler())
    KVLockEditor(model, UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True))
    with pytest.raises(TypeError, match="is a flow model and needs a flow-matching scheduler, got CogVideoXDDIM"):
        KVLockEditor(model, ddim_sched())
    with pytest.raises(TypeError, match="is a v_prediction model and needs a v-prediction DDIM scheduler"):
        KVLockEditor(tiny_model("cogvideox"), flow_sched())
    with pytest.raises(ValueError, match="prediction_type='epsilon'"):
        KVLockEditor(tiny_model("cogvideox"), CogVideoXDDIMScheduler())


def test_editor_constructor_bad_values():
    model = tiny_model("wan")
    with pytest.raises(ValueError, match="cache_capacity must be"):
        KVLockEditor(model, flow_sched(), source="inversion", cache_capacity=0)
    with pytest.raises(TypeError, match="KV-Lock supports"):
        KVLockEditor(torch.nn.Linear(2, 2), flow_sched())
    with pytest.raises(ValueError, match="needs boundary_ratio"):
        KVLockEditor(model, flow_sched(), transformer_2=tiny_model("wan", seed=3))
    with pytest.raises(ValueError, match="pass transformer_2"):
        KVLockEditor(model, flow_sched(), boundary_ratio=0.9)
    with pytest.raises(TypeError, match="transformer_2 must be the same kind of model"):
        KVLockEditor(model, flow_sched(), transformer_2=tiny_model("cogvideox"), boundary_ratio=0.9)
    with pytest.raises(ValueError, match="source must be one of"):
        KVLockEditor(model, flow_sched(), source="sideways")
    with pytest.raises(ValueError, match="backend must be one of"):
        KVLockEditor(model, flow_sched(), backend="cuda")
    with pytest.raises(ValueError, match="attention must be one of"):
        KVLockEditor(model, flow_sched(), attention="sdpa")
    with pytest.raises(TypeError, match="progress must be a bool"):
        KVLockEditor(model, flow_sched(), progress="yes")
    with pytest.raises(ValueError, match="the fused kernel takes no mask"):
        KVLockEditor(tiny_model("hunyuan_video"), flow_sched(), attention="fused")
    with pytest.raises(ValueError, match="use_dynamic_shifting=True needs a resolution-dependent mu"):
        KVLockEditor(model, FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True))


def test_edit_bad_inputs_fail_before_the_model_runs():
    model = tiny_model("wan")
    calls, handle = record_inputs(model)
    editor = KVLockEditor(model, flow_sched(), backend="torch", progress=False)
    pe, ne = embeds()
    src, fg = source(), fg_mask()
    try:
        with pytest.raises(TypeError, match="fg_mask must be a torch.Tensor .* torch.from_numpy"):
            editor.edit(src, np.ones((F, H, W), dtype=bool), pe, ne, num_steps=2)
        with pytest.raises(TypeError, match="prompt_embeds must be a torch.Tensor .* encode_prompt"):
            editor.edit(src, fg, "a red car", ne, num_steps=2)
        with pytest.raises(TypeError, match="negative_prompt_embeds must be a torch.Tensor"):
            editor.edit(src, fg, pe, "", num_steps=2)
        with pytest.raises(ValueError, match=r"one shape .* prompt_embeds \(1, 7, 32\), negative_prompt_embeds "
                                             r"\(1, 9, 32\)"):
            editor.edit(src, fg, pe, torch.randn(1, 9, 32), num_steps=2)
        with pytest.raises(ValueError, match=r"text width D = 32, got \(1, 7, 16\)"):
            editor.edit(src, fg, torch.randn(1, 7, 16), torch.randn(1, 7, 16), num_steps=2)
        with pytest.raises(ValueError, match=r"fg_mask must be the latent-resolution mask \(F, H, W\) = \(3, 8, 8\)"):
            editor.edit(src, torch.zeros(F, H, W + 2), pe, ne, num_steps=2)
        with pytest.raises(ValueError, match=r"source_latents must be \(1, C, F, H, W\)"):
            editor.edit(torch.randn(2, 4, F, H, W), fg, pe, ne, num_steps=2)
        with pytest.raises(ValueError, match="num_steps must be >= 1"):
            editor.edit(src, fg, pe, ne, num_steps=0)
        with pytest.raises(TypeError, match="num_steps must be an int"):
            editor.edit(src, fg, pe, ne, num_steps=2.5)
        with pytest.raises(ValueError, match="kv_lock was built for 5 steps"):
            KVLockEditor(model, flow_sched(), kv_lock=KVLockScheduler(5, kappa=2, window=2, device="cpu"),
                         progress=False).edit(src, fg, pe, ne, num_steps=2)
        with pytest.raises(ValueError, match=r"fg_mask values must be in \[0, 1\]"):
            editor.edit(src, torch.full((F, H, W), 2.0), pe, ne, num_steps=2)
        with pytest.raises(ValueError, match="condition is for image-to-video Wan models"):
            editor.edit(src, fg, pe, ne, num_steps=2, condition=torch.randn(1, 4, F, H, W))
        with pytest.raises(ValueError, match="source_latents contains NaN or inf"):
            editor.edit(torch.full_like(src, float("nan")), fg, pe, ne, num_steps=2)
        with pytest.raises(ValueError, match=r"source_latents \(F, H, W\) = \(3, 7, 8\) must be divisible .* "
                                             r"\(1, 2, 2\)"):
            editor.edit(torch.randn(1, 4, F, H - 1, W), torch.zeros(F, H - 1, W), pe, ne, num_steps=2)
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # a rejected edit leaves no KV-Lock behind
            assert not is_kvlock_enabled(model)
    finally:
        handle.remove()
    assert not calls
