import pytest
import torch

from kvlock_kernels.masks import latent_frames, latent_mask_to_tokens, latent_size, lock_weights, pixel_mask_to_latent


def test_single_pixel_in_frame_5_marks_latent_frame_2_and_one_token():
    mask = torch.zeros(9, 32, 48, dtype=torch.bool)  # 9 = 1 + 4 * 2 pixel frames
    mask[5, 17, 30] = True
    latent = pixel_mask_to_latent(mask)
    assert latent.shape == (3, 4, 6) and latent.dtype == torch.bool
    assert latent.nonzero().tolist() == [[2, 2, 3]]  # frame (5-1)//4+1, row 17//8, col 30//8
    tokens = latent_mask_to_tokens(latent)
    assert tokens.shape == (3 * 2 * 3,)
    assert tokens.nonzero().flatten().tolist() == [2 * 6 + 1 * 3 + 1]  # (t, h, w) = (2, 1, 1)


@pytest.mark.parametrize("pixel_frame, latent_frame", [(0, 0), (1, 1), (4, 1), (5, 2), (8, 2)])
def test_causal_temporal_grouping(pixel_frame, latent_frame):
    mask = torch.zeros(9, 8, 8)
    mask[pixel_frame] = 0.5
    latent = pixel_mask_to_latent(mask)
    assert latent.dtype == torch.float32
    assert latent[:, 0, 0].tolist() == [0.5 if t == latent_frame else 0.0 for t in range(3)]


def test_batched_uint8_and_conservative_union():
    mask = torch.zeros(2, 5, 16, 16, dtype=torch.uint8)
    mask[0, 1, 0, 7] = 1   # touches latent (1, 0, 0)
    mask[1, 4, 15, 8] = 1  # touches latent (1, 1, 1)
    latent = pixel_mask_to_latent(mask)
    assert latent.dtype == torch.uint8 and latent.shape == (2, 2, 2, 2)
    assert latent[0].nonzero().tolist() == [[1, 0, 0]] and latent[1].nonzero().tolist() == [[1, 1, 1]]
    tokens = latent_mask_to_tokens(latent)
    assert tokens.shape == (2, 2) and tokens.tolist() == [[0, 1], [0, 1]]


# Frame counts of diffusers' AutoencoderKLWan (checked against a tiny random VAE: its
# _encode runs 1 + (F - 1) // 4 chunks; frames after the last full chunk are never read).
VAE_FRAMES = {1: 1, 2: 1, 4: 1, 5: 2, 6: 2, 8: 2, 9: 3, 17: 5, 18: 5, 20: 5, 21: 6, 81: 21, 83: 21}


@pytest.mark.parametrize("frames", sorted(VAE_FRAMES))
@pytest.mark.parametrize("pad", [None, True, False])
def test_frame_count_is_the_vaes(frames, pad):
    """Issue 11: pad=True gave 5 latent frames where the VAE gives 4.  Every mode now
    gives the VAE's count, and trailing frames that do not fill a chunk are dropped."""
    mask = torch.zeros(frames, 16, 16, dtype=torch.bool)
    kwargs = {} if pad is None else dict(pad=pad)
    latent = pixel_mask_to_latent(mask, **kwargs)
    assert latent.shape == (VAE_FRAMES[frames], 2, 2)
    assert latent_frames(frames) == VAE_FRAMES[frames]
    assert latent_size(frames, 16, 16) == tuple(latent.shape)


def test_trailing_frames_are_dropped_as_the_vae_drops_them():
    mask = torch.zeros(8, 16, 16, dtype=torch.bool)  # VAE: 2 latent frames from frames 0..4
    mask[6, 0, 0] = True                             # never read by the VAE
    assert not pixel_mask_to_latent(mask).any()
    mask[4, 9, 9] = True
    assert pixel_mask_to_latent(mask).nonzero().tolist() == [[1, 1, 1]]
    with pytest.raises(ValueError, match=r"F must be 1 \+ 4k"):
        pixel_mask_to_latent(mask, strict=True)


def test_spatial_size_floors_like_the_vae_and_keeps_the_remainder():
    """The VAE's stride-2 convolutions floor (H = 23 -> 2 latent rows); rows 16..22 are
    read by the last latent row, so an edit there marks it."""
    mask = torch.zeros(1, 23, 20, dtype=torch.bool)
    assert pixel_mask_to_latent(mask).shape == (1, 2, 2)
    mask[0, 22, 19] = True
    assert pixel_mask_to_latent(mask).nonzero().tolist() == [[0, 1, 1]]
    soft = torch.zeros(1, 23, 20)
    soft[0, 17, 3] = 0.25
    assert pixel_mask_to_latent(soft)[0, :, 0].tolist() == [0.0, 0.25]
    assert latent_size(1, 23, 20) == (1, 2, 2)
    with pytest.raises(ValueError, match="H a multiple of 8"):
        pixel_mask_to_latent(mask, strict=True)
    with pytest.raises(ValueError, match="cannot encode"):
        pixel_mask_to_latent(torch.zeros(5, 7, 16))
    with pytest.raises(ValueError, match="height must be >= the VAE's spatial stride 8"):
        latent_size(5, 7, 16)


def test_uint8_0_255_masks_are_binary():
    """Issue 12 item 10: a uint8 0/255 mask gave lock weights of -254."""
    tokens = torch.tensor([[0, 255, 1, 0]], dtype=torch.uint8)
    w = lock_weights(tokens, 0.8)
    torch.testing.assert_close(w, torch.tensor([[0.8, 0.0, 0.0, 0.8]]))
    pix = torch.zeros(5, 16, 16, dtype=torch.uint8)
    pix[2, 3, 3] = 255
    lat = pixel_mask_to_latent(pix)
    assert lat.dtype == torch.uint8 and lat.max() == 1 and lat.sum() == 1
    tok = latent_mask_to_tokens(lat)
    assert tok.dtype == torch.uint8 and tok.tolist() == [0, 1]  # (t, h, w) = (1, 0, 0)


def test_float_masks_must_lie_in_unit_interval():
    for bad in (torch.full((5, 8, 8), 255.0), torch.full((5, 8, 8), -0.1), torch.full((5, 8, 8), float("nan"))):
        with pytest.raises(ValueError, match=r"mask values must be in \[0, 1\]"):
            pixel_mask_to_latent(bad)
        with pytest.raises(ValueError, match=r"mask values must be in \[0, 1\]"):
            latent_mask_to_tokens(bad[:4])
        with pytest.raises(ValueError, match=r"token_fg_mask values must be in \[0, 1\]"):
            lock_weights(bad[0, 0], 0.5)
    # Opting out skips the host read (the values are then the caller's promise).
    assert pixel_mask_to_latent(torch.full((5, 8, 8), 2.0), check_values=False).shape == (2, 1, 1)


def test_soft_masks_keep_their_values():
    """Soft values survive pooling (max of the covered pixels) and give partial locks."""
    pix = torch.zeros(5, 16, 16, dtype=torch.float64)
    pix[1, 0, 0], pix[3, 1, 1] = 0.3, 0.6   # same latent cell: the max wins
    pix[4, 8, 8] = 0.2
    lat = pixel_mask_to_latent(pix)
    assert lat.dtype == torch.float64
    assert lat[1].tolist() == [[0.6, 0.0], [0.0, 0.2]]
    tok = latent_mask_to_tokens(lat.float(), patch=(1, 1, 1))
    torch.testing.assert_close(lock_weights(tok, 0.5), 0.5 * (1 - tok))


def test_rgb_masks_are_refused_clearly():
    """Issue 12 item 10: an RGB mask with pad=True returned shape (17, 17, 8, 1)."""
    rgb = torch.zeros(17, 64, 64, 3, dtype=torch.uint8)
    for kwargs in ({}, dict(pad=True)):
        with pytest.raises(ValueError, match="channel dimension"):
            pixel_mask_to_latent(rgb, **kwargs)
    with pytest.raises(ValueError, match="channel dimension"):
        pixel_mask_to_latent(torch.zeros(17, 64, 64, 4))
    with pytest.raises(ValueError, match="channel dimension"):
        pixel_mask_to_latent(torch.zeros(1, 17, 64, 64, 3))
    with pytest.raises(ValueError, match="channel dimension"):  # one RGB image (H, W, 3)
        pixel_mask_to_latent(torch.zeros(64, 48, 3, dtype=torch.uint8))
    # The documented reduction works.
    assert pixel_mask_to_latent(rgb.amax(-1)).shape == (5, 8, 8)


def test_lock_weights():
    m = torch.tensor([[True, False, False], [False, False, True]])
    w = lock_weights(m, 0.75)
    assert w.dtype == torch.float32 and w.tolist() == [[0.0, 0.75, 0.75], [0.75, 0.75, 0.0]]
    alpha = torch.tensor(0.5)
    assert lock_weights(m[0].float(), alpha).tolist() == [0.0, 0.5, 0.5]
    assert lock_weights(m, torch.tensor(0.25, dtype=torch.float64)).dtype == torch.float32
    with pytest.raises(ValueError, match=r"alpha must be in \[0, 1\]"):
        lock_weights(m, 1.5)
    with pytest.raises(ValueError, match="0-dim"):
        lock_weights(m, torch.tensor([0.5]))
    with pytest.raises(TypeError, match="token_fg_mask must have dtype in"):
        lock_weights(m.long(), 0.5)


def test_tensor_alpha_is_checked_like_a_float():
    """Issue 12 item 10: a 0-dim tensor alpha of 2.0 was accepted while 2.0 was refused."""
    m = torch.tensor([False, True, False])
    for bad in (2.0, -0.5, float("nan")):
        with pytest.raises(ValueError, match=r"alpha"):
            lock_weights(m, bad)
        with pytest.raises(ValueError, match=r"alpha values must be in \[0, 1\]"):
            lock_weights(m, torch.tensor(bad))
    # Where the check does not run (check_inputs=False, torch.compile), a tensor alpha is
    # clamped to [0, 1] on the device, never used out of range.
    assert lock_weights(m, torch.tensor(2.0), check_inputs=False).tolist() == [1.0, 0.0, 1.0]
    fn = torch.compile(lambda m, a: lock_weights(m, a), fullgraph=True, backend="aot_eager")
    assert fn(m, torch.tensor(2.0)).tolist() == [1.0, 0.0, 1.0]
    assert fn(m, torch.tensor(0.5)).tolist() == [0.5, 0.0, 0.5]


def test_frames_must_fit_only_when_strict():
    mask = torch.zeros(6, 16, 16, dtype=torch.bool)
    mask[4, 0, 0] = True
    with pytest.raises(ValueError, match=r"F must be 1 \+ 4k"):
        pixel_mask_to_latent(mask, strict=True)
    latent = pixel_mask_to_latent(mask, pad=True)  # 6 frames: the VAE makes 2 latent frames
    assert latent.shape == (2, 2, 2) and latent.nonzero().tolist() == [[1, 0, 0]]
    with pytest.raises(ValueError, match="H a multiple of 8"):
        pixel_mask_to_latent(torch.zeros(5, 12, 16), strict=True)
    assert pixel_mask_to_latent(torch.ones(5, 12, 16)).shape == (2, 1, 2)


def test_token_mask_requires_divisible_latents():
    with pytest.raises(ValueError, match="not divisible by patch"):
        latent_mask_to_tokens(torch.zeros(3, 5, 6))


@pytest.mark.parametrize("call, exc, msg", [
    (lambda: pixel_mask_to_latent(torch.zeros(8, 8)), ValueError, r"\(F, H, W\) or \(B, F, H, W\)"),
    (lambda: pixel_mask_to_latent(torch.zeros(5, 8, 8, dtype=torch.int64)), TypeError, "mask must have dtype in"),
    (lambda: pixel_mask_to_latent([[0, 1]]), TypeError, "mask must be a torch.Tensor"),
    (lambda: pixel_mask_to_latent(torch.zeros(5, 8, 8).numpy()), TypeError, "mask must be a torch.Tensor"),
    (lambda: pixel_mask_to_latent(torch.zeros(0, 8, 8)), ValueError, "at least one frame"),
    (lambda: pixel_mask_to_latent(torch.zeros(5, 8, 8), vae_stride=(4, 8)), ValueError,
     "vae_stride must be 3 positive ints"),
    (lambda: pixel_mask_to_latent(torch.zeros(5, 8, 8), vae_stride=(4, 0, 8)), ValueError,
     "vae_stride must be 3 positive ints"),
    (lambda: pixel_mask_to_latent(torch.zeros(5, 8, 8), vae_stride=8), TypeError, "vae_stride must be a tuple"),
    (lambda: pixel_mask_to_latent(torch.zeros(5, 8, 8), pad="yes"), TypeError, "pad must be a bool"),
    (lambda: pixel_mask_to_latent(torch.zeros(5, 8, 8), strict=1), TypeError, "strict must be a bool"),
    (lambda: latent_mask_to_tokens(torch.zeros(2, 4)), ValueError, r"\(F, H, W\) or \(B, F, H, W\)"),
    (lambda: latent_mask_to_tokens(torch.zeros(2, 4, 4), patch=2), TypeError, "patch must be a tuple"),
    (lambda: lock_weights(torch.zeros(2, 3, 4), 0.5), ValueError, r"token_fg_mask must be 1-D or 2-D"),
    (lambda: lock_weights(torch.zeros(4), "0.5"), TypeError, "alpha must be a Python number or a 0-dim tensor"),
    (lambda: lock_weights(torch.zeros(4), True), TypeError, "alpha must be a Python number or a 0-dim tensor"),
    (lambda: lock_weights(torch.zeros(4), torch.tensor(1)), TypeError, "alpha must be a Python number"),
    (lambda: lock_weights(torch.zeros(4), torch.tensor(0.5, device="meta")), ValueError,
     "alpha must be on token_fg_mask's device"),
    (lambda: latent_frames(0), ValueError, "num_frames must be >= 1"),
    (lambda: latent_frames(5.0), TypeError, "num_frames must be an int"),
])
def test_bad_mask_inputs(call, exc, msg):
    with pytest.raises(exc, match=msg):
        call()
