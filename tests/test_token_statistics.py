"""Token statistics: the unigram baseline, entropies and the context decomposition on sources
whose answers are known."""

import math

import numpy as np
import pytest

from nativetok_jax.data import token_store
from nativetok_jax.evaluation.token_statistics import (
    context_decomposition, plug_in_entropy, position_code_counts, unigram_nll, unigram_token_nll)


def test_unigram_nll_is_add_one_smoothed_per_position():
    train = np.array([[0, 2], [0, 2], [1, 2]])
    held_out = np.array([[0, 2], [2, 1]])
    # Position 0: counts (2, 1, 0) + 1 = (3, 2, 1) of 6; position 1: (0, 0, 3) + 1 = (1, 1, 4) of 6.
    expected = -np.log(np.array([[3 / 6, 4 / 6], [1 / 6, 1 / 6]]))
    np.testing.assert_allclose(unigram_token_nll(train, held_out, 3), expected)
    np.testing.assert_array_equal(position_code_counts(train, 3), [[2, 1, 0], [0, 0, 3]])


def test_plug_in_entropy_of_known_frequencies():
    ids = np.array([[0, 5], [1, 5], [2, 5], [3, 5]])  # position 0 uniform over 4 codes, position 1 constant
    np.testing.assert_allclose(plug_in_entropy(ids, 8), [math.log(4), 0.0], atol=1e-12)


def test_independent_positions_give_no_context_gain():
    rng = np.random.default_rng(0)
    probabilities = rng.dirichlet(np.ones(8), size=4)  # each position its own code distribution
    sample = lambda n: np.stack([rng.choice(8, size=n, p=p) for p in probabilities], axis=1)
    train, held_out = sample(20_000), sample(4_000)
    # The ideal generator knows each position's distribution; the context holds nothing more.
    model_nll = -np.log(probabilities[np.arange(4), held_out])
    report = context_decomposition(train, held_out, model_nll, 8)
    entropy = -(probabilities * np.log(probabilities)).sum(axis=1)
    np.testing.assert_allclose(report["context_gain_by_position"], 0.0, atol=0.03)
    np.testing.assert_allclose(report["entropy_by_position"], entropy, atol=0.02)
    np.testing.assert_allclose(report["unigram_excess_by_position"], 0.0, atol=0.03)
    assert report["model_nll"] == pytest.approx(float(model_nll.mean()))


def test_a_copy_chain_read_by_a_perfect_model_gains_each_position_s_entropy():
    rng = np.random.default_rng(1)
    sample = lambda n: np.repeat(rng.integers(0, 16, size=(n, 1)), 6, axis=1)  # x_i = x_(i-1), x_0 uniform
    train, held_out = sample(20_000), sample(2_000)
    # A perfect generator: the first code costs log 16, every later one is certain.
    model_nll = np.zeros(held_out.shape)
    model_nll[:, 0] = math.log(16)
    report = context_decomposition(train, held_out, model_nll, 16)
    gain, entropy = np.array(report["context_gain_by_position"]), np.array(report["entropy_by_position"])
    np.testing.assert_allclose(entropy, math.log(16), atol=0.01)
    assert gain[0] == pytest.approx(0.0, abs=0.01)
    np.testing.assert_allclose(gain[1:], entropy[1:], atol=0.02)
    assert report["captured_information_by_position"] == report["context_gain_by_position"]
    assert report["context_gain"] == pytest.approx(5 / 6 * math.log(16), abs=0.02)


def test_unigram_nll_of_a_token_directory(tmp_path):
    train, held_out = np.array([[0, 2], [0, 2], [1, 2]]), np.array([[0, 2], [2, 1]])
    for split, ids in (("train", train), ("eval", held_out)):
        directory = tmp_path / split
        token_store.write_meta(directory, dict(num_examples=len(ids), shard_size=8, num_tokens=2,
                                               codebook_size=3, num_classes=1))
        token_store.write_shard(directory, 0, ids, np.zeros(len(ids)))
        token_store.mark_complete(directory)
    expected = -np.log([3 / 6, 4 / 6, 1 / 6, 1 / 6]).mean()
    assert unigram_nll(tmp_path) == pytest.approx(expected)


@pytest.mark.parametrize("held_out, model_nll, message", [
    (np.array([[0, 1, 2]]), np.zeros((1, 3)), "held_out_ids has 3 positions"),
    (np.array([[0, 9]]), np.zeros((1, 2)), r"held_out_ids must lie in \[0, 3\)"),
    (np.array([[0.0, 1.0]]), np.zeros((1, 2)), "integer codes"),
    (np.array([[0, 1]]), np.zeros((2, 2)), r"model_nll must be \[m, L\] = \[1, 2\]"),
    (np.array([[0, 1]]), np.array([[0.0, np.inf]]), "model_nll holds 1 non-finite"),
])
def test_bad_input_is_named(held_out, model_nll, message):
    with pytest.raises(ValueError, match=message):
        context_decomposition(np.array([[0, 1], [2, 2]]), held_out, model_nll, 3)
