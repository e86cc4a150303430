import pytest
import torch

from kvlock_kernels.masks import latent_mask_to_tokens, lock_weights, pixel_mask_to_latent


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


def test_frames_must_fit_causal_grouping_unless_pad():
    mask = torch.zeros(6, 16, 16, dtype=torch.bool)
    mask[5, 0, 0] = True
    with pytest.raises(ValueError, match=r"F must be 1 \+ 4k"):
        pixel_mask_to_latent(mask)
    latent = pixel_mask_to_latent(mask, pad=True)  # 6 -> 9 frames with unedited padding
    assert latent.shape == (3, 2, 2) and latent.nonzero().tolist() == [[2, 0, 0]]
    with pytest.raises(ValueError, match="H a multiple of 8"):
        pixel_mask_to_latent(torch.zeros(5, 12, 16))
    assert pixel_mask_to_latent(torch.ones(5, 12, 16), pad=True).shape == (2, 2, 2)


def test_token_mask_requires_divisible_latents():
    with pytest.raises(ValueError, match="not divisible by patch"):
        latent_mask_to_tokens(torch.zeros(3, 5, 6))


def test_lock_weights():
    m = torch.tensor([[True, False, False], [False, False, True]])
    w = lock_weights(m, 0.75)
    assert w.dtype == torch.float32 and w.tolist() == [[0.0, 0.75, 0.75], [0.75, 0.75, 0.0]]
    alpha = torch.tensor(0.5)
    assert lock_weights(m[0].float(), alpha).tolist() == [0.0, 0.5, 0.5]
    with pytest.raises(ValueError, match=r"alpha must be in \[0, 1\]"):
        lock_weights(m, 1.5)
    with pytest.raises(ValueError, match="0-dim"):
        lock_weights(m, torch.tensor([0.5]))
    with pytest.raises(TypeError, match="bool, uint8 or float"):
        lock_weights(m.long(), 0.5)


def test_bad_mask_inputs():
    with pytest.raises(ValueError, match=r"\(F, H, W\) or \(B, F, H, W\)"):
        pixel_mask_to_latent(torch.zeros(8, 8))
    with pytest.raises(TypeError, match="bool, uint8 or float"):
        pixel_mask_to_latent(torch.zeros(5, 8, 8, dtype=torch.int64))
    with pytest.raises(ValueError, match="vae_stride must be 3 positive ints"):
        pixel_mask_to_latent(torch.zeros(5, 8, 8), vae_stride=(4, 8))
