"""The paired bootstrap interval: exact on small cases, ~95 % coverage on synthetic paired data,
tighter with more pairs; and the plot of contrasts with their intervals."""

import numpy as np
import pytest

from nativetok_jax.evaluation.paired_bootstrap import paired_bootstrap_interval


def test_two_pairs_give_the_exact_percentile_interval():
    # Differences (0, 1): a resample's mean is 0, 0.5 or 1 with probabilities 1/4, 1/2, 1/4, so
    # the 2.5 % and 97.5 % quantiles are exactly 0 and 1.
    result = paired_bootstrap_interval(np.array([3.0, 5.0]), np.array([3.0, 4.0]), num_resamples=4000)
    assert result == dict(mean_difference=0.5, low=0.0, high=1.0, standard_error=pytest.approx(0.3535, abs=0.02),
                          num_pairs=2)


def test_a_constant_difference_has_a_zero_width_interval_and_trailing_axes_are_averaged():
    rng = np.random.default_rng(1)
    b = rng.normal(size=(16, 4, 8))  # [crops, seeds, tokens]
    result = paired_bootstrap_interval(b - 0.25, b, num_resamples=500)
    assert result["mean_difference"] == pytest.approx(-0.25)
    assert result["low"] == pytest.approx(-0.25) and result["high"] == pytest.approx(-0.25)
    assert result["num_pairs"] == 16


def test_same_seed_same_interval():
    rng = np.random.default_rng(2)
    a, b = rng.normal(size=50), rng.normal(size=50)
    assert paired_bootstrap_interval(a, b, seed=7) == paired_bootstrap_interval(a, b, seed=7)
    assert paired_bootstrap_interval(a, b, seed=7) != paired_bootstrap_interval(a, b, seed=8)


def test_covers_a_known_difference_about_95_percent_of_the_time():
    rng = np.random.default_rng(0)
    difference, covered = 0.3, 0
    repeats = 200
    for seed in range(repeats):
        difficulty = rng.normal(4.0, 2.0, size=60)  # shared by both systems on each crop
        a = difficulty + difference + rng.normal(0.0, 0.5, size=60)
        b = difficulty + rng.normal(0.0, 0.5, size=60)
        result = paired_bootstrap_interval(a, b, num_resamples=1000, seed=seed)
        covered += result["low"] <= difference <= result["high"]
    # Binomial(200, 0.95) lies within [181, 199] with probability > 0.999; the percentile
    # interval runs slightly narrow for n = 60, so the band's centre sits just under 190.
    assert 181 <= covered <= 199


def test_pairing_cancels_the_crop_difficulty_and_the_interval_shrinks_like_one_over_root_n():
    rng = np.random.default_rng(3)

    def width(n: int) -> tuple[float, dict]:
        difficulty = rng.normal(4.0, 3.0, size=n)  # far larger than the paired noise
        result = paired_bootstrap_interval(difficulty - 0.2 + rng.normal(0, 0.1, n), difficulty, num_resamples=2000)
        return result["high"] - result["low"], result

    small, result = width(100)
    assert result["low"] <= -0.2 <= result["high"]
    assert small < 0.06  # 2 x 1.96 x 0.1 / sqrt(100) = 0.039; unpaired it would be ~1.7
    large, _ = width(1600)
    assert large / small == pytest.approx(0.25, abs=0.06)  # sqrt(100 / 1600)


@pytest.mark.parametrize("a, b, kwargs, message", [
    (np.zeros(3), np.zeros(4), {}, "pair item for item"),
    (np.zeros(1), np.zeros(1), {}, "at least 2 pairs"),
    (np.float64(1.0), np.zeros(2), {}, "a must be"),
    (np.array([0.0, np.nan]), np.zeros(2), {}, "a holds 1 non-finite"),
    (np.zeros(3), np.zeros(3), dict(confidence=1.0), "confidence"),
    (np.zeros(3), np.zeros(3), dict(num_resamples=0), "num_resamples"),
])
def test_bad_input_is_named(a, b, kwargs, message):
    with pytest.raises(ValueError, match=message):
        paired_bootstrap_interval(a, b, **kwargs)


def test_contrasts_plot_shows_each_interval_around_a_zero_line(tmp_path):
    from nativetok_jax.evaluation.plots import plot_contrasts

    contrasts = {"native - order_free": dict(mean_difference=-1.1, low=-1.3, high=-0.9),
                 "native - native_permuted": dict(mean_difference=0.05, low=-0.02, high=0.12)}
    figure = plot_contrasts(contrasts, tmp_path / "contrasts.png")
    assert (tmp_path / "contrasts.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    axes = figure.axes[0]
    rows = sorted(axes.get_yticklabels(), key=lambda tick: -tick.get_position()[1])
    assert [tick.get_text() for tick in rows] == list(contrasts)  # the first contrast on top
    zero_lines = [line for line in axes.lines if list(line.get_xdata()) == [0, 0]]
    assert len(zero_lines) == 1
    texts = sorted(text.get_text() for text in axes.texts)
    assert texts == ["+0.050 [-0.020, +0.120]", "-1.100 [-1.300, -0.900]"]
    with pytest.raises(ValueError, match="contrast 'x' lacks low, high"):
        plot_contrasts({"x": dict(mean_difference=0.0)}, tmp_path / "bad.png")
