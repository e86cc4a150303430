"""kvlock-edit without a model: video files, masks from files, the geometry rule, the metrics."""
import math
import os

import numpy as np
import pytest
import torch

pytest.importorskip("imageio_ffmpeg")  # brought by the [diffusers] extra (and so by [test])

from kvlock_kernels.edit import (  # noqa: E402
    EditInputError,
    ModelConstraints,
    binarize_mask,
    box_mask,
    dilate_mask,
    masked_psnr,
    masked_ssim,
    plan_fit,
    prepare_inputs,
    read_mask,
    read_video,
    write_video,
)
from kvlock_kernels.edit.masks_io import fit_mask_to_video, parse_box  # noqa: E402
from kvlock_kernels.edit.metrics import fidelity, ssim_map  # noqa: E402
from kvlock_kernels.edit.testing import synthetic_clip, write_clip  # noqa: E402


# ---------------------------------------------------------------------------------------
# video files
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("fps", [12.0, 30000 / 1001])
def test_mp4_round_trip_keeps_frames_size_and_fps(tmp_path, fps):
    video, _ = synthetic_clip(9, 40, 56)
    path = write_video(str(tmp_path / "v.mp4"), video, fps)
    got = read_video(path)
    assert got.frames.shape == (9, 40, 56, 3) and got.frames.dtype == np.uint8
    assert got.fps == pytest.approx(fps, rel=1e-3)
    # H.264 4:2:0 at crf 18: luma is nearly exact, the subsampled chroma of this saturated clip is not
    psnr = masked_psnr(torch.from_numpy(got.frames).permute(0, 3, 1, 2) / 255.0,
                       torch.from_numpy(video).permute(0, 3, 1, 2) / 255.0)
    assert 20 < psnr < 100
    gray = np.repeat(video.mean(-1, keepdims=True).astype(np.uint8), 3, axis=-1)
    back = read_video(write_video(str(tmp_path / "g.mp4"), gray, fps)).frames
    assert np.abs(back.astype(int) - gray).mean() < 2
    assert read_video(path, max_frames=5).frames.shape[0] == 5


def test_odd_sizes_gif_and_folder(tmp_path):
    video, _ = synthetic_clip(5, 21, 33)
    got = read_video(write_video(str(tmp_path / "odd.mp4"), video, 8))
    assert got.frames.shape[1:3] == (22, 34)  # padded by one edge pixel for yuv420p
    g = read_video(write_video(str(tmp_path / "v.gif"), video, 10))
    assert g.frames.shape == (5, 21, 33, 3) and g.fps == pytest.approx(10)
    from PIL import Image

    folder = tmp_path / "frames"
    folder.mkdir()
    for i in (0, 1, 2, 10, 11):  # natural order: frame_2 before frame_10
        Image.fromarray(np.full((8, 8, 3), i, np.uint8)).save(folder / f"frame_{i}.png")
    f = read_video(str(folder), fps=24)
    assert [int(x[0, 0, 0]) for x in f.frames] == [0, 1, 2, 10, 11] and f.fps == 24
    assert read_video(str(folder)).fps == 16.0  # folders have no frame rate: Wan's 16


def test_bad_video_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        read_video(str(tmp_path / "missing.mp4"))
    (tmp_path / "junk.mp4").write_text("not a video")
    with pytest.raises(EditInputError, match="could not read video"):
        read_video(str(tmp_path / "junk.mp4"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(EditInputError, match="no image files"):
        read_video(str(tmp_path / "empty"))


# ---------------------------------------------------------------------------------------
# masks
# ---------------------------------------------------------------------------------------
def test_threshold_is_half_the_value_range():
    u8 = np.array([0, 100, 127, 128, 200, 255], np.uint8)
    assert binarize_mask(u8).tolist() == [False, False, False, True, True, True]
    f = np.array([0.0, 0.49, 0.5, 0.51, 1.0], np.float32)
    assert binarize_mask(f).tolist() == [False, False, True, True, True]
    u16 = np.array([0, 32767, 32768, 65535], np.uint16)
    assert binarize_mask(u16).tolist() == [False, False, True, True]
    notes = []
    assert binarize_mask(np.array([0, 1, 1], np.uint8), notes=notes).tolist() == [False, True, True]  # 0/1 labels
    assert "label map" in notes[0]
    with pytest.raises(EditInputError, match=r"\[0, 1\]"):
        binarize_mask(np.array([0.0, 2.0]))
    with pytest.raises(EditInputError, match="NaN"):
        binarize_mask(np.array([0.0, np.nan]))


def test_mask_from_mp4_survives_codec_noise(tmp_path):
    """A black/white mask written as H.264 reads back exactly (noise stays far from half range)."""
    _, mask = write_clip(str(tmp_path / "v.mp4"), str(tmp_path / "m.mp4"), frames=9, height=40, width=56)
    got = read_mask(str(tmp_path / "m.mp4"))
    assert got.dtype == torch.bool and tuple(got.shape) == (9, 40, 56)
    assert torch.equal(got, torch.from_numpy(mask))


def test_mask_images_colour_alpha_palette(tmp_path):
    from PIL import Image

    m = np.zeros((16, 24), bool)
    m[4:10, 6:18] = True
    rgb = np.zeros((16, 24, 3), np.uint8)
    rgb[m] = (200, 0, 0)  # a red mask: the maximum over channels counts
    Image.fromarray(rgb).save(tmp_path / "red.png")
    assert torch.equal(read_mask(str(tmp_path / "red.png"))[0], torch.from_numpy(m))
    rgba = np.zeros((16, 24, 4), np.uint8)
    rgba[..., 3] = m * 255  # black everywhere, the alpha carries the mask
    Image.fromarray(rgba, "RGBA").save(tmp_path / "alpha.png")
    assert torch.equal(read_mask(str(tmp_path / "alpha.png"))[0], torch.from_numpy(m))
    pal = Image.fromarray(m.astype(np.uint8) * 2, "P")  # DAVIS-style: palette index 2
    pal.putpalette([0, 0, 0, 128, 0, 0, 0, 128, 0] + [0] * 759)
    pal.save(tmp_path / "pal.png")
    assert torch.equal(read_mask(str(tmp_path / "pal.png"))[0], torch.from_numpy(m))
    np.save(tmp_path / "soft.npy", m.astype(np.float32) * 0.8)
    assert torch.equal(read_mask(str(tmp_path / "soft.npy"))[0], torch.from_numpy(m))


def test_box_and_dilation():
    assert parse_box("2,3,10,12") == (2, 3, 10, 12)
    assert parse_box("0.25,0.5,0.75,1.0") == (0.25, 0.5, 0.75, 1.0)
    m = box_mask((2, 3, 10, 12), 2, 16, 16)
    assert m.shape == (2, 16, 16) and int(m[0].sum()) == 8 * 9 and bool(m[1, 3, 2]) and not bool(m[1, 2, 2])
    frac = box_mask(parse_box("0.5,0.5,1.0,1.0"), 1, 16, 20)
    assert int(frac.sum()) == 8 * 10
    for bad in ("1,2,3", "5,5,2,9", "a,b,c,d", "0.5,0.5,1.5,1.0"):
        with pytest.raises(EditInputError):
            parse_box(bad)
    with pytest.raises(EditInputError, match="outside"):
        box_mask((100, 100, 120, 120), 1, 16, 16)
    d = dilate_mask(box_mask((5, 5, 6, 6), 1, 12, 12), 2)
    assert int(d.sum()) == 25 and bool(d[0, 3, 3]) and not bool(d[0, 2, 2])
    # a box only in the border the geometry rule crops away (40x56 -> 34x48 -> rows 1-32): empty, and it says why
    video, _ = synthetic_clip(9, 40, 56)
    _, mask, _, _, notes = prepare_inputs(video, None, ModelConstraints(), box="0,0,56,1")
    assert not mask.any() and any("cut away" in n for n in notes)


def test_mask_matching_to_the_video():
    one = torch.zeros(1, 10, 14, dtype=torch.bool)
    notes = []
    assert fit_mask_to_video(one, 9, 10, 14, notes=notes).shape == (9, 10, 14) and "all 9 frames" in notes[0]
    half = torch.ones(5, 20, 28, dtype=torch.bool)  # same aspect ratio, twice the size: resized
    assert fit_mask_to_video(half, 5, 10, 14).all()
    with pytest.raises(EditInputError, match="5 frames but the edit uses 9"):
        fit_mask_to_video(torch.zeros(5, 10, 14, dtype=torch.bool), 9, 10, 14)
    with pytest.raises(EditInputError, match="aspect ratio"):
        fit_mask_to_video(torch.zeros(9, 10, 10, dtype=torch.bool), 9, 10, 14)
    # an RGB array of another size than the video is one colour image, not 20 frames of 28x3
    video, _ = synthetic_clip(9, 40, 56)
    rgb = np.zeros((20, 28, 3), np.uint8)
    rgb[5:15, 7:21, 0] = 255  # red box, a quarter of the image
    _, mask, _, _, notes = prepare_inputs(video, rgb, ModelConstraints())
    assert mask.shape == (9, 32, 48) and mask.any() and not mask.all()
    assert any("mask resized from 20x28" in n for n in notes)


# ---------------------------------------------------------------------------------------
# geometry: one rule for video and mask
# ---------------------------------------------------------------------------------------
def test_plan_trims_to_4k_plus_1_and_multiples_of_16():
    c = ModelConstraints()
    p = plan_fit(10, 40, 56, c)
    assert (p.frames, p.height, p.width) == (9, 32, 48)
    assert "kept frames 0-8 of 10" in p.message and "multiples of 16" in p.message
    assert plan_fit(9, 32, 48, c).message.endswith("unchanged")
    p = plan_fit(81, 720, 1280, c, height=480)  # width follows the aspect ratio: 853 -> 848
    assert (p.height, p.width) == (480, 848)
    p = plan_fit(20, 100, 100, c, frames=7)
    assert p.frames == 5
    assert plan_fit(3, 100, 100, c).frames == 1
    wan22_5b = ModelConstraints(multiple_h=32, multiple_w=32, vae_stride=(4, 16, 16))
    p = plan_fit(9, 100, 70, wan22_5b)
    assert (p.height, p.width) == (96, 64)
    with pytest.raises(EditInputError):
        plan_fit(9, 40, 56, c, frames=0)
    cog15 = ModelConstraints(latent_frame_multiple=2, patch=(2, 2, 2))  # CogVideoX 1.5: patch_size_t = 2
    assert [plan_fit(n, 32, 32, cog15).frames for n in (5, 9, 12, 13)] == [5, 5, 5, 13]
    with pytest.raises(EditInputError, match="at least 5 frames"):
        plan_fit(4, 32, 32, cog15)


def test_video_and_mask_are_cropped_identically():
    """A mask painted on the video's own pixels stays on them through scale + crop."""
    video, mask = synthetic_clip(10, 45, 70)
    source, m, plan, fps, notes = prepare_inputs(video, mask, ModelConstraints(), fps=10)
    assert source.shape == (9, 32, 64, 3) and tuple(m.shape) == (9, 32, 64) and notes
    marked = np.repeat((mask * 255).astype(np.uint8)[..., None], 3, axis=-1)  # the mask as the video itself
    fitted, _, _, _, _ = prepare_inputs(marked, mask, ModelConstraints(), fps=10)
    bright = fitted[..., 0] >= 128
    assert (bright & ~m.numpy()).sum() == 0  # every bright pixel is inside the fitted mask
    assert bright.sum() > 0.6 * m.numpy().sum()  # and the mask is not much larger


def test_vae_grouping_matches_the_mask_mapping():
    """The pixel -> latent mask mapping follows the VAE: 1 + (F - 1) // 4 latent frames, the
    first frame alone, then groups of 4 (checked against AutoencoderKLWan itself)."""
    pytest.importorskip("diffusers")
    from diffusers import AutoencoderKLWan

    from kvlock_kernels.masks import pixel_mask_to_latent

    vae = AutoencoderKLWan(base_dim=3, z_dim=4, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                           temperal_downsample=[False, True, True], latents_mean=[0.0] * 4, latents_std=[1.0] * 4)
    for frames in (1, 5, 8, 9):
        with torch.no_grad():
            z = vae.encode(torch.zeros(1, 3, frames, 16, 16)).latent_dist.mode()
        m = torch.zeros(frames, 16, 16, dtype=torch.bool)
        m[frames - 1] = True
        lat = pixel_mask_to_latent(m, vae_stride=(4, 8, 8))
        assert lat.shape == z.shape[2:], (frames, lat.shape, z.shape)
    m = torch.zeros(9, 16, 16, dtype=torch.bool)
    m[4] = True  # pixel frame 4 belongs to latent frame 1 (frames 1..4)
    assert pixel_mask_to_latent(m).any(dim=(1, 2)).tolist() == [False, True, False]


# ---------------------------------------------------------------------------------------
# metrics
# ---------------------------------------------------------------------------------------
def test_psnr_known_values_and_regions():
    a = torch.full((2, 3, 8, 8), 0.5)
    b = a.clone()
    fg = torch.zeros(2, 8, 8, dtype=torch.bool)
    fg[:, :4] = True
    b[:, :, :4] += 0.1  # only the foreground changes
    assert masked_psnr(a, b, ~fg) == 100.0  # identical background: the cap
    assert masked_psnr(a, b, fg) == pytest.approx(20.0, abs=1e-4)  # 10 log10(1 / 0.01)
    assert masked_psnr(a, b) == pytest.approx(10 * math.log10(1 / 0.005), abs=1e-4)
    assert masked_psnr(a, b, torch.zeros_like(fg)) is None
    out = fidelity((a.permute(0, 2, 3, 1) * 255).round().byte(), (b.permute(0, 2, 3, 1) * 255).round().byte(), fg)
    assert out["background"]["psnr"] == 100.0 and out["foreground"]["psnr"] < 21
    assert out["background"]["fraction"] == pytest.approx(0.5)


def test_ssim_matches_a_direct_computation():
    scipy_ndimage = pytest.importorskip("scipy.ndimage")
    g = torch.Generator().manual_seed(0)
    a = torch.rand(1, 3, 24, 20, generator=g)
    b = (a + 0.2 * torch.randn(1, 3, 24, 20, generator=g)).clamp(0, 1)
    got = ssim_map(a, b)[0].numpy()

    def blur(x):  # Gaussian sigma 1.5, 11 taps, whole-sample mirror padding (torch's "reflect")
        return scipy_ndimage.gaussian_filter(x, 1.5, mode="mirror", truncate=5 / 1.5)

    maps = []
    for c in range(3):
        x, y = a[0, c].double().numpy(), b[0, c].double().numpy()
        mx, my = blur(x), blur(y)
        sxx, syy, sxy = blur(x * x) - mx ** 2, blur(y * y) - my ** 2, blur(x * y) - mx * my
        c1, c2 = 0.01 ** 2, 0.03 ** 2
        maps.append(((2 * mx * my + c1) * (2 * sxy + c2)) / ((mx ** 2 + my ** 2 + c1) * (sxx + syy + c2)))
    np.testing.assert_allclose(got, np.mean(maps, axis=0), atol=2e-4)
    assert masked_ssim(a, a) == pytest.approx(1.0, abs=1e-5)
    assert masked_ssim(a, b) < 0.9


def test_missing_mask_file_is_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError, match="mask"):
        read_mask(str(tmp_path / "nope.png"))
    assert not os.path.exists(tmp_path / "nope.png")
