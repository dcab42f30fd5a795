import math

import numpy as np
import pytest
import torch

from anelab import GuidanceConfig
from anelab.objectives import (
    excite_loss,
    gaussian_kernel,
    gaussian_target,
    layout_kl,
    max_attention,
    renormalise,
    smooth,
    token_columns,
    token_statistics,
)


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


@pytest.mark.parametrize("sigma", [0.05, 0.1])
def test_the_layout_target_is_centred_on_its_point_with_the_width_sigma(sigma):
    target = gaussian_target((0.5, 0.4), (64, 64), sigma).double()  # far from the borders: the grid barely truncates
    x = (torch.arange(64, dtype=torch.float64) + 0.5) / 64
    px, py = target.sum(0), target.sum(1)  # marginals over y and over x
    assert float((px * x).sum()) == pytest.approx(0.5, abs=1e-4) and float((py * x).sum()) == pytest.approx(
        0.4, abs=1e-4
    )
    assert float((px * (x - 0.5) ** 2).sum()) == pytest.approx(sigma**2, rel=0.01)  # σ in image widths, not σ²
    assert float((py * (x - 0.4) ** 2).sum()) == pytest.approx(sigma**2, rel=0.01)
    assert float(target.sum()) == pytest.approx(1.0, abs=1e-6)


def test_the_layout_kl_is_kl_of_the_attention_against_the_target():
    """KL(A ‖ D): a one-hot map A at cell j against a broad D gives −log D_j (3.6 here); the other direction,
    KL(D ‖ A), would weigh every empty cell of A by log(1/eps) (about 17 here)."""
    target = gaussian_target((0.5, 0.5), (4, 4), 0.3).double()
    one_hot = torch.zeros(4, 4, dtype=torch.float64)
    one_hot[0, 3] = 5.0  # any scale: the map is normalised over space first
    kl = layout_kl(one_hot[None, None], target[None], eps=1e-8)[0, 0]
    assert float(kl) == pytest.approx(-math.log(float(target[0, 3])), rel=1e-6)
    uniform = torch.full((4, 4), 1 / 16, dtype=torch.float64)
    expected = float((uniform * (uniform.log() - target.log())).sum())
    assert float(layout_kl(uniform[None, None], target[None])[0, 0]) == pytest.approx(expected, rel=1e-6)
    a = one_hot / one_hot.sum()
    reverse = float((target * ((target + 1e-8).log() - (a + 1e-8).log())).sum())
    assert reverse > 15 > 5 > float(kl)


def test_token_statistics_are_the_raw_maps_max_mean_and_centroid():
    maps = torch.zeros(1, 4, 4, 77, dtype=torch.float64)
    maps[0, :, :, 0] = 0.5  # <sot>
    maps[0, 1, 2, 2] = 0.05  # token 2: one cell, at x = 2.5/4, y = 1.5/4
    maps[0, :, :, 3] = 0.01  # token 3: flat, but for one cell
    maps[0, 3, 0, 3] = 0.4
    stats = token_statistics(maps, [2, 3], 5, GuidanceConfig())
    assert stats["raw_max"][0].tolist() == pytest.approx([0.05, 0.4])  # the raw probability, not the renormalised one
    assert stats["mass"][0].tolist() == pytest.approx([0.05 / 16, (15 * 0.01 + 0.4) / 16])
    assert stats["centroid_x"][0, 0] == pytest.approx(2.5 / 4) and stats["centroid_y"][0, 0] == pytest.approx(1.5 / 4)
    total = 15 * 0.01 + 0.4
    assert stats["centroid_y"][0, 1] == pytest.approx(
        ((0.01 * 4 * (0.5 + 1.5 + 2.5) + 0.01 * 3 * 3.5) + 0.4 * 3.5) / 4 / total
    )
    renormalised = max_attention(maps, [2, 3], 5, GuidanceConfig())
    torch.testing.assert_close(stats["max_attention"], renormalised)
    assert float(stats["max_attention"][0, 0]) > 0.2 > 0.1 > float(stats["raw_max"][0, 0])  # two statistics
