"""The causal expert stack: causality, equality with the unrolled prototype, flat compile size."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from nativetok_jax.models.nativetok.experts import CausalExperts, chunk_bounds

WIDTH, CONTEXT, BATCH = 16, 5, 2


def make_experts(num_experts: int, **kwargs) -> CausalExperts:
    return CausalExperts(num_experts, WIDTH, 2, 2, 4.0, rngs=nnx.Rngs(0), **kwargs)


def x_latent(seed: int = 1) -> jax.Array:
    return jax.random.normal(jax.random.key(seed), (BATCH, CONTEXT, WIDTH))


def with_expert_perturbed(experts: CausalExperts, index: int) -> CausalExperts:
    """A copy whose expert ``index`` (and only it) has different parameters."""
    graphdef, state = nnx.split(experts)
    noise = jax.random.key(7)

    def perturb(path, value):
        nonlocal noise
        noise, key = jax.random.split(noise)
        return value.at[index].add(0.5 * jax.random.normal(key, value.shape[1:]))

    return nnx.merge(graphdef, jax.tree_util.tree_map_with_path(perturb, state))


@pytest.mark.parametrize("index", [0, 3, 7])
def test_perturbing_expert_j_leaves_earlier_tokens_bit_identical(index):
    experts = make_experts(8)
    x = x_latent()
    forward = jax.jit(lambda module, x: module(x)[0])
    before = np.asarray(forward(experts, x))
    after = np.asarray(forward(with_expert_perturbed(experts, index), x))
    np.testing.assert_array_equal(after[:, :index], before[:, :index])
    assert np.abs(after[:, index] - before[:, index]).min() > 1e-4


def test_token_depends_on_earlier_tokens_and_not_later_ones():
    experts = make_experts(6)
    x = x_latent()

    def token(i, slots):
        return experts(x, start=i, stop=i + 1, slots=slots)[0][:, 0]

    _, slots = experts(x)
    noise = jax.random.normal(jax.random.key(3), slots.shape)
    changed = slots.at[:, 1].add(noise[:, 1])  # token 1's slot
    assert np.abs(token(3, changed) - token(3, slots)).max() > 1e-4
    changed = slots.at[:, 3:].add(noise[:, 3:])  # slots of token 3 itself and later ones
    np.testing.assert_array_equal(token(3, changed), token(3, slots))


def _outputs_and_gradients(module: CausalExperts, how: str):
    def run(module, x):
        return module.reference(x) if how == "reference" else module(x)

    def loss(module, x):
        tokens, slots = run(module, x)
        return jnp.sum(jnp.sin(tokens)) + jnp.sum(jnp.cos(slots))

    return jax.jit(run)(module, x_latent()), jax.jit(jax.grad(loss, argnums=(0, 1)))(module, x_latent())


@functools.cache
def single_scan_and_reference(num_experts: int):
    """(outputs, gradients) of the single scan and of the unrolled reference, computed once per L."""
    experts = make_experts(num_experts)
    return _outputs_and_gradients(experts, "single"), _outputs_and_gradients(experts, "reference")


@pytest.mark.slow
@pytest.mark.parametrize("num_experts", [1, 5, 32])
@pytest.mark.parametrize("chunks", [1, 2, 4])
def test_chunked_stack_equals_single_scan_and_reference(num_experts, chunks):
    """Values, slots and gradients (parameters and X_latent) of the chunked stack equal the single
    scan's and the unrolled unpadded loop's; L = 5 gives uneven chunks ([0, 3, 5] and [0, 2, 3, 4, 5])."""
    outputs, grads = _outputs_and_gradients(make_experts(num_experts, chunks=chunks), "chunked")
    for other_outputs, other_grads in single_scan_and_reference(num_experts):
        for a, b in zip(outputs, other_outputs):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
        for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(other_grads)):
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("depth", [1, 3])
def test_context_projected_outside_the_scan_equals_reference_at_any_depth(depth):
    """The first layer takes the context rows' q/k/v from outside the scan: with depth 1 it is also
    the last layer (the query row only), with depth 3 a full layer runs between it and the last."""
    experts = CausalExperts(5, WIDTH, depth, 2, 4.0, rngs=nnx.Rngs(0), chunks=2)
    (outputs, grads), (ref_outputs, ref_grads) = (_outputs_and_gradients(experts, how)
                                                  for how in ("chunked", "reference"))
    for a, b in zip(outputs, ref_outputs):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
    for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def test_chunk_bounds_are_even_and_clamped():
    assert chunk_bounds(32, 4) == [0, 8, 16, 24, 32]
    assert chunk_bounds(5, 2) == [0, 3, 5]
    assert chunk_bounds(5, 4) == [0, 2, 3, 4, 5]
    assert chunk_bounds(1, 4) == [0, 1]
    with pytest.raises(ValueError, match="chunks"):
        chunk_bounds(4, 0)


@pytest.mark.parametrize("frozen", [2, 3, 5])
def test_chunked_ranges_across_chunk_bounds_equal_one_pass(frozen):
    """Hierarchical training runs [0, frozen) then [frozen, L); a split inside a chunk or on its
    boundary gives the one-pass tokens and slots, and frozen experts still pass X_latent's gradient."""
    experts = make_experts(8, chunks=3)
    x = x_latent()
    full, full_slots = experts(x)
    first, slots = experts(x, stop=frozen, frozen=True)
    second, slots = experts(x, start=frozen, slots=slots)
    np.testing.assert_allclose(jnp.concatenate([first, second], axis=1), full, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(slots, full_slots, rtol=1e-6, atol=1e-6)

    def loss(module, x):
        head, slots = module(x, stop=frozen, frozen=True)
        tail, _ = module(x, start=frozen, slots=slots)
        return jnp.sum(jnp.sin(head)) + jnp.sum(jnp.sin(tail))

    module_grad, x_grad = jax.grad(loss, argnums=(0, 1))(experts, x)
    for leaf in jax.tree.leaves(nnx.state(module_grad)):
        np.testing.assert_array_equal(leaf[:frozen], 0.0)
        assert np.abs(leaf[frozen:]).max() > 0
    assert np.abs(x_grad).max() > 0


def test_split_range_with_slots_equals_one_pass():
    experts = make_experts(8)
    x = x_latent()
    full, full_slots = experts(x)
    first, slots = experts(x, stop=3)
    second, slots = experts(x, start=3, slots=slots)
    np.testing.assert_allclose(jnp.concatenate([first, second], axis=1), full, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(slots, full_slots, rtol=1e-6, atol=1e-6)


def test_remat_changes_nothing_but_memory():
    x = x_latent()
    plain, remat = make_experts(4), make_experts(4, remat=True)

    def loss(module, x):
        return jnp.sum(module(x)[0] ** 2)

    np.testing.assert_allclose(remat(x)[0], plain(x)[0], rtol=1e-6)
    for a, b in zip(jax.tree.leaves(jax.grad(loss)(remat, x)), jax.tree.leaves(jax.grad(loss)(plain, x))):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)  # recomputation may reorder float sums


def test_bad_ranges_raise():
    experts = make_experts(4)
    with pytest.raises(ValueError, match="slots"):
        experts(x_latent(), start=2)
    with pytest.raises(ValueError, match="outside"):
        experts(x_latent(), stop=5)


@pytest.mark.slow
def test_compiled_program_size_does_not_grow_with_token_count():
    """The scan traces one expert whatever L is; the unrolled loop traces L of them."""

    def count(jaxpr) -> int:
        total = 0
        for eqn in jaxpr.eqns:
            total += 1
            for value in eqn.params.values():
                for sub in value if isinstance(value, (tuple, list)) else (value,):
                    inner = getattr(sub, "jaxpr", sub)
                    if hasattr(inner, "eqns"):
                        total += count(inner)
        return total

    def equations(num_experts: int, scan: bool, chunks: int = 1) -> int:
        experts = make_experts(num_experts, scan=scan, chunks=chunks)
        return count(jax.make_jaxpr(jax.grad(lambda m, x: jnp.sum(m(x)[0])))(experts, x_latent()).jaxpr)

    assert equations(32, scan=True) == equations(4, scan=True)
    assert equations(64, scan=True, chunks=4) == equations(8, scan=True, chunks=4)
    assert equations(8, scan=True, chunks=4) > equations(8, scan=True, chunks=2)  # grows with chunks
    assert equations(8, scan=False) > 1.8 * equations(4, scan=False)
