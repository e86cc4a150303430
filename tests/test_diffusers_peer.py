"""The pytest plugin that installs KV-Lock under diffusers' own test suites
(``pytest -p kvlock_kernels.integrations.diffusers.pytest_plugin``), run on a handful of
checks written the way diffusers' model tests are (ModelTesterMixin, AttentionTesterMixin,
TrainingTesterMixin): determinism, dict/tuple outputs, save/load, QKV fusion, training and
gradient checkpointing; and KV-Lock at alpha 0 equals stock bit for bit.  Offline: tiny
models built from configs, no hub downloads."""
import subprocess
import sys
import textwrap

import pytest
from helpers import subprocess_env

pytest.importorskip("diffusers")

PEER_TESTS = textwrap.dedent('''
    import copy
    import functools

    import pytest
    import torch

    from kvlock_kernels.diffusers import disable_kvlock, get_plan, is_kvlock_enabled, set_plan
    from kvlock_kernels.integrations.diffusers.pytest_plugin import plan_for_call
    from kvlock_kernels.integrations.diffusers.testing import tiny_inputs, tiny_model

    FAMILIES = ["wan", "wan_vace", "cogvideox", "hunyuan_video"]


    def forward(model, inputs, **kw):
        return model(**dict(inputs, **kw))


    @pytest.mark.parametrize("family", FAMILIES)
    def test_installed_in_lock_mode(family):
        model = tiny_model(family)
        assert is_kvlock_enabled(model)
        with torch.no_grad():
            forward(model, tiny_inputs(family, 2))
        plan = get_plan(model)
        assert plan.mode == "lock" and plan.batch_size == 2 and plan.lock.shape[1] > 1


    @pytest.mark.parametrize("family", FAMILIES)
    def test_determinism_and_outputs_equivalence(family):
        model = tiny_model(family)
        inputs = tiny_inputs(family, 2)
        with torch.no_grad():
            a = forward(model, inputs)[0]
            b = forward(model, inputs)[0]
            c = forward(model, inputs, return_dict=True).sample
        assert torch.equal(a, b) and torch.equal(a, c)


    @pytest.mark.parametrize("family", ["wan", "hunyuan_video"])
    def test_from_save_pretrained(family, tmp_path):
        model = tiny_model(family)
        inputs = tiny_inputs(family, 2)
        model.save_pretrained(tmp_path)
        loaded = type(model).from_pretrained(tmp_path).eval()
        assert is_kvlock_enabled(loaded)
        with torch.no_grad():
            torch.testing.assert_close(forward(loaded, inputs)[0], forward(model, inputs)[0], atol=5e-5, rtol=5e-5)
        twin = copy.deepcopy(model)
        with torch.no_grad():
            assert torch.equal(forward(twin, inputs)[0], forward(model, inputs)[0])


    @pytest.mark.parametrize("family", ["wan", "cogvideox"])
    def test_fuse_unfuse_qkv_projections(family):
        model = tiny_model(family)
        inputs = tiny_inputs(family, 2)
        with torch.no_grad():
            before = forward(model, inputs)[0]
            model.fuse_qkv_projections()
            fused = forward(model, inputs)[0]
            model.unfuse_qkv_projections()
            after = forward(model, inputs)[0]
        torch.testing.assert_close(fused, before, atol=1e-3, rtol=0)
        torch.testing.assert_close(after, before, atol=1e-3, rtol=0)


    @pytest.mark.parametrize("family", ["wan", "cogvideox", "hunyuan_video"])
    def test_training_and_gradient_checkpointing(family):
        torch.manual_seed(0)
        model = tiny_model(family).train()
        twin = copy.deepcopy(model)
        inputs = tiny_inputs(family, 2)
        out = forward(model, inputs)[0]
        out.square().mean().backward()
        twin.enable_gradient_checkpointing()
        out2 = forward(twin, inputs)[0]
        out2.square().mean().backward()
        torch.testing.assert_close(out2, out, atol=1e-5, rtol=1e-5)
        for (name, p), (_, p2) in zip(model.named_parameters(), twin.named_parameters()):
            if p.grad is not None:
                torch.testing.assert_close(p2.grad, p.grad, atol=5e-5, rtol=5e-5, msg=name)


    @pytest.mark.parametrize("family", FAMILIES)
    def test_alpha_zero_is_stock_and_alpha_one_locks(family):
        model = tiny_model(family)
        inputs = tiny_inputs(family, 2)
        with torch.no_grad():
            locked = forward(model, inputs)[0]  # the plugin's plan: alpha 1
            set_plan(model, functools.partial(plan_for_call, alpha=0.0))
            zero = forward(model, inputs)[0]
            disable_kvlock(model)
            stock = forward(model, inputs)[0]
        assert torch.equal(zero, stock)
        assert torch.equal(locked[0], stock[0])  # entry 0 is the source branch
        assert (locked[1] - stock[1]).abs().max() > 1e-4
''')


def test_plugin_under_model_test_style_checks(tmp_path):
    (tmp_path / "test_peer_style.py").write_text(PEER_TESTS)
    env = subprocess_env(interpret=True, KVLOCK_PYTEST_ALPHA="1.0", KVLOCK_PYTEST_MODE="lock")
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p",
                           "kvlock_kernels.integrations.diffusers.pytest_plugin", str(tmp_path)],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert "19 passed" in proc.stdout and "failed" not in proc.stdout, proc.stdout[-2000:]


def test_plugin_settings_are_checked(monkeypatch):
    from kvlock_kernels.integrations.diffusers.pytest_plugin import plugin_settings

    monkeypatch.setenv("KVLOCK_PYTEST_ALPHA", "1.5")
    with pytest.raises(ValueError, match="KVLOCK_PYTEST_ALPHA must be in"):
        plugin_settings()
    monkeypatch.setenv("KVLOCK_PYTEST_ALPHA", "0.5")
    monkeypatch.setenv("KVLOCK_PYTEST_MODE", "on")
    with pytest.raises(ValueError, match="KVLOCK_PYTEST_MODE must be"):
        plugin_settings()
