"""The MaskGIT-style generator: cosine schedule, parallel decoding, guidance, and its masked loss."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from nativetok_jax import sharding
from nativetok_jax.config import DEFAULT_RULES
from nativetok_jax.generation.masked import mask_schedule, sample
from nativetok_jax.layers.partitioning import axis_rules
from nativetok_jax.models.generators.masked_generator import MaskedTokenTransformer, cosine_mask, masked_cross_entropy

VOCAB = 16
LENGTH = 8
CLASSES = 4


def build(rngs: nnx.Rngs) -> MaskedTokenTransformer:
    return MaskedTokenTransformer(
        vocab_size=VOCAB, num_tokens=LENGTH, num_classes=CLASSES, width=32, depth=2, num_heads=4,
        mlp_ratio=2.0, rngs=rngs,
    )


def build_compiled(seed: int) -> MaskedTokenTransformer:
    """Initialises under jit: much faster than op-by-op here."""
    return nnx.jit(lambda: build(nnx.Rngs(seed)))()


@pytest.fixture(scope="module")
def model() -> MaskedTokenTransformer:
    return build_compiled(0)


LABELS = jnp.array([0, 1, 2, 3, 0, 1, 2, 3])


@pytest.mark.parametrize("length,steps", [(8, 8), (16, 8), (8, 1), (8, 3), (5, 12), (16, 2), (1, 1), (256, 8)])
def test_schedule_is_monotone_from_all_masked_to_none(length, steps):
    counts = [mask_schedule(s, steps, length) for s in range(-1, steps)]
    assert counts[0] == length and counts[-1] == 0
    decided_per_step = -np.diff(counts)
    assert (decided_per_step >= 0).all()
    # Every step commits a token while any is left.
    assert all(d >= 1 for d, before in zip(decided_per_step, counts[:-1]) if before > 0)
    traced = jax.jit(lambda s: mask_schedule(s, steps, length))
    assert [int(traced(s)) for s in range(steps)] == counts[1:]


def test_schedule_follows_the_cosine_where_it_commits_a_token():
    # L = 16, 8 steps: ceil(cos(pi/2 * k/8) * 16) for k = 1..8 is 16, 15, 14, 12, 9, 7, 4, 0; the first
    # three steps must each commit a token, which lowers them to 15, 14, 13.
    assert [mask_schedule(s, 8, 16) for s in range(8)] == [15, 14, 13, 12, 9, 7, 4, 0]
    assert [mask_schedule(s, 3, 8) for s in range(3)] == [7, 4, 0]  # cos(pi/3) * 8 is 4, not 5


@pytest.mark.parametrize("steps", [4, 11])
def test_decoding_follows_the_schedule_and_never_changes_decided_tokens(model, steps):
    ids, history = sample(model, LABELS, key=jax.random.key(1), num_tokens=LENGTH, num_steps=steps,
                          return_history=True)
    ids, history = np.asarray(ids), np.asarray(history)
    assert ids.shape == (8, LENGTH) and ids.dtype == np.int32
    assert ((ids >= 0) & (ids < VOCAB)).all()
    np.testing.assert_array_equal(history[-1], ids)
    for step in range(steps):
        masked = history[step] == VOCAB
        assert (masked.sum(1) == mask_schedule(step, steps, LENGTH)).all()
        # Once decided, a token keeps its id up to the end.
        np.testing.assert_array_equal(np.where(masked, ids, history[step]), ids)


def test_sampling_is_seeded(model):
    def draw(seed):
        return np.asarray(sample(model, LABELS, key=jax.random.key(seed), num_tokens=LENGTH, num_steps=4,
                                 return_history=True)[0])

    np.testing.assert_array_equal(draw(3), draw(3))
    assert (draw(3) != draw(4)).any()


def test_guidance_scale_zero_samples_the_null_class(model):
    key = jax.random.key(5)
    guided = sample(model, LABELS, key=key, num_tokens=LENGTH, num_steps=4, guidance_scale=0.0, return_history=True)
    null = jnp.full_like(LABELS, model.null_class)
    unconditional = sample(model, null, key=key, num_tokens=LENGTH, num_steps=4, return_history=True)
    np.testing.assert_array_equal(guided[0], unconditional[0])
    conditional = sample(model, LABELS, key=key, num_tokens=LENGTH, num_steps=4, return_history=True)
    assert (np.asarray(conditional[0]) != np.asarray(guided[0])).any()


def test_greedy_choices_do_not_depend_on_the_seed(model):
    def draw(seed):
        return np.asarray(sample(model, LABELS, key=jax.random.key(seed), num_tokens=LENGTH, num_steps=4,
                                 choice_temperature=0.0, top_k=1))

    np.testing.assert_array_equal(draw(0), draw(1))


def test_sampling_under_a_mesh_matches_one_device(model):
    mesh = sharding.make_mesh(ml_collections.ConfigDict(dict(data=2, fsdp=2, model=2)))
    graphdef, params, _ = sharding.init_sharded(build, 0, mesh, DEFAULT_RULES)
    assert params["head"]["kernel"].sharding.spec == P("fsdp", "model")
    labels = jax.device_put(LABELS, sharding.batch_sharding(mesh, LABELS.shape))
    with jax.set_mesh(mesh), axis_rules(DEFAULT_RULES):
        ids, _ = sample((graphdef, params), labels, key=jax.random.key(1), num_tokens=LENGTH, num_steps=4,
                        return_history=True)
    assert ids.sharding.spec[0] == ("data", "fsdp")
    single, _ = sample(model, LABELS, key=jax.random.key(1), num_tokens=LENGTH, num_steps=4, return_history=True)
    np.testing.assert_array_equal(ids, single)


def test_cross_entropy_counts_only_masked_positions():
    targets = jnp.array([[0, 1, 2]])
    mask = jnp.array([[True, False, True]])
    # Position 1 is confidently wrong but visible: it must not count.
    logits = jnp.array([[[0.0, 1.0, 0.0], [0.0, 0.0, 100.0], [0.0, 0.0, np.log(2.0)]]])
    loss, accuracy = masked_cross_entropy(logits, targets, mask)
    expected = (np.log(2.0 + np.e) + np.log(4.0 / 2.0)) / 2  # -log(1 / (2 + e)) and -log(2 / 4)
    np.testing.assert_allclose(loss, expected, rtol=1e-6)
    np.testing.assert_allclose(accuracy, 0.5)  # position 0 wrong, position 2 right


def test_masked_token_loss_scores_the_masked_positions_of_the_cosine_mask(model):
    tokens = jax.random.randint(jax.random.key(0), (8, LENGTH), 0, VOCAB)
    key = jax.random.key(7)
    null = jnp.full_like(LABELS, model.null_class)

    @nnx.jit
    def run(model):
        kept = model.masked_token_loss(tokens, LABELS, key=key, label_drop_probability=0.0)
        dropped = model.masked_token_loss(tokens, LABELS, key=key, label_drop_probability=1.0)
        mask = cosine_mask(jax.random.split(key)[0], 8, LENGTH)
        inputs = jnp.where(mask, model.mask_id, tokens)
        return kept, dropped, mask, model(inputs, LABELS), model(inputs, null)

    (loss, metrics), (dropped, _), mask, logits, null_logits = jax.device_get(run(model))
    assert mask.sum(1).min() >= 1 and not mask.all()

    def masked_mean_cross_entropy(logits):
        per_position = -np.take_along_axis(jax.nn.log_softmax(logits), tokens[..., None], -1)[..., 0]
        return per_position[mask].mean()

    np.testing.assert_allclose(loss, masked_mean_cross_entropy(logits), rtol=1e-5)
    np.testing.assert_allclose(metrics["mask_ratio"], mask.mean())
    np.testing.assert_allclose(metrics["accuracy"], (logits.argmax(-1) == tokens)[mask].mean())
    # Dropping every label conditions on the null class.
    np.testing.assert_allclose(dropped, masked_mean_cross_entropy(null_logits), rtol=1e-5)


def test_cosine_mask_ratios_favour_heavy_masking():
    mask = cosine_mask(jax.random.key(0), 4096, 16)
    counts = np.asarray(mask.sum(1))
    assert counts.min() >= 1 and counts.max() == 16
    # E[cos(pi/2 u)] = 2/pi; ceil adds up to one token.
    assert 2 / np.pi < mask.mean() < 2 / np.pi + 1 / 16


def test_loss_falls_on_a_fixed_batch(model):
    graphdef, params = nnx.split(model)
    tokens = jax.random.randint(jax.random.key(0), (8, LENGTH), 0, VOCAB)
    optimizer = optax.adam(3e-3)

    def loss_fn(params, key):
        return nnx.merge(graphdef, params).masked_token_loss(tokens, LABELS, key=key)[0]

    @jax.jit
    def train_step(params, opt_state, key):
        """One update, and the loss before it on fixed masks (one compile for both)."""
        held_out = jnp.mean(jax.vmap(lambda k: loss_fn(params, k))(jax.random.split(jax.random.key(99), 4)))
        grads = jax.grad(loss_fn)(params, key)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, held_out

    opt_state = optimizer.init(params)
    losses = []
    for step in range(26):
        params, opt_state, held_out = train_step(params, opt_state, jax.random.key(step))
        losses.append(float(held_out))
    assert np.isfinite(losses).all() and losses[-1] < 0.6 * losses[0], losses


def test_infinite_choice_temperature_keeps_positions_whatever_was_sampled(model):
    """Random order: which positions stay masked depends on the key alone, not on the model's
    confidences, so two label sets (different logits) re-mask the same positions."""
    def masked_positions(labels):
        history = sample(model, labels, key=jax.random.key(7), num_tokens=LENGTH, num_steps=4,
                         choice_temperature=float("inf"), return_history=True)[1]
        return np.asarray(history) == model.mask_id

    first, second = masked_positions(LABELS), masked_positions((LABELS + 1) % CLASSES)
    np.testing.assert_array_equal(first, second)
    assert [int(m.sum()) for m in first] == [8 * mask_schedule(s, 4, LENGTH) for s in range(4)]


def test_the_head_accumulates_bfloat16_logits_in_float32():
    """In bfloat16 the logits are a float32 sum of bfloat16 products (as the GPT's head), not a
    bfloat16 sum cast afterwards (which would leave every logit on the bfloat16 grid)."""
    model = nnx.jit(lambda: MaskedTokenTransformer(
        vocab_size=VOCAB, num_tokens=LENGTH, num_classes=CLASSES, width=32, depth=1, num_heads=4,
        mlp_ratio=2.0, dtype=jnp.bfloat16, rngs=nnx.Rngs(0)))()
    tokens = jax.random.randint(jax.random.key(0), (8, LENGTH), 0, VOCAB)
    logits = np.asarray(model(tokens, LABELS))
    assert logits.dtype == np.float32
    on_bf16_grid = logits == logits.astype(jnp.bfloat16).astype(np.float32)
    assert on_bf16_grid.mean() < 0.5, on_bf16_grid.mean()


def test_held_out_nll_does_not_depend_on_the_evaluation_batch_size(model):
    from nativetok_jax.training.generator_trainer import HeldOutLikelihood

    ids = np.asarray(jax.random.randint(jax.random.key(3), (12, LENGTH), 0, VOCAB), np.int32)
    labels = np.arange(12, dtype=np.int32) % CLASSES

    class Store:  # the part of a TokenSource the trainer's evaluation reads
        def arrays(self):
            return ids, labels

    mesh = sharding.make_mesh(ml_collections.ConfigDict(dict(data=-1, fsdp=1, model=1)))
    graphdef, params = nnx.split(model)
    per_token = {b: HeldOutLikelihood(graphdef, ml_collections.ConfigDict(dict(kind="maskgit")), Store(), mesh,
                                      DEFAULT_RULES, batch_size=b).per_token(params) for b in (4, 8, 12)}
    assert per_token[4][:, 0].std() > 0.01  # one loss per crop, not one per batch
    np.testing.assert_allclose(per_token[8], per_token[4], rtol=1e-5)
    np.testing.assert_allclose(per_token[12], per_token[4], rtol=1e-5)
