"""The mean-colour shortcut: the colour's ids against a bit-by-bit reference, the tokenizer's code
and decoding with it, its evaluation figures and its config checks."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import tiny_config
from nativetok_jax import Tokenizer
from nativetok_jax.schema import ConfigError
from nativetok_jax.evaluation.tokenizer_metrics import evaluate_tokenizer
from nativetok_jax.models.nativetok import build_model, id_count, mean_colour


def reference_ids(levels: np.ndarray, codebook_size: int) -> list[list[int]]:
    """The colour's ids, written out bit by bit: R7 G7 B7 R6 ... B0, log2(K) bits an id, MSB first."""
    bits = int(math.log2(codebook_size))
    out = []
    for r, g, b in levels:
        stream = "".join(f"{r:08b}"[i] + f"{g:08b}"[i] + f"{b:08b}"[i] for i in range(8))
        stream += "0" * (-len(stream) % bits)
        out.append([int(stream[i:i + bits], 2) for i in range(0, len(stream), bits)])
    return out


def reference_colour(levels: np.ndarray, known_bits: int) -> np.ndarray:
    """Each channel's known high bits of the interleaved stream, and the middle of the rest."""
    out = np.zeros_like(levels)
    for channel in range(3):
        k = len([j for j in range(min(known_bits, 24)) if j % 3 == channel])
        high = (levels[:, channel] >> (8 - k)) << (8 - k)
        out[:, channel] = high + (1 << (7 - k) if k < 8 else 0)
    return out


def to_model(levels: np.ndarray) -> jnp.ndarray:
    return jnp.asarray(levels / 127.5 - 1.0, jnp.float32)


def to_levels(colour) -> np.ndarray:
    return np.round((np.asarray(colour, np.float64) + 1.0) * 127.5).astype(np.int64)


LEVELS = np.array([[0, 0, 0], [255, 255, 255], [128, 64, 200], [1, 254, 127], [37, 180, 90]])


@pytest.mark.parametrize("codebook_size", [2, 8, 64, 1024, 4096, 2**14])
def test_colour_ids_match_the_bit_by_bit_reference_and_come_back_exactly(codebook_size):
    ids = np.asarray(mean_colour.colour_to_ids(to_model(LEVELS), codebook_size))
    assert ids.shape == (len(LEVELS), math.ceil(24 / math.log2(codebook_size)))
    assert mean_colour.colour_id_count(codebook_size) == ids.shape[1]
    assert ids.tolist() == reference_ids(LEVELS, codebook_size)
    np.testing.assert_array_equal(to_levels(mean_colour.ids_to_colour(jnp.asarray(ids), codebook_size)), LEVELS)


@pytest.mark.parametrize("codebook_size", [8, 64, 4096])
def test_a_prefix_of_the_colour_ids_gives_the_known_high_bits_and_the_middle_of_the_rest(codebook_size):
    ids = mean_colour.colour_to_ids(to_model(LEVELS), codebook_size)
    bits = int(math.log2(codebook_size))
    for visible in range(ids.shape[1] + 1):
        got = to_levels(mean_colour.ids_to_colour(ids, codebook_size, visible))
        np.testing.assert_array_equal(got, reference_colour(LEVELS, visible * bits), err_msg=f"{visible} ids")
    # One count per image: each row reads its own prefix.
    per_image = to_levels(mean_colour.ids_to_colour(ids, codebook_size, jnp.arange(len(LEVELS)) % 2))
    np.testing.assert_array_equal(per_image[0], [128, 128, 128])
    np.testing.assert_array_equal(per_image[1], reference_colour(LEVELS[1:2], bits)[0])


def test_a_codebook_that_is_not_a_power_of_two_is_refused():
    with pytest.raises(ValueError, match="power-of-two codebook, got 1000"):
        mean_colour.colour_id_count(1000)


def test_the_quantised_mean_rounds_each_images_mean_colour():
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (3, 8, 8, 3)).astype(np.float64)
    got = to_levels(mean_colour.quantized_mean(jnp.asarray(images / 127.5 - 1.0, jnp.float32)))
    np.testing.assert_array_equal(got, np.round(images.mean(axis=(1, 2))))


def shortcut_config(num_tokens: int = 6, codebook_size: int = 4096):
    config = tiny_config(num_tokens=num_tokens)
    config.model.shortcut = "mean_colour"
    config.model.quantizer.codebook_size = codebook_size
    return config


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.from_config(shortcut_config(), seed=0)


def silent_head(tok: Tokenizer) -> Tokenizer:
    """The same tokenizer with its pixel head zeroed: its decoder adds nothing to the colour."""
    params = jax.tree_util.tree_map(np.asarray, tok.params)
    params["decoder"]["head"]["kernel"] = np.zeros_like(params["decoder"]["head"]["kernel"])
    params["decoder"]["head"]["bias"] = np.zeros_like(params["decoder"]["head"]["bias"])
    return tok.with_params(params)


def test_the_code_starts_with_the_mean_colours_ids(tok):
    assert tok.num_tokens == 6 + 2 and tok.colour_ids == 2 and id_count(tok.config.model) == 8
    images = np.random.default_rng(1).integers(0, 256, (3, 16, 16, 3), dtype=np.uint8)
    ids = np.asarray(tok.encode(images))
    assert ids.shape == (3, 8) and ids.min() >= 0 and ids.max() < 4096
    means = np.round(images.astype(np.float64).mean(axis=(1, 2))).astype(np.int64)
    assert ids[:, :2].tolist() == reference_ids(means, 4096)


def test_decoding_adds_the_colour_its_prefix_carries(tok):
    silent = silent_head(tok)
    flat = np.broadcast_to(np.array([[[[30, 140, 250]]], [[[200, 7, 99]]]], np.uint8), (2, 16, 16, 3))
    ids = silent.encode(flat)
    for k in range(2, silent.num_tokens + 1):  # the whole colour: a flat image comes back exactly
        np.testing.assert_array_equal(silent.decode(ids[:, :k]), flat)
    textured = np.random.default_rng(2).integers(0, 256, (2, 16, 16, 3), dtype=np.uint8)
    means = np.round(textured.astype(np.float64).mean(axis=(1, 2))).astype(np.int64)
    ids = tok.encode(textured)  # the trained-or-not decoder is not used without a learned token
    np.testing.assert_array_equal(tok.decode(ids[:, :2]), np.broadcast_to(means[:, None, None], (2, 16, 16, 3)))
    one = np.asarray(tok.decode(ids[:, :1]))  # 12 bits: 4 per channel, the middle of the rest
    np.testing.assert_array_equal(one, np.broadcast_to(reference_colour(means, 12)[:, None, None], one.shape))
    out = np.asarray(silent.reconstruct(textured))
    np.testing.assert_array_equal(out, np.broadcast_to(
        np.round(textured.astype(np.float64).mean(axis=(1, 2), keepdims=True)), out.shape))


def test_the_encoder_sees_the_image_minus_its_colour(tok):
    """Two images that differ by a constant colour (no clipping) get the same learned ids."""
    base = np.random.default_rng(3).integers(60, 190, (2, 16, 16, 3), dtype=np.uint8)
    shifted = base + np.array([40, -30, 20], np.int16).astype(base.dtype)
    ids, moved = np.asarray(tok.encode(base)), np.asarray(tok.encode(shifted))
    np.testing.assert_array_equal(ids[:, 2:], moved[:, 2:])
    assert not np.array_equal(ids[:, :2], moved[:, :2])


def test_the_codebook_figures_count_learned_ids_only_and_the_bits_count_every_id(tok):
    images = np.random.default_rng(4).integers(0, 256, (4, 16, 16, 3), dtype=np.uint8)
    metrics, _ = evaluate_tokenizer(tok, [images])
    rows = {row["tokens"]: row for row in metrics["rate_distortion"]}
    assert sorted(rows) == [1, 2, 4, 8]
    assert [rows[k]["bits"] for k in (1, 2, 4, 8)] == [12, 24, 48, 96]
    prefix = {row["num_tokens"]: row for row in metrics["prefix"]}
    assert prefix[1]["codebook_usage"] == prefix[2]["codebook_usage"] == 0.0
    learned = np.asarray(tok.encode(images))[:, 2:]
    assert metrics["codebook_usage"] == pytest.approx(len(np.unique(learned)) / 4096)


def test_the_training_reconstruction_adds_the_colour():
    config = shortcut_config()
    model = build_model(config.model, nnx.Rngs(0))
    model.decoder.head.kernel[...] = jnp.zeros_like(model.decoder.head.kernel[...])
    model.decoder.head.bias[...] = jnp.zeros_like(model.decoder.head.bias[...])
    images = jnp.asarray(np.random.default_rng(5).uniform(-1, 1, (2, 16, 16, 3)), jnp.float32)
    out, _ = nnx.jit(lambda model, images: model(images, quantize=False))(model, images)
    np.testing.assert_allclose(out, jnp.broadcast_to(mean_colour.quantized_mean(images)[:, None, None], out.shape))


@pytest.mark.parametrize("change, message", [
    (dict(shortcut="colour"), "model.shortcut: must be one of"),
    (dict(codebook_size=1000), "model.shortcut: the mean colour is sent as ids of the codebook, whose size must "
                               "be a power of two; model.quantizer.codebook_size is 1000"),
    (dict(head="proxy_codes"), "model.shortcut: the mean-colour shortcut adds a colour to pixels"),
])
def test_bad_shortcut_settings_are_one_line_errors(change, message):
    config = shortcut_config()
    if "shortcut" in change:
        config.model.shortcut = change["shortcut"]
    if "codebook_size" in change:
        config.model.quantizer.codebook_size = change["codebook_size"]
    if "head" in change:
        config.model.decoder.head = change["head"]
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        build_model(config.model, nnx.Rngs(0))


@pytest.mark.slow
def test_a_shortcut_tokenizer_trains_and_a_generator_models_its_whole_code(tmp_path):
    """The trainer reports the code's length with the colour's ids, and a generator trained on the
    token store generates all of them (the colour included) and decodes them to images."""
    from test_generator_training import tiny_generator_config
    from test_training import train_config

    from nativetok_jax.sample import sample_images
    from nativetok_jax import tasks
    from nativetok_jax.training.generator_trainer import train_generator
    from nativetok_jax.training.trainer import train_and_evaluate

    config = train_config(num_steps=2, checkpoint_every=2)
    config.model.shortcut = "mean_colour"  # a 64-code book: 6 bits an id, 4 ids of colour
    tokenizer_dir = str(tmp_path / "tokenizer")
    summary = train_and_evaluate(config, tokenizer_dir)
    assert (summary["num_tokens"], summary["colour_ids"]) == (config.model.num_tokens + 4, 4)
    line = tasks.of(config).summary_line(summary, tokenizer_dir)
    assert f"with {config.model.num_tokens + 4} tokens, the first 4 the mean colour" in line
    generator = tiny_generator_config(tokenizer_dir)
    generator.train.update(num_steps=4, eval_every=4, checkpoint_every=4)
    result = train_generator(generator, str(tmp_path / "generator"))
    assert len(result["nll_by_position"]) == config.model.num_tokens + 4
    images = sample_images(str(tmp_path / "generator"), str(tmp_path / "samples"), num_samples=2, seed=0)
    assert images.shape == (2, 16, 16, 3)
