"""Token statistics: the unigram baseline, entropies and the context decomposition (AR and
MaskGIT) on sources whose answers are known; the per-token held-out NLLs of both generators
(the AR one's mean is the trainer's); the NLL-by-position plot and the Markdown table."""

import math

import numpy as np
import pytest

from nativetok_jax.data import token_store
from nativetok_jax.evaluation.token_statistics import (
    context_decomposition, masked_context_decomposition, plug_in_entropy, position_code_counts, unigram_nll,
    unigram_token_nll)


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


def test_a_perfect_masked_model_of_a_copy_chain_gains_everything_once_one_code_is_visible():
    rng = np.random.default_rng(2)
    sample = lambda n: np.repeat(rng.integers(0, 16, size=(n, 1)), 8, axis=1)  # every code equals the first
    train, held_out = sample(20_000), sample(1_000)
    # Rate 1 hides all 8 codes, rate 0.5 a random half of them.
    masks = np.ones((1_000, 2, 8), bool)
    masks[:, 1] = rng.permuted(np.repeat([[True, False]], 4, axis=1).repeat(1_000, 0), axis=1)
    # The perfect generator: log 16 when nothing is visible, certain once any code is.
    masked_nll = np.array([[math.log(16), 0.0]] * 1_000)
    report = masked_context_decomposition(train, held_out, masks, masked_nll, 16, mask_rates=(1.0, 0.5))
    assert report["mask_rates"] == [1.0, 0.5]
    np.testing.assert_allclose(report["unigram_nll_by_rate"], math.log(16), atol=0.01)
    np.testing.assert_allclose(report["context_gain_by_rate"], [0.0, math.log(16)], atol=0.01)
    assert report["model_nll"] == pytest.approx(math.log(16) / 2)
    assert masked_context_decomposition(train, held_out, masks, masked_nll, 16)["mask_rates"] == [1.0, 0.5]
    with pytest.raises(ValueError, match=r"masked_nll must be \[m, R\] = \[1000, 2\]"):
        masked_context_decomposition(train, held_out, masks, masked_nll[:, :1], 16)


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


# Per-token NLLs of trained generators (one tiny model of each kind, shared by the tests below).

VOCAB, LENGTH, CLASSES = 16, 8, 2


@pytest.fixture(scope="module")
def held_out():
    rng = np.random.default_rng(4)
    ids = rng.integers(0, VOCAB, size=(12, LENGTH)).astype(np.int32)
    return ids, rng.integers(0, CLASSES, size=12).astype(np.int32)


def tiny_generator(kind: str):
    """A trained-generator stand-in: a fresh tiny network, with a tokenizer reduced to what
    TrainedGenerator reads (its mesh, vocabulary and length)."""
    import types

    from flax import nnx

    from nativetok_jax import sharding
    from nativetok_jax.config import generator_config
    from nativetok_jax.generation.pretrained import TrainedGenerator
    from nativetok_jax.models.generators.build import build_generator

    config = generator_config()
    config.generator.update(kind=kind, width=32, depth=1, num_heads=2, mlp_ratio=2.0)
    network = build_generator(config.generator, vocab_size=VOCAB, num_tokens=LENGTH, num_classes=CLASSES,
                              rngs=nnx.Rngs(0))
    tokenizer = types.SimpleNamespace(mesh=sharding.make_mesh(config.mesh), codebook_size=VOCAB, num_tokens=LENGTH)
    params = sharding.params_of(network)
    if kind == "ar":  # LlamaGen's zero head predicts uniformly: start from a random one instead
        params["head"] = np.random.default_rng(0).normal(0.0, 1.0, params["head"].shape).astype(np.float32)
    return network, TrainedGenerator(config, params, tokenizer)


@pytest.fixture(scope="module")
def gpt():
    return tiny_generator("ar")


@pytest.fixture(scope="module")
def maskgit():
    return tiny_generator("maskgit")


def test_next_token_nll_is_what_the_generator_trainer_reports(gpt, held_out):
    import ml_collections

    from nativetok_jax import sharding
    from nativetok_jax.evaluation.token_likelihood import trained_generator_nll
    from nativetok_jax.generation.pretrained import TrainedGenerator
    from nativetok_jax.training.generator_trainer import HeldOutLikelihood

    _, generator = gpt
    ids, labels = held_out

    class Store:  # the part of a TokenSource the trainer's evaluation reads
        def arrays(self):
            return ids, labels

    trainer = HeldOutLikelihood(generator.graphdef, ml_collections.ConfigDict(dict(kind="ar")), Store(),
                                generator.tokenizer.mesh, sharding.rules_of(generator.config))(generator.params)
    nll = trained_generator_nll(generator, ids, labels, batch_size=8)  # 12 crops: a padded second batch
    assert nll.shape == (12, LENGTH) and nll.dtype == np.float32
    assert float(nll.mean()) == pytest.approx(trainer["nll_per_token"], rel=1e-6)
    np.testing.assert_allclose(nll.mean(0), trainer["nll_by_position"], rtol=1e-6)
    assert nll.std() > 0.1  # the comparison is not between two constants
    # A zero head predicts every id with probability 1 / VOCAB (same program: only the values change).
    params = dict(generator.params)  # a shallow copy: the fixture keeps its head
    params["head"] = np.zeros(np.shape(params["head"]), np.float32)
    uniform = TrainedGenerator(generator.config, params, generator.tokenizer)
    np.testing.assert_allclose(trained_generator_nll(uniform, ids, labels, batch_size=8), math.log(VOCAB), rtol=1e-6)


def test_decoding_mask_rates_follow_the_samplers_cosine_schedule():
    from nativetok_jax.evaluation.token_likelihood import decoding_mask_rates

    # ceil(cos(pi/2 * t/8) * 32), each step committing at least one token: 32, 31, 30, 27, 23, 18, 13, 7.
    assert decoding_mask_rates(8, 32) == tuple(c / 32 for c in (32, 31, 30, 27, 23, 18, 13, 7))


def test_rate_masks_hide_ceil_rate_times_length_and_depend_only_on_the_crop():
    import jax

    from nativetok_jax.evaluation.token_likelihood import rate_masks

    key = jax.random.key(0)
    masks = rate_masks(key, 5, 30, (1.0, 0.1, 0.5, 0.01))
    np.testing.assert_array_equal(masks.sum(-1), np.tile([30, 3, 15, 1], (5, 1)))  # 0.1 * 30 is 3, not 4
    np.testing.assert_array_equal(rate_masks(key, 3, 30, (1.0, 0.1, 0.5, 0.01)), masks[:3])
    assert not (masks[0, 2] == masks[1, 2]).all()  # crops get different positions
    with pytest.raises(ValueError, match=r"mask_rates must be one or more fractions in \(0, 1\]"):
        rate_masks(key, 5, 30, (0.5, 0.0))


def test_masked_token_nll_is_maskgits_loss_at_fixed_masks(maskgit, held_out):
    import jax
    import jax.numpy as jnp

    from nativetok_jax.evaluation.token_likelihood import decoding_mask_rates, rate_masks, trained_generator_nll
    from nativetok_jax.models.generators.masked_generator import masked_cross_entropy

    network, generator = maskgit
    ids, labels = held_out
    key = jax.random.key(3)
    # By default, the rates the generator's own 8-step sampler visits: 8, 7, ..., 1 of 8 hidden.
    nll = trained_generator_nll(generator, ids, labels, key=key, batch_size=16)
    rates = decoding_mask_rates(8, LENGTH)
    assert rates == tuple(c / 8 for c in range(8, 0, -1)) and nll.shape == (12, 8) and nll.dtype == np.float32
    masks = rate_masks(key, 12, LENGTH, rates)
    checked = [(0, 0), (5, 3), (11, 7)]  # (crop, rate) pairs, scored in one forward pass
    mask = jnp.asarray(np.stack([masks[c, r] for c, r in checked]))
    targets = jnp.asarray(ids[[c for c, _ in checked]])
    logits = network(jnp.where(mask, network.mask_id, targets), jnp.asarray(labels[[c for c, _ in checked]]))
    for row, (crop, rate) in enumerate(checked):
        expected, _ = masked_cross_entropy(logits[row : row + 1], targets[row : row + 1], mask[row : row + 1])
        assert nll[crop, rate] == pytest.approx(float(expected), rel=1e-5)


def test_each_scorer_names_what_it_cannot_score(gpt, maskgit, held_out):
    import jax

    from nativetok_jax.evaluation.token_likelihood import masked_token_nll, next_token_nll

    (gpt, _), (maskgit, _) = gpt, maskgit
    ids, labels = held_out
    with pytest.raises(ValueError, match="next_token_nll scores a GPT, got a MaskedTokenTransformer"):
        next_token_nll(maskgit, ids, labels)
    with pytest.raises(ValueError, match="masked_token_nll scores a MaskedTokenTransformer, got a GPT"):
        masked_token_nll(gpt, ids, labels, mask_rates=(1.0,), key=jax.random.key(0))
    with pytest.raises(ValueError, match=r"ids must be \[num_crops >= 1, 8\], got shape \[12, 7\]"):
        next_token_nll(gpt, ids[:, :7], labels)
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 2\] \(2: the null class\)"):
        next_token_nll(gpt, ids, labels + 2)
    with pytest.raises(ValueError, match=r"ids must lie in \[0, 16\)"):
        next_token_nll(gpt, ids + VOCAB, labels)


def test_nll_by_position_plot_draws_each_arms_seed_mean_and_band(tmp_path):
    from nativetok_jax.evaluation.plots import plot_by_position

    native = np.array([[3.0, 2.0, 1.0], [3.2, 2.2, 1.4], [3.4, 2.4, 1.6]])  # [seeds, L]
    figure = plot_by_position({"native": native, "order_free": [4.0, 3.5, 3.0, 2.5]}, tmp_path / "nll.png")
    assert (tmp_path / "nll.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    axes = figure.axes[0]
    (native_line, order_free_line) = axes.lines
    np.testing.assert_allclose(native_line.get_ydata(), [3.2, 2.2, 4.0 / 3])
    np.testing.assert_array_equal(order_free_line.get_xdata(), [1, 2, 3, 4])
    assert len(axes.collections) == 1  # a band for the arm with seeds only
    band = axes.collections[0].get_paths()[0].vertices
    assert band[:, 1].max() == pytest.approx(3.4)
    assert band[:, 1].min() == pytest.approx(4.0 / 3 - np.std([1.0, 1.4, 1.6], ddof=1))
    labels = [text.get_text() for text in axes.get_legend().get_texts()]
    assert labels == [f"native: {native.mean():.3f} ± {native.mean(1).std(ddof=1):.3f} (3 seeds)", "order_free: 3.250"]
    with pytest.raises(ValueError, match=r"arm 'x' must be \[L\] or \[seeds, L\], got shape \[2, 2, 2\]"):
        plot_by_position({"x": np.zeros((2, 2, 2))}, tmp_path / "bad.png")


def test_markdown_table_of_means_and_standard_deviations():
    from nativetok_jax.evaluation.plots import markdown_table

    table = markdown_table({
        "native": {"nll": (2.85123, 0.0412), "psnr": (19.234, None), "params": 1_200_000},
        "a|b": {"nll": (4.0, float("nan")), "psnr": None},
    }, digits=2)
    assert table == (
        "| arm | nll | psnr | params |\n"
        "| --- | ---: | ---: | ---: |\n"
        "| native | 2.85 ± 0.04 | 19.23 | 1200000 |\n"
        "| a\\|b | 4.00 | – | – |\n"
    )
    assert markdown_table({"x": {"a": 1.0, "b": 2.0}}, columns=["b"]).splitlines()[2] == "| x | 2.000 |"


def test_runs_summarize_to_mean_and_sample_std_of_their_scalars():
    from nativetok_jax.evaluation.plots import summarize_runs

    runs = [dict(nll=2.0, psnr=19.0, steps=100, by_position=[1.0], kind="nativetok", usage=0.5),
            dict(nll=3.0, psnr=19.5, steps=100, by_position=[2.0], kind="nativetok", usage=None),
            dict(nll=4.0, psnr=20.0, steps=100, by_position=[3.0], kind="nativetok", usage=0.7)]
    assert summarize_runs(runs) == dict(nll=(3.0, 1.0), psnr=(19.5, 0.5), steps=(100.0, 0.0))
    assert summarize_runs(runs[:1])["nll"] == (2.0, None)
