"""kvlock-edit end to end on tiny random-weight pipelines built offline in the diffusers folder
layout (VAE, UMT5 text encoder from a local config, a locally trained tokenizer, transformer(s),
scheduler): write a small mp4 and mask, run the command, read what it wrote.  Bad input gives
exit status 2 and a one-line message, never a traceback."""
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

pytest.importorskip("diffusers")  # the [diffusers] extra, brought by [test]
pytest.importorskip("transformers")
pytest.importorskip("tokenizers")
pytest.importorskip("imageio_ffmpeg")

from helpers import subprocess_env  # noqa: E402

from kvlock_kernels.edit import EditInputError, KVLockVideoEditor, UnsupportedModelError, read_video  # noqa: E402
from kvlock_kernels.edit.cli import main  # noqa: E402
from kvlock_kernels.edit.testing import (  # noqa: E402
    build_tiny_cogvideox,
    build_tiny_wan,
    synthetic_clip,
    write_clip,
)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# In-process runs take the PyTorch paths (conftest turns on the Triton interpreter, which is
# tested elsewhere); few steps, short text.
FAST = ["--steps", "4", "--backend", "torch", "--quiet", "--max-sequence-length", "16"]


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("kvlock_edit")


@pytest.fixture(scope="module")
def clip(root):
    """10 frames of 40x56 at 12 fps (trimmed to 9, cropped to 32x48 by the rule) and its mask."""
    video, mask = write_clip(str(root / "in.mp4"), str(root / "mask.mp4"), frames=10, height=40, width=56, fps=12)
    return {"video": str(root / "in.mp4"), "mask": str(root / "mask.mp4"), "frames": video, "fg": mask}


@pytest.fixture(scope="module")
def models(root):
    made = {}

    def get(kind):
        if kind == "cogvideox" and kind not in made:
            made[kind] = build_tiny_cogvideox(str(root / kind))
        if kind not in made:
            layout, sched = {"wan21": ("wan2.1", "unipc"), "euler": ("wan2.1", "euler"),
                             "wan22": ("wan2.2", "unipc"), "ti2v": ("wan2.2-ti2v", "unipc"),
                             "ddim": ("wan2.1", "ddim")}[kind]
            made[kind] = build_tiny_wan(str(root / kind), layout=layout, scheduler=sched)
        return made[kind]

    return get


def _run(capsys, *argv):
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    assert "Traceback" not in err
    return rc, out, err


def _report(path):
    with open(path) as f:
        return json.load(f)


def test_edit_end_to_end(models, clip, root, capsys):
    out = root / "wan21" / "edited.mp4"
    rc, stdout, err = _run(capsys, "--model", models("wan21"), "--video", clip["video"], "--mask", clip["mask"],
                           "--prompt", "a red ball", "--negative-prompt", "blurry", "--out", out, "--seed", "3", *FAST)
    assert rc == 0, err
    assert "kept frames 0-8 of 10" in err and "centre-cropped" in err  # the geometry rule says what it did
    edited = read_video(str(out))
    assert edited.frames.shape == (9, 32, 48, 3) and edited.fps == pytest.approx(12.0)
    compare = read_video(str(root / "wan21" / "edited_compare.mp4"))
    assert compare.frames.shape[0] == 9 and compare.frames.shape[2] > 3 * 48
    assert (root / "wan21" / "edited_schedule.png").stat().st_size > 5000
    rep = _report(root / "wan21" / "edited_report.json")
    for key in ("arguments", "model", "geometry", "mask", "schedule", "trace", "timings", "peak_memory",
                "fidelity", "output"):
        assert key in rep, key
    assert rep["arguments"]["prompt"] == "a red ball" and rep["arguments"]["steps"] == 4
    assert rep["output"] == {"frames": 9, "height": 32, "width": 48, "fps": 12.0}
    assert rep["model"]["scheduler"] == "UniPCMultistepScheduler"
    assert len(rep["trace"]) == 4
    for row in rep["trace"]:
        assert {"step", "sigma2", "alpha", "omega", "s_star", "timestep", "sigma"} <= set(row)
        assert 0.0 <= row["alpha"] <= 1.0 and row["omega"] >= 5.0
    assert rep["trace"][0]["sigma2"] is None  # undefined before the window fills (NaN -> null)
    assert rep["schedule"]["kappa"] == round(0.4 * 4) and rep["schedule"]["activates"]
    for phase in ("read", "load", "encode", "edit", "decode", "write", "total"):
        assert rep["timings"][phase] >= 0.0
    assert rep["peak_memory"]["host_max_rss_bytes"] > 0
    bg, fg = rep["fidelity"]["background"], rep["fidelity"]["foreground"]
    assert math.isfinite(bg["psnr"]) and 0 < bg["psnr"] < 100 and -1 <= bg["ssim"] <= 1
    assert fg["mean_abs_diff"] > 0 and 0 < rep["mask"]["foreground_fraction"] < 1
    assert rep["fidelity"]["background_psnr"] == bg["psnr"] and rep["fidelity"]["foreground_psnr"] == fg["psnr"]


def test_console_script_subprocess_folder_and_image_mask(models, root):
    """The installed command (or python -m), a folder of frames at --fps 8 and one mask image for
    all frames; --frames 7 (-> 5 frames) and --height 32 (the width follows the aspect ratio)."""
    from PIL import Image

    video, mask = synthetic_clip(8, 36, 52, seed=1)
    folder = root / "frames"
    folder.mkdir()
    for i, f in enumerate(video):
        Image.fromarray(f).save(folder / f"{i}.png")
    Image.fromarray((mask[0] * 255).astype(np.uint8)).save(root / "mask0.png")
    exe = os.path.join(os.path.dirname(sys.executable), "kvlock-edit")
    cmd = [exe] if os.path.exists(exe) else [sys.executable, "-m", "kvlock_kernels.edit"]
    out = root / "sub" / "edited.mp4"
    env = subprocess_env()  # CPU torch path: fast
    proc = subprocess.run(cmd + ["--model", models("euler"), "--video", str(folder), "--fps", "8", "--mask",
                                 str(root / "mask0.png"), "--prompt", "a cat", "--out", str(out), "--frames", "7",
                                 "--height", "32", "--steps", "3", "--quiet", "--max-sequence-length", "16",
                                 "--report", str(root / "sub" / "r.json")],
                          capture_output=True, text=True, timeout=300, env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    edited = read_video(str(out))
    assert edited.frames.shape == (5, 32, 32, 3) and edited.fps == pytest.approx(8.0)  # 52 * 32/36 = 46 -> 32
    rep = _report(root / "sub" / "r.json")
    assert rep["model"]["scheduler"] == "FlowMatchEulerDiscreteScheduler" and len(rep["trace"]) == 3
    assert "one mask image used for all 5 frames" in " ".join(rep["notes"])
    assert math.isfinite(rep["fidelity"]["background"]["psnr"])


def test_wan22_two_experts(models, clip, root, capsys):
    """Wan2.2 A14B layout: transformer (high noise) + transformer_2 (low noise) + boundary_ratio."""
    out = root / "wan22" / "edited.mp4"
    rc, _, err = _run(capsys, "--model", models("wan22"), "--video", clip["video"], "--mask", clip["mask"],
                      "--prompt", "a red ball", "--out", out, *FAST)
    assert rc == 0, err
    rep = _report(root / "wan22" / "edited_report.json")
    assert rep["model"]["transformer_2"] == "WanTransformer3DModel" and rep["model"]["boundary_ratio"] == 0.875
    experts = [row["expert"] for row in rep["trace"]]
    assert experts[0] == "transformer" and experts[-1] == "transformer_2"
    assert read_video(str(out)).frames.shape == (9, 32, 48, 3)


def test_wan22_ti2v_layout(models, root, capsys):
    """Wan2.2 TI2V-5B layout: 48-channel latents, a 16x VAE with patchify (sizes multiples of 32),
    per-token timesteps (expand_timesteps)."""
    write_clip(str(root / "in64.mp4"), str(root / "mask64.mp4"), frames=9, height=70, width=64, fps=16)
    out = root / "ti2v" / "edited.mp4"
    rc, _, err = _run(capsys, "--model", models("ti2v"), "--video", root / "in64.mp4", "--mask", root / "mask64.mp4",
                      "--prompt", "a red ball", "--out", out, *FAST)
    assert rc == 0, err
    assert "multiples of 32x32" in err
    assert read_video(str(out)).frames.shape == (9, 64, 64, 3)
    rep = _report(root / "ti2v" / "edited_report.json")
    assert rep["model"]["expand_timesteps"] and rep["model"]["latent_channels"] == 48


def test_cogvideox_text_to_video(models, clip, root, capsys):
    """CogVideoX: VAE scaling_factor, the pipeline's rotary embeddings, its v-prediction DDIM scheduler."""
    out = root / "cogvideox" / "edited.mp4"
    rc, _, err = _run(capsys, "--model", models("cogvideox"), "--video", clip["video"], "--mask", clip["mask"],
                      "--prompt", "a red ball", "--out", out, "--steps", "4", "--backend", "torch", "--quiet")
    assert rc == 0, err
    assert read_video(str(out)).frames.shape == (9, 32, 48, 3)
    rep = _report(root / "cogvideox" / "edited_report.json")
    assert rep["model"]["family"] == "cogvideox" and rep["model"]["prediction"] == "v_prediction"
    assert rep["model"]["vae_normalisation"] == "scaling_factor" and len(rep["trace"]) == 4
    assert math.isfinite(rep["fidelity"]["background_psnr"])
    rc, _, err = _run(capsys, "--model", models("cogvideox"), "--video", clip["video"], "--mask", clip["mask"],
                      "--prompt", "x", "--out", out, "--max-sequence-length", "20", *FAST[:4])
    assert rc == 2 and "takes exactly 16 text tokens" in err


def test_refuses_image_conditioned_checkpoints(models):
    """A Wan transformer with conditioning channels (I2V: 16 + 20) is refused before any work."""
    from diffusers import DiffusionPipeline, WanTransformer3DModel

    pipe = DiffusionPipeline.from_pretrained(models("wan21"), local_files_only=True)
    pipe.transformer = WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12,
                                             in_channels=36, out_channels=16, text_dim=32, freq_dim=32, ffn_dim=32,
                                             num_layers=1)
    with pytest.raises(UnsupportedModelError, match="36 input channels"):
        KVLockVideoEditor.from_pipe(pipe)


def test_inversion_source(models, clip, root, capsys):
    out = root / "inv" / "edited.mp4"
    rc, _, err = _run(capsys, "--model", models("wan21"), "--video", clip["video"], "--box", "16,12,40,30",
                      "--prompt", "a blue car", "--out", out, "--source", "inversion", "--dilate", "2", *FAST)
    assert rc == 0, err
    rep = _report(root / "inv" / "edited_report.json")
    assert rep["model"]["source"] == "inversion" and rep["arguments"]["box"] == "16,12,40,30"
    assert math.isfinite(rep["fidelity"]["background"]["psnr"])


def test_python_api(models, clip):
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(models("wan21"), local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    editor = KVLockVideoEditor.from_pipe(pipe, backend="torch", progress=False)
    video, mask = clip["frames"][:9, 4:36, 4:52], clip["fg"][:9, 4:36, 4:52]  # already 9 x 32 x 48
    result = editor.edit(video, mask, "a red ball", num_steps=3, seed=0, max_sequence_length=16)
    assert result.frames.shape == (9, 32, 48, 3) and result.frames.dtype == np.float32
    assert 0.0 <= result.frames.min() and result.frames.max() <= 1.0
    assert result.latents.shape == (1, 16, 3, 4, 6) and tuple(result.latent_mask.shape) == (3, 4, 6)
    assert len(result.trace) == 3 and set(result.timings) >= {"prepare", "encode", "edit", "decode"}
    assert math.isfinite(result.fidelity["background"]["psnr"])
    frames = editor(torch.from_numpy(video), torch.from_numpy(mask), "a red ball", num_inference_steps=3, seed=0,
                    max_sequence_length=16, output_type="uint8")
    assert np.array_equal(frames, result.edited)  # same seed, same edit; tensors accepted
    with pytest.raises(EditInputError, match="prompt"):
        editor.edit(video, mask, "", num_steps=3)
    with pytest.raises(TypeError, match="kv_lock must be a KVLockScheduler"):
        editor.edit(video, mask, "a red ball", num_steps=3, kv_lock=object())
    _, msgs = editor.make_schedule(3, window=100)  # a given window is named as given, with the steps it needs
    assert "window of 100 (--window) steps" in msgs[0] and "activates from 101 steps" in msgs[0]


def test_refuses_a_scheduler_that_is_not_flow_matching(models, clip, root, capsys):
    rc, _, err = _run(capsys, "--model", models("ddim"), "--video", clip["video"], "--mask", clip["mask"],
                      "--prompt", "x", "--out", root / "ddim.mp4", *FAST)
    assert rc == 2 and "DDIMScheduler" in err and "not flow matching" in err
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(models("ddim"), local_files_only=True)
    with pytest.raises(UnsupportedModelError) as e:
        KVLockVideoEditor.from_pipe(pipe)
    assert isinstance(e.value, TypeError) and isinstance(e.value, ValueError)


# ---------------------------------------------------------------------------------------
# bad input: exit status 2, one clear line
# ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def bad_files(root, clip):
    junk = root / "junk.mp4"
    junk.write_text("not a video")
    write_clip(str(root / "v5.mp4"), str(root / "mask5.mp4"), frames=5, height=40, width=56)
    from PIL import Image

    Image.fromarray(np.zeros((40, 40), np.uint8)).save(root / "square.png")
    nomodel = root / "not_a_pipeline"
    nomodel.mkdir()
    (nomodel / "config.json").write_text("{}")
    other = root / "sd"
    other.mkdir()
    (other / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline",
                                                        "unet": ["diffusers", "UNet2DConditionModel"],
                                                        "vae": ["diffusers", "AutoencoderKL"]}))
    # config files only, no weights: refused from what the folder says, before anything is loaded
    wan_index = {"_class_name": "WanPipeline", "transformer": ["diffusers", "WanTransformer3DModel"],
                 "vae": ["diffusers", "AutoencoderKLWan"], "scheduler": ["diffusers", "DDIMScheduler"]}
    folders = {"i2v_class": dict(wan_index, _class_name="WanImageToVideoPipeline"),
               "i2v_channels": wan_index, "ddim_config": wan_index}
    for name, index in folders.items():
        (root / name / "transformer").mkdir(parents=True)
        (root / name / "vae").mkdir()
        (root / name / "scheduler").mkdir()
        (root / name / "model_index.json").write_text(json.dumps(index))
        (root / name / "transformer" / "config.json").write_text(json.dumps(
            {"in_channels": 36 if name == "i2v_channels" else 16, "patch_size": [1, 2, 2]}))
        (root / name / "vae" / "config.json").write_text(json.dumps({"z_dim": 16}))
        sched = {"prediction_type": "epsilon"} if name == "ddim_config" else {
            "prediction_type": "flow_prediction", "use_flow_sigmas": True}
        (root / name / "scheduler" / "scheduler_config.json").write_text(json.dumps(sched))
    return {"junk": junk, "mask5": root / "mask5.mp4", "square": root / "square.png", "nomodel": nomodel,
            "other": other, "video": clip["video"], **{name: root / name for name in folders}}


BAD = {
    "missing video": (dict(video="missing.mp4"), "no such file"),
    "unreadable video": (dict(video="{junk}"), "could not read video"),
    "missing mask": (dict(mask="missing_mask.mp4"), "no such file"),
    "mask frames": (dict(mask="{mask5}"), "the mask has 5 frames but the edit uses 9"),
    "mask size": (dict(mask="{square}"), "aspect ratio"),
    "not a pipeline": (dict(model="{nomodel}"), "model_index.json"),
    "image-to-video pipeline": (dict(model="{i2v_class}"), "WanImageToVideoPipeline: an image-conditioned"),
    "conditioning channels": (dict(model="{i2v_channels}"), "takes 36 input channels"),
    "scheduler config": (dict(model="{ddim_config}"), "DDIMScheduler (prediction_type='epsilon'"),
    "out is the video": (dict(out="{video}"), "which is an input"),
    "unsupported pipeline": (dict(model="{other}"), "not a supported pipeline"),
    "no such model": (dict(model="./nowhere/at/all"), "no such folder"),
    "steps 0": (dict(extra=["--steps", "0"]), "positive integer"),
    "bad box": (dict(mask=None, extra=["--box", "5,5,2"]), "--box"),
    "bad out": (dict(out="edited.txt"), "--out must be a video file"),
    "bad dtype": (dict(extra=["--dtype", "int8"]), "--dtype"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_exits_2(case, models, clip, bad_files, root, capsys):
    change, expect = BAD[case]
    args = {"model": models("wan21"), "video": clip["video"], "mask": clip["mask"], "out": str(root / "bad.mp4")}
    args.update({k: v for k, v in change.items() if k != "extra"})
    argv = ["--prompt", "x", "--quiet"]
    for key in ("model", "video", "mask", "out"):
        if args[key] is not None:
            value = str(args[key]).format(**bad_files)
            argv += [f"--{key}", str(root / value) if key == "out" and not os.path.isabs(value) else value]
    rc, _, err = _run(capsys, *argv, *change.get("extra", []))
    assert rc == 2, err
    assert expect in err, err
    assert not (root / "bad.mp4").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_cuda_device_without_cuda(models, clip, root, capsys):
    rc, _, err = _run(capsys, "--model", models("wan21"), "--video", clip["video"], "--mask", clip["mask"],
                      "--prompt", "x", "--out", root / "c.mp4", "--device", "cuda")
    assert rc == 2 and "CUDA is not available" in err


def test_missing_required_arguments(capsys):
    rc, _, err = _run(capsys, "--model", "x", "--video", "y")
    assert rc == 2 and "required" in err


# ---------------------------------------------------------------------------------------
# warnings: the edit runs and says what KV-Lock does
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["empty", "full"])
def test_empty_and_all_foreground_masks(kind, models, clip, root, capsys):
    from PIL import Image

    value = 0 if kind == "empty" else 255
    Image.fromarray(np.full((40, 56), value, np.uint8)).save(root / f"{kind}.png")
    out = root / kind / "edited.mp4"
    rc, _, err = _run(capsys, "--model", models("wan21"), "--video", clip["video"], "--mask", root / f"{kind}.png",
                      "--prompt", "x", "--out", out, *FAST)
    assert rc == 0, err
    rep = _report(root / kind / "edited_report.json")
    assert read_video(str(out)).frames.shape == (9, 32, 48, 3)
    if kind == "empty":
        assert "no foreground pixel" in err and "alpha = alpha_pre" in err
        assert rep["mask"]["empty"] and rep["schedule"]["held_for_empty_mask"]
        assert all(row["alpha"] == 1.0 for row in rep["trace"])  # held at full lock
        assert rep["fidelity"]["foreground"]["psnr"] is None
        assert math.isfinite(rep["fidelity"]["background"]["psnr"])
    else:
        assert "covers every pixel" in err and "no token is locked" in err
        assert rep["mask"]["all_foreground"] and rep["fidelity"]["background"]["psnr"] is None
    assert any("pixel" in w for w in rep["warnings"])


def test_too_few_steps_warns_how_the_schedule_scales(models, clip, root, capsys):
    out = root / "steps2" / "edited.mp4"
    rc, _, err = _run(capsys, "--model", models("wan21"), "--video", clip["video"], "--mask", clip["mask"],
                      "--prompt", "x", "--out", out, "--steps", "2", "--backend", "torch", "--quiet",
                      "--max-sequence-length", "16")
    assert rc == 0, err
    assert "--steps 2 is below what KV-Lock's schedule needs" in err
    assert "round(0.4 * steps)" in err and "max(2, round(0.2 * steps))" in err and "from 3 steps" in err
    rep = _report(root / "steps2" / "edited_report.json")
    assert not rep["schedule"]["activates"] and all(row["alpha"] == 1.0 for row in rep["trace"])


def test_no_download_for_local_folders(models, monkeypatch):
    """A local folder is loaded with local_files_only=True (nothing is downloaded)."""
    import diffusers

    from kvlock_kernels.edit.cli import load_pipeline

    seen = {}
    real = diffusers.DiffusionPipeline.from_pretrained

    def spy(path, **kw):
        seen.update(kw)
        return real(path, **kw)

    monkeypatch.setattr(diffusers.DiffusionPipeline, "from_pretrained", spy)
    load_pipeline(models("wan21"), dtype="float32", vae_dtype="float32", device=torch.device("cpu"), quiet=True)
    assert seen["local_files_only"] is True


def test_missing_extra_is_a_clear_error(monkeypatch, capsys, tmp_path):
    """Without the [diffusers] extra, kvlock-edit says which modules are missing and how to
    install them (exit 2), instead of a ModuleNotFoundError from deep inside an import."""
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name in ("numpy", "imageio") else
                        real(name, *a))
    rc, _, err = _run(capsys, "--model", tmp_path, "--video", tmp_path / "v.mp4", "--box", "0,0,4,4",
                      "--prompt", "x", "--out", tmp_path / "o.mp4")
    assert rc == 2
    assert "missing: numpy, imageio" in err and "pip install 'kvlock-kernels[diffusers]'" in err


def test_editor_settings_refused_as_usage_errors(models, clip):
    """A setting KVLockEditor refuses (here progress that is not a bool) is a usage error
    naming the setting, not an 'unsupported model'."""
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(models("wan21"), local_files_only=True)
    editor = KVLockVideoEditor.from_pipe(pipe, progress="yes")
    with pytest.raises(EditInputError, match="progress") as info:
        editor(clip["video"], clip["mask"], "a red ball", num_inference_steps=3)
    assert not isinstance(info.value, UnsupportedModelError)
