"""The public API: shapes, dtypes, jit caching, prefix decoding, parameter swaps, bad inputs."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import tiny_config
from nativetok_jax import Tokenizer
from nativetok_jax.tokenizer import preview_lengths

NUM_TOKENS = 8


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.from_config(tiny_config(num_tokens=NUM_TOKENS), seed=0)


def images(batch: int = 2, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (batch, 16, 16, 3), dtype=np.uint8)


def test_encode_decode_round_trip_shapes_and_dtypes(tok):
    assert (tok.image_size, tok.num_tokens) == (16, NUM_TOKENS)
    ids = tok.encode(images())
    assert ids.shape == (2, NUM_TOKENS) and ids.dtype == jnp.int32
    assert 0 <= int(ids.min()) and int(ids.max()) < tok.codebook_size
    out = tok.decode(ids)
    assert out.shape == (2, 16, 16, 3) and out.dtype == jnp.uint8
    np.testing.assert_array_equal(tok.encode(images()), ids)  # deterministic


@pytest.mark.parametrize("k", [1, NUM_TOKENS // 2, NUM_TOKENS])
def test_decode_from_a_prefix(tok, k):
    ids = tok.encode(images())
    out = tok.decode(ids[:, :k])
    assert out.shape == (2, 16, 16, 3)
    other = (ids + 1) % tok.codebook_size
    np.testing.assert_array_equal(out, tok.decode(jnp.concatenate([ids[:, :k], other[:, k:]], 1)[:, :k]))
    np.testing.assert_array_equal(tok.reconstruct(images(), num_tokens=k), out)


def test_encode_and_decode_compile_once_per_shape():
    tok = Tokenizer.from_config(tiny_config(num_tokens=NUM_TOKENS), seed=1)
    encode, decode = tok._compiled.encode, tok._compiled.decode
    for _ in range(3):
        ids = tok.encode(images(2))
        tok.decode(ids[:, :3])
    assert encode._cache_size() == 1 and decode._cache_size() == 1
    tok.encode(images(3))
    tok.with_params(tok.params).encode(images(3))  # another tokenizer of the same config shares them
    assert encode._cache_size() == 2


@pytest.mark.parametrize(
    "bad, message",
    [
        (np.zeros((2, 16, 16, 3), np.float32), "uint8"),
        (np.zeros((2, 32, 32, 3), np.uint8), "shape"),
        (np.zeros((16, 16, 3), np.uint8), "shape"),
        (np.zeros((2, 16, 16, 4), np.uint8), "shape"),
        (np.zeros((0, 16, 16, 3), np.uint8), "shape"),
    ],
)
def test_encode_rejects_bad_images(tok, bad, message):
    with pytest.raises(ValueError, match=message):
        tok.encode(bad)


@pytest.mark.parametrize(
    "bad, message",
    [
        (np.zeros((2, 0), np.int32), "1 <= k"),
        (np.zeros((2, NUM_TOKENS + 1), np.int32), "1 <= k"),
        (np.zeros((2, 3), np.float32), "integer"),
        (np.zeros((3,), np.int32), "shape"),
        (np.full((2, 3), 64, np.int32), r"\[0, 64\)"),
        (np.full((2, 3), -1, np.int32), r"\[0, 64\)"),
    ],
)
def test_decode_rejects_bad_ids(tok, bad, message):
    with pytest.raises(ValueError, match=message):
        tok.decode(bad)


def test_params_are_named_plain_arrays_and_can_be_swapped(tok):
    params = tok.params
    assert set(params) == {"mit", "experts", "token_head", "quantizer", "decoder"}
    assert params["experts"]["stack"]["query"].shape == (NUM_TOKENS, 16)  # one query per expert
    assert all(isinstance(x, jax.Array) for x in jax.tree.leaves(params))
    ids = tok.encode(images())
    swapped = tok.with_params(jax.tree.map(lambda x: x * 1.5, params))
    assert not np.array_equal(swapped.decode(ids), tok.decode(ids))
    np.testing.assert_array_equal(tok.with_params(params).decode(ids), tok.decode(ids))


def test_with_params_names_what_does_not_fit(tok):
    params = jax.tree.map(lambda x: x, tok.params)
    params["decoder"]["head"]["kernel"] = jnp.zeros((3, 3))
    del params["quantizer"]
    with pytest.raises(ValueError, match=r"missing quantizer/codebook.*decoder/head/kernel has shape \(3, 3\)"):
        tok.with_params(params)


def test_order_free_baseline_has_the_same_interface():
    tok = Tokenizer.from_config(tiny_config(kind="titok", num_tokens=NUM_TOKENS))
    assert set(tok.params) == {"encoder", "token_head", "quantizer", "decoder"}
    ids = tok.encode(images())
    assert ids.shape == (2, NUM_TOKENS)
    assert tok.decode(ids[:, :2]).shape == (2, 16, 16, 3)


class GreyPaletteDecoder(nnx.Module):
    """A stand-in VQGAN decoder: the most likely code of each 4x4 cell becomes a grey level."""

    def __init__(self, codebook_size: int):
        self.palette = nnx.Param(jnp.linspace(-1.0, 1.0, codebook_size))

    def __call__(self, logits):  # [B, 4, 4, K] -> [B, 16, 16, 3]
        grey = self.palette[...][jnp.argmax(logits, axis=-1)]
        return jnp.repeat(jnp.repeat(grey, 4, axis=1), 4, axis=2)[..., None].repeat(3, axis=-1)


def test_proxy_code_head_decodes_through_the_given_vqgan_decoder():
    config = tiny_config(num_tokens=NUM_TOKENS)
    config.model.decoder.head = "proxy_codes"
    tok = Tokenizer.from_config(config, proxy_decoder=GreyPaletteDecoder(config.model.decoder.proxy_codebook_size))
    ids = tok.encode(images())
    out = np.asarray(tok.decode(ids))
    assert out.shape == (2, 16, 16, 3) and out.dtype == np.uint8
    # Every 4x4 cell is one grey level of the palette.
    cells = out.reshape(2, 4, 4, 4, 4, 3)
    assert np.all(cells == cells[:, :, :1, :, :1, :1])
    without_vqgan = Tokenizer(tok._compiled, tok.params)
    with pytest.raises(ValueError, match="proxy_decoder"):
        without_vqgan.decode(ids)


def test_preview_lengths():
    assert preview_lengths(32) == [1, 4, 16, 32]
    assert preview_lengths(64) == [1, 4, 16, 64]
    assert preview_lengths(1) == [1]


def test_bfloat16_compute_keeps_float32_parameters_and_close_outputs(tok):
    config = tiny_config(num_tokens=NUM_TOKENS)
    config.model.dtype = "bfloat16"
    low = Tokenizer.from_config(config, seed=0)
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(low.params))
    ids = tok.encode(images())
    difference = np.abs(np.asarray(low.decode(ids), np.int32) - np.asarray(tok.decode(ids), np.int32))
    assert difference.mean() < 4.0  # bfloat16 rounding, not a different model


def test_reconstruct_continuous_is_the_models_unquantised_round_trip(tok):
    from nativetok_jax.models.pixels import images_to_model, model_to_images

    x = images(4, seed=3)
    model = nnx.merge(tok._compiled.graphdef, jax.device_get(tok.params))
    out, quantized = model(images_to_model(jnp.asarray(x)), quantize=False)
    np.testing.assert_array_equal(np.asarray(tok.reconstruct_continuous(x)), np.asarray(model_to_images(out)))
    codes, _ = model(images_to_model(jnp.asarray(x)), quantize=True)
    assert not np.array_equal(np.asarray(model_to_images(codes)), np.asarray(model_to_images(out)))
    with pytest.raises(ValueError, match=r"reconstruct_continuous expects uint8 images \(0\.\.255\), got dtype float32"):
        tok.reconstruct_continuous(x.astype(np.float32))
    with pytest.raises(ValueError, match=r"reconstruct_continuous expects images of shape \[B, 16, 16, 3\], got \(4, 8, 8, 3\)"):
        tok.reconstruct_continuous(x[:, :8, :8])


def test_an_evaluation_during_the_quantisers_warm_up_reports_the_continuous_tokens(tok, caplog):
    """Before the codebook is fitted (``train.quantizer_warmup_*``) the codes decode noise: the
    demo's run logged 18.5 dB at step 2,300 of 23,000 while it trained continuous tokens. The
    evaluation says which it measured and gives the continuous figure, computed here apart."""
    import logging

    from nativetok_jax.evaluation.metrics import psnr
    from nativetok_jax.training.trainer import _evaluate

    class Outputs:
        def grid(self, *args, **kwargs):
            pass

        def plot(self, *args, **kwargs):
            pass

    x = images(6, seed=4)
    state = {"params": tok.params, "ema": None}
    expected = psnr(x, np.asarray(tok.reconstruct_continuous(x)))
    with caplog.at_level(logging.INFO):
        early = _evaluate(tok, state, x, tok.config, 5, Outputs(), quantizer_warmup_steps=10)
    assert early["quantized"] == 0.0 and early["psnr_continuous"] == pytest.approx(expected, abs=1e-9)
    assert f"{expected:.2f} dB through the continuous tokens (the quantiser starts at step 10" in caplog.text
    # The loop evaluates after step 10 and fits the codebook before step 11 (its before_step): a
    # 12,800-step run logged "held-out PSNR 19.13 dB" at step 3,200, its warm-up's end, from the
    # codebook not yet fitted.
    boundary = _evaluate(tok, state, x, tok.config, 10, Outputs(), quantizer_warmup_steps=10)
    assert boundary["quantized"] == 0.0
    late = _evaluate(tok, state, x, tok.config, 11, Outputs(), quantizer_warmup_steps=10)
    assert late["quantized"] == 1.0 and late["psnr"] == early["psnr"]
    assert _evaluate(tok, state, x, tok.config, 0, Outputs(), quantizer_warmup_steps=0)["quantized"] == 1.0


def test_a_stage_that_has_not_saved_yet_leaves_the_previous_stage_as_the_runs_model(tmp_path):
    """A new HNT stage's checkpoints/ exists, empty, from its first step: until it saves, the
    run's newest model is the previous stage's, not 'no finished checkpoint'."""
    from nativetok_jax import checkpoints

    config = tiny_config()
    config.hnt.stages = (dict(name="tokens_4", num_tokens=4, num_steps=2),
                         dict(name="grow_8", num_tokens=8, num_steps=2))
    checkpoints.write_config(tmp_path, config)
    (tmp_path / "tokens_4" / "checkpoints" / "2").mkdir(parents=True)
    (tmp_path / "grow_8" / "checkpoints" / "1.orbax-checkpoint-tmp-0").mkdir(parents=True)  # being written
    assert checkpoints.final_stage_directory(tmp_path) == tmp_path / "tokens_4"
    (tmp_path / "grow_8" / "checkpoints" / "1").mkdir()
    assert checkpoints.final_stage_directory(tmp_path) == tmp_path / "grow_8"


def test_loading_a_tokenizer_from_inside_its_warm_up_is_refused_in_one_line(tmp_path):
    """Token extraction for a generator, sampling and export load through from_checkpoint: the
    codebook is fitted after step 800 here, so codes of a checkpoint up to it decode noise."""
    from nativetok_jax import checkpoints
    from nativetok_jax.config import unfitted_codebook

    config = tiny_config()
    config.train.update(num_steps=3200, quantizer_warmup_steps=0, quantizer_warmup_fraction=0.25)
    checkpoints.write_config(tmp_path, config)
    (tmp_path / "checkpoints" / "800").mkdir(parents=True)
    with pytest.raises(checkpoints.RunDirectoryError,
                       match=r"newest checkpoint \(step 800\) comes before the end of the quantiser warm-up \(the "
                             r"codebook is fitted after step 800\)"):
        Tokenizer.from_checkpoint(str(tmp_path))
    assert unfitted_codebook(config.train, 801) is None and unfitted_codebook(config.train, 800)
