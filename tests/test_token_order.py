"""The token-order experiment's arms (issue 15): the reading-order permutation round trip, the
causal-mask encoder's causality, parameter matching, and the report's schema on a tiny run."""

import json
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

import conftest
from test_generator_training import tiny_generator_config
from test_training import ROOT, train_config
from nativetok_jax import Tokenizer
from nativetok_jax.sharding import params_of
from nativetok_jax.config import ConfigError, load_config_file, validate_generator
from nativetok_jax.data import token_store
from nativetok_jax.data.token_order import (ReorderedTokens, TokenOrderError, reading_order, to_tokenizer_order,
                                            token_permutation)
from nativetok_jax.experiments import token_order
from nativetok_jax.generation.pretrained import TrainedGenerator
from nativetok_jax.models.nativetok import build_model
from nativetok_jax.models.generators.build import build_generator
from nativetok_jax.models.nativetok.parameter_matching import match_encoder, tokenizer_parameters
from nativetok_jax.models.nativetok.titok import TiTokEncoder, latent_causal_attention_mask

NUM_TOKENS = 8


def write_store(directory, ids: np.ndarray) -> token_store.TokenSource:
    token_store.write_meta(directory, dict(num_examples=len(ids), shard_size=len(ids), num_tokens=ids.shape[1],
                                           codebook_size=64, num_classes=1, complete=False))
    token_store.write_shard(directory, 0, ids, np.zeros(len(ids), np.int32))
    token_store.mark_complete(directory)
    return token_store.TokenSource(directory)


@pytest.mark.slow
def test_permutations_are_the_named_orders():
    assert token_permutation("identity", 4).tolist() == [0, 1, 2, 3]
    assert token_permutation("reversed", 4).tolist() == [3, 2, 1, 0]
    assert token_permutation("random:0", 8).tolist() == np.random.default_rng(0).permutation(8).tolist()
    assert sorted(token_permutation("random:7", 32).tolist()) == list(range(32))
    for bad in ("random", "random:x", "shuffled", ""):
        with pytest.raises(TokenOrderError, match="generator.token_order.permutation"):
            token_permutation(bad, 4)


@pytest.mark.slow
def test_store_reader_permutes_and_sampler_unpermutes(tmp_path):
    """The reader hands the generator permuted ids; the sampler's output goes back to the
    tokenizer's order, so decoding gives the same images as the unpermuted ids."""
    ids = np.random.default_rng(0).integers(0, 64, (16, NUM_TOKENS)).astype(np.int32)
    store = write_store(str(tmp_path / "store"), ids)
    permutation = token_permutation("random:3", NUM_TOKENS)
    reader = reading_order(store, "random:3")
    assert isinstance(reader, ReorderedTokens) and reading_order(store, "identity") is store
    assert reader[5]["ids"].tolist() == [ids[5, p] for p in permutation] and reader[5]["label"] == 0
    read, _ = reader.arrays()
    np.testing.assert_array_equal(read[:, 0], ids[:, permutation[0]])
    np.testing.assert_array_equal(to_tokenizer_order(read, permutation), ids)
    assert len(reader) == 16 and reader.num_tokens == NUM_TOKENS and reader.codebook_size == 64

    # The sampler: one generator's parameters read in the identity and in the permuted order
    # draw the same sequence; the permuted one's samples come back in the tokenizer's order.
    tokenizer_config = smallest_nativetok()
    tokenizer_config.model.update(num_tokens=NUM_TOKENS)
    tokenizer_config.model.quantizer.codebook_size = 64
    tokenizer_config.mesh.update(data=-1, fsdp=1, model=1)
    tokenizer = Tokenizer.from_params(tokenizer_config, params_of(build_model(tokenizer_config.model, nnx.Rngs(0))))
    config = tiny_generator_config(str(tmp_path))
    config.mesh.update(data=-1, fsdp=1, model=1)
    generator = build_generator(config.generator, vocab_size=64, num_tokens=NUM_TOKENS, num_classes=1, rngs=nnx.Rngs(1))
    # The head starts at zero; random values make the draws depend on the order read.
    params = jax.tree.map(lambda x: np.random.default_rng(1).normal(0, 0.5, x.shape).astype(x.dtype),
                          params_of(generator))
    labels, key = np.zeros(8, np.int32), jax.random.key(4)
    drawn = np.asarray(TrainedGenerator(config, params, tokenizer).sample_ids(labels, key))
    config.generator.token_order.permutation = "random:3"
    permuted = np.asarray(TrainedGenerator(config, params, tokenizer).sample_ids(labels, key))
    np.testing.assert_array_equal(permuted, to_tokenizer_order(drawn, permutation))
    np.testing.assert_array_equal(np.asarray(tokenizer.decode(to_tokenizer_order(read[:8], permutation))),
                                  np.asarray(tokenizer.decode(ids[:8])))


@pytest.mark.slow
def test_causal_mask_encoder_token_i_sees_only_earlier_latents():
    kwargs = dict(image_size=8, patch_size=4, num_tokens=4, width=16, depth=2, num_heads=2, mlp_ratio=2.0)
    causal = TiTokEncoder(**kwargs, rngs=nnx.Rngs(0), latent_causal_mask=True)
    order_free = TiTokEncoder(**kwargs, rngs=nnx.Rngs(0))
    shapes = lambda m: jax.tree.map(jnp.shape, nnx.state(m, nnx.Param))  # noqa: E731
    assert shapes(causal) == shapes(order_free)  # parameter-identical: the mask is the only change
    images = jax.random.uniform(jax.random.key(1), (2, 8, 8, 3), minval=-1, maxval=1)
    encode = nnx.jit(lambda module: module(images))
    before, free_before = np.asarray(encode(causal)), np.asarray(encode(order_free))
    # Perturb latent query 2 (the patches stay fixed); not by a constant, which LayerNorm removes.
    change = jax.random.normal(jax.random.key(2), (16,))
    for module in (causal, order_free):
        module.latent_tokens[...] = module.latent_tokens[...].at[2].add(change)
    after, free_after = np.asarray(encode(causal)), np.asarray(encode(order_free))
    np.testing.assert_array_equal(after[:, :2], before[:, :2])  # tokens 0, 1: unchanged
    assert np.all(np.abs(after[:, 2:] - before[:, 2:]).max(axis=-1) > 1e-2)  # tokens 2, 3 see it
    assert np.all(np.abs(free_after - free_before).max(axis=-1) > 1e-2)  # order-free: every token does
    mask = latent_causal_attention_mask(3, 2)
    assert mask.astype(int).tolist() == [[1, 1, 1, 0, 0]] * 3 + [[1, 1, 1, 1, 0], [1, 1, 1, 1, 1]]


@pytest.mark.slow
def test_causal_mask_is_a_titok_switch():
    config = conftest.tiny_config()
    config.model.latent_causal_mask = True
    with pytest.raises(ConfigError, match="model.latent_causal_mask"):
        build_model(config.model, nnx.Rngs(0))


@pytest.mark.slow
def test_match_encoder_grows_the_order_free_encoder_to_nativetoks_size():
    native = conftest.tiny_config().model
    order_free = conftest.tiny_config(kind="titok").model
    target = tokenizer_parameters(native)["encoder"]
    assert tokenizer_parameters(order_free)["encoder"] < target
    deeper = match_encoder(order_free, native, "depth")
    wider = match_encoder(order_free, native, "width")
    assert deeper.encoder.width == 32 and wider.encoder.depth == 2 and wider.encoder.width % 4 == 0
    # The closest size: one step either way is further from the target.
    for matched, field, step in ((deeper, "depth", 1), (wider, "width", 4)):
        gap = abs(tokenizer_parameters(matched)["encoder"] - target)
        for neighbour in (matched.encoder[field] - step, matched.encoder[field] + step):
            trial = ml_collections.ConfigDict(matched.to_dict())
            trial.encoder[field] = neighbour
            assert abs(tokenizer_parameters(trial)["encoder"] - target) >= gap
    with pytest.raises(ValueError, match="match_parameters"):
        match_encoder(order_free, native, "heads")


@pytest.mark.slow
def test_experiment_errors_name_the_field(tmp_path):
    with pytest.raises(ValueError, match="arms: unknown \\['titok'\\]"):
        token_order.selected_arms("native,titok")
    with pytest.raises(ValueError, match="names an arm twice"):
        token_order.selected_arms("native,native")
    config = tiny_generator_config(str(tmp_path))
    config.generator.token_order.permutation = "sorted"
    with pytest.raises(ConfigError, match="generator.token_order.permutation"):
        validate_generator(config)


def test_every_generator_and_the_bootstrap_are_checked_before_any_tokenizer_trains():
    """The generators met their first check after every tokenizer of seed 0 had trained (hours at
    the :full scale); a bootstrap count of 0 failed after every arm, with no report written."""
    config = load_config_file(os.path.join(ROOT, "configs", "token_order.py"))
    assert token_order.validate(config) == ["native", "order_free", "causal_mask"]
    config.generator.generator.sample.top_k = 4097  # past the 4096 codes
    with pytest.raises(ConfigError, match=r"config.generator.sample.top_k: .*4096"):
        token_order.validate(config)
    config = load_config_file(os.path.join(ROOT, "configs", "token_order.py"))
    config.generator.train.beta2 = 1.5
    with pytest.raises(ConfigError, match=r"^config.train.beta2: must lie in \[0, 1\), got 1.5$"):
        token_order.validate(config)
    config = load_config_file(os.path.join(ROOT, "configs", "token_order.py"))
    config.bootstrap_samples = 0
    with pytest.raises(ConfigError, match=r"^bootstrap_samples: must be an integer >= 1, got 0$"):
        token_order.validate(config)


@pytest.mark.slow
def test_over_seeds_gives_means_std_and_every_seed():
    rows = [dict(seed=s, nll_per_token=v, nll_unigram=4.0, psnr=20.0 + s, codebook_usage=0.5,
                 nll_by_position=[v, 2 * v]) for s, v in enumerate([1.0, 2.0, 3.0])]
    summary = token_order.over_seeds(rows)
    assert summary["nll_per_token"] == 2.0 and summary["std"]["nll_per_token"] == 1.0  # ddof 1
    assert summary["nll_by_position"] == [2.0, 4.0] and summary["std"]["nll_by_position"] == [1.0, 2.0]
    assert summary["psnr"] == 21.0 and summary["per_seed"] == rows
    assert token_order.over_seeds(rows[:1])["std"]["psnr"] == 0.0


def smallest_nativetok() -> ml_collections.ConfigDict:
    """Two training steps of the smallest NativeTok: 4 tokens, one layer everywhere, one expert
    scan (the compilations are most of these tests' cost)."""
    config = train_config(num_steps=2, checkpoint_every=2)
    m = config.model
    m.num_tokens = 4
    for part in (m.encoder, m.experts, m.decoder):
        part.depth = 1
    m.experts.chunks = 1
    return config


def tiny_experiment() -> ml_collections.ConfigDict:
    """The smallest NativeTok, two steps of each generator (MaskGIT sampling in 4 steps)."""
    config = ml_collections.ConfigDict()
    config.native = smallest_nativetok()
    config.order_free = ml_collections.ConfigDict(config.native.to_dict())
    config.order_free.model.kind = "titok"
    config.causal_mask = ml_collections.ConfigDict(config.order_free.to_dict())
    config.causal_mask.model.latent_causal_mask = True
    config.generator = tiny_generator_config("")
    config.generator.generator.update(num_train_examples=32, extract_batch_size=16)
    config.generator.train.update(num_steps=2, eval_every=2, checkpoint_every=2, log_every=2)
    config.generator.generator.sample.update(num_samples=8, num_steps=4)
    config.arms = "native,native_permuted"  # one tokenizer: the other arms' are tested above
    config.seeds = 1
    config.match_parameters = ""
    config.permutation_seed = 0
    config.bootstrap_samples = 200
    config.maskgit = True
    return config


@pytest.mark.slow
def test_report_schema_on_a_tiny_run(tmp_path):
    report = token_order.run(tiny_experiment(), str(tmp_path))
    assert report == json.loads((tmp_path / "token_order.json").read_text())
    assert report["arms"] == ["native", "native_permuted"] and report["seeds"] == 1
    for arm in report["arms"]:
        r = report[arm]
        assert set(token_order.FIGURES) <= set(r) and set(r["std"]) == set(r["per_seed"][0]) - {"seed"}
        assert len(r["context_gain_by_position"]) == 4
        # MaskGIT for the own-order arms only, at its sampler's cosine rates (4 steps: 1, ...).
        assert ("maskgit_model_nll" in r) == (arm != "native_permuted")
        assert len(r["nll_by_position"]) == 4 and len(r["per_seed"]) == 1 and r["num_tokens"] == 4
        nll = np.load(r["held_out_nll"][0])["nll"]
        assert nll.shape == (16, 4)  # every held-out crop's per-token NLLs, paired across arms
        np.testing.assert_allclose(nll.mean(), r["nll_per_token"], rtol=1e-5)
    native, permuted = report["native"], report["native_permuted"]
    # native_permuted reads native's own store (no second tokenizer, no re-encoding).
    assert sorted(os.listdir(tmp_path)) == ["contrasts.png", "native", "native_permuted", "nll_by_position.png",
                                            "token_order.json", "token_order.md"]
    assert sorted(os.listdir(tmp_path / "native_permuted" / "seed_0")) == ["generator"]
    assert (permuted["psnr"], permuted["parameters"]) == (native["psnr"], native["parameters"])
    assert permuted["nll_unigram"] == pytest.approx(native["nll_unigram"], rel=1e-12)  # the order sums differently
    assert permuted["token_order"] == "random:0" and native["token_order"] == "identity"
    assert native["parameters"] == dict(tokenizer_parameters(tiny_experiment().native.model),
                                        generator=permuted["parameters"]["generator"])
    contrast = report["contrasts"]["native_permuted - native"]
    assert contrast["num_pairs"] == 16 and contrast["low"] <= contrast["mean_difference"] <= contrast["high"]
    assert contrast["mean_difference"] == pytest.approx(permuted["nll_per_token"] - native["nll_per_token"], abs=1e-5)
    assert report["maskgit_contrasts"] == {} and report["warnings"] == []
    assert {"matmul_gflops", "wall_seconds", "cpu_seconds", "stages"} <= set(report["budget"])
    table = (tmp_path / "token_order.md").read_text()
    assert "| native |" in table and "| native_permuted |" in table and "native_permuted - native:" in table


@pytest.mark.slow
def test_warnings_name_unmatched_reconstruction_and_smaller_encoders():
    def arm(psnr, encoder):
        return dict(psnr=psnr, parameters=dict(encoder=encoder))

    report = dict(native=arm(20.0, 2000), order_free=arm(20.4, 2000), causal_mask=arm(19.4, 1000))
    lines = token_order.warnings(report, ["native", "order_free", "causal_mask"])
    assert lines == [
        "causal_mask vs native: tokenizer PSNRs differ by -0.60 dB (> 0.5 dB): reconstruction is not matched, "
        "so the NLL contrast mixes order and code coarseness",
        "causal_mask: encoder has 1,000 parameters against NativeTok's MIT + experts' 2,000 "
        "(match_parameters=depth|width grows it)"]
