import numpy as np
import pytest

from anelab import AnelabError, GuidanceConfig
from anelab.config import parse_thresholds


def test_defaults_are_the_official_sd1_settings():
    c = GuidanceConfig()
    assert (c.attention_res, c.scale_factor, c.scale_range, c.max_iter_to_alter, c.max_refinement_steps) == (
        16,
        20.0,
        (1.0, 0.5),
        25,
        20,
    )
    assert c.thresholds == {0: 0.05, 10: 0.5, 20: 0.8}
    assert (c.smooth, c.kernel_size, c.sigma, c.sigma_convention, c.softmax_tokens) == (
        True,
        3,
        0.5,
        "legacy",
        "legacy",
    )


def test_sqrt_step_sizes_match_the_reference():
    alpha = GuidanceConfig().step_sizes(51)  # SD-1.4 PNDM, 50 steps = 51 loop iterations
    assert alpha[0] == pytest.approx(20.0)
    assert alpha[10] == pytest.approx(18.97, abs=0.005)
    assert alpha[20] == pytest.approx(17.89, abs=0.005)
    assert alpha[24] == pytest.approx(17.44, abs=0.005)
    assert alpha[50] == pytest.approx(14.14, abs=0.005)


def test_other_schedules():
    r = np.linspace(1.0, 0.5, 11)
    np.testing.assert_allclose(GuidanceConfig(step_schedule="linear").step_sizes(11), 20 * r)
    np.testing.assert_allclose(GuidanceConfig(step_schedule="square").step_sizes(11), 20 * r**2)
    np.testing.assert_allclose(
        GuidanceConfig(step_schedule="constant", scale_factor=5).step_sizes(11), np.full(11, 5.0)
    )
    np.testing.assert_allclose(
        GuidanceConfig(step_schedule=lambda r: 1 - r, scale_range=(0, 1)).step_sizes(3), [20, 10, 0]
    )


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"kernel_size": 4}, "kernel_size must be a positive odd int"),
        ({"kernel_size": 0}, "kernel_size must be a positive odd int"),
        ({"kernel_size": -3}, "kernel_size must be a positive odd int"),
        ({"sigma": 0}, "sigma must be a number > 0"),
        ({"sigma": -1.0}, "sigma must be a number > 0"),
        ({"scale_factor": -1}, "scale_factor must be a number >= 0"),
        ({"thresholds": {0: 1.5}}, r"thresholds must lie in \[0, 1\]"),
        ({"thresholds": {0: -0.1}}, r"thresholds must lie in \[0, 1\]"),
        ({"thresholds": {-1: 0.5}}, "threshold steps must be ints >= 0"),
        ({"thresholds": [0.5]}, "thresholds must be a dict"),
        ({"attention_res": 0}, "attention_res must be a positive int"),
        ({"step_schedule": "cubic"}, "step_schedule 'cubic' is unknown"),
        ({"scale_range": (1.0,)}, "scale_range must be two numbers"),
        ({"max_iter_to_alter": -2}, "max_iter_to_alter must be an int >= 0 or None"),
        ({"sigma_convention": "true"}, "sigma_convention must be one of"),
        ({"softmax_tokens": "all"}, "softmax_tokens must be one of"),
    ],
)
def test_bad_values_are_one_line_errors(kwargs, message):
    with pytest.raises(AnelabError, match=message) as info:
        GuidanceConfig(**kwargs)
    assert "\n" not in str(info.value)


def test_threshold_steps_beyond_the_schedule():
    with pytest.raises(AnelabError, match=r"threshold steps \[20\] are beyond the schedule: it has 11 loop iterations"):
        GuidanceConfig().check_schedule(11)


def test_parse_thresholds():
    assert parse_thresholds("0:0.05, 10:0.5,20:0.8") == {0: 0.05, 10: 0.5, 20: 0.8}
    assert parse_thresholds("") == {}
    with pytest.raises(AnelabError, match="thresholds must look like"):
        parse_thresholds("0=0.5")


def test_replace_validates_and_to_dict_is_plain():
    c = GuidanceConfig().replace(attention_res=32)
    assert c.attention_res == 32 and c.to_dict()["thresholds"] == {0: 0.05, 10: 0.5, 20: 0.8}
    with pytest.raises(AnelabError):
        c.replace(kernel_size=2)
