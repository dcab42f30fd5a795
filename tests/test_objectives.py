import numpy as np
import pytest
import torch

from anelab import GuidanceConfig
from anelab.objectives import excite_loss, gaussian_kernel, max_attention, renormalise, smooth, token_columns


def test_legacy_gaussian_matches_the_official_weights():
    k = gaussian_kernel(3, 0.5, "legacy")
    np.testing.assert_allclose(k.sum(0).numpy(), [0.2119, 0.5761, 0.2119], atol=1e-4)  # reference §1.4
    expected = [[0.0449, 0.1221, 0.0449], [0.1221, 0.3319, 0.1221], [0.0449, 0.1221, 0.0449]]
    np.testing.assert_allclose(k.numpy(), expected, atol=1e-4)
    assert k.dtype == torch.float32 and abs(float(k.sum()) - 1) < 1e-6


def test_standard_sigma_is_a_true_gaussian():
    np.testing.assert_allclose(gaussian_kernel(3, 0.5, "standard").sum(0).numpy(), [0.1065, 0.7870, 0.1065], atol=1e-4)


@pytest.mark.parametrize("k", [1, 3, 5, 7, 9])
def test_every_odd_kernel_keeps_the_map_size_and_mass_of_a_constant(k):
    maps = torch.full((2, 3, 16, 16), 0.25)
    out = smooth(maps, k, 1.0)
    assert out.shape == maps.shape
    torch.testing.assert_close(out, maps)


def test_smoothing_a_delta_spreads_it_by_the_kernel():
    maps = torch.zeros(1, 8, 8)
    maps[0, 4, 4] = 1
    out = smooth(maps, 3, 0.5)
    torch.testing.assert_close(out[0, 3:6, 3:6], gaussian_kernel(3, 0.5))


def test_kernel_too_large_for_the_map_is_an_error():
    with pytest.raises(ValueError, match="too large for 4x4"):
        smooth(torch.zeros(1, 4, 4), 9, 0.5)


def test_renormalisation_drops_sot_and_the_last_column_and_picks_shifted_tokens():
    maps = torch.rand(1, 2, 2, 77)
    cols = token_columns("legacy", eot_index=6)
    assert (cols.start, cols.stop) == (1, 76)
    out = renormalise(maps, [2, 5], cols, 100.0)  # [B, T, h, w]
    expected = torch.softmax(maps[..., 1:76] * 100, dim=-1)[..., [1, 4]].permute(0, 3, 1, 2)
    torch.testing.assert_close(out, expected)
    prompt_only = token_columns("prompt", eot_index=6)
    assert (prompt_only.start, prompt_only.stop) == (1, 6)


def test_loss_is_the_most_neglected_token_clipped_at_zero():
    m = torch.tensor([[0.3, 0.9], [1.2, 1.0], [0.7, 0.2]])
    torch.testing.assert_close(excite_loss(m), torch.tensor([0.7, 0.0, 0.8]))


def test_max_attention_without_smoothing_is_the_raw_max_of_the_renormalised_map():
    maps = torch.rand(2, 4, 4, 77)
    config = GuidanceConfig(smooth=False)
    expected = renormalise(maps, [2, 3], token_columns("legacy", 4), 100.0).flatten(2).amax(-1)
    torch.testing.assert_close(max_attention(maps, [2, 3], 4, config), expected)
