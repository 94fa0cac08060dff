"""Sharding: parameters follow the logical-axis rules, and a (data=2, fsdp=2, model=2) mesh computes
the same forward and backward pass as one device."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from conftest import tiny_config
from nativetok_jax import sharding
from nativetok_jax.config import ConfigError
from nativetok_jax.layers.partitioning import axis_rules
from nativetok_jax.models import build_model


def loss_and_grads(config, mesh, params, graphdef, images):
    from flax import nnx

    def loss(params):
        reconstruction, quantized = nnx.merge(graphdef, params)(images)
        return jnp.mean(jnp.square(reconstruction - images)) + quantized.loss

    with jax.set_mesh(mesh), axis_rules(sharding.rules_of(config)):
        return jax.jit(jax.value_and_grad(loss))(params)


@pytest.mark.parametrize("kind", ["nativetok", "titok"])
def test_sharded_forward_and_backward_equal_single_device(kind):
    config = tiny_config(kind=kind)
    config.mesh.update(data=2, fsdp=2, model=2)
    mesh = sharding.make_mesh(config.mesh)
    assert dict(mesh.shape) == {"data": 2, "fsdp": 2, "model": 2}
    rules = sharding.rules_of(config)
    graphdef, params, _ = sharding.init_sharded(lambda r: build_model(config.model, r), 0, mesh, rules)

    decoder_mlp = params["decoder"]["blocks"]["layers"]["mlp"]["fc1"]["kernel"]  # [layers, embed, mlp]
    assert decoder_mlp.sharding.spec == P(None, "fsdp", "model")
    assert len(decoder_mlp.addressable_shards) == 8 and decoder_mlp.addressable_shards[0].data.shape == (2, 16, 64)

    images = jax.random.uniform(jax.random.key(0), (4, 16, 16, 3), minval=-1, maxval=1)
    sharded_images = jax.device_put(images, sharding.batch_sharding(mesh, images.shape))
    assert sharded_images.sharding.spec == P(("data", "fsdp"), None, None, None)
    loss, grads = loss_and_grads(config, mesh, params, graphdef, sharded_images)

    one_device = jax.devices()[:1]
    single_config = tiny_config(kind=kind)
    single_mesh = sharding.make_mesh(ml_collections.ConfigDict(dict(data=1, fsdp=1, model=1)), devices=one_device)
    single_params = jax.device_put(jax.tree.map(np.asarray, params), one_device[0])
    single_loss, single_grads = loss_and_grads(
        single_config, single_mesh, single_params, graphdef, jax.device_put(images, one_device[0])
    )
    np.testing.assert_allclose(loss, single_loss, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(single_grads)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_dimensions_the_mesh_does_not_divide_stay_replicated():
    from flax import nnx

    config = tiny_config()
    config.model.experts.update(width=12, num_heads=2)
    config.mesh.update(data=1, fsdp=8, model=1)
    mesh = sharding.make_mesh(config.mesh)
    model = nnx.eval_shape(lambda: build_model(config.model, nnx.Rngs(0)))
    shardings = sharding.param_shardings(model, mesh, sharding.rules_of(config))
    assert shardings["decoder"]["token_embedding"]["kernel"].spec == P(None, "fsdp")  # [token_dim, 32]
    assert shardings["experts"]["stack"]["query"].spec == P(None, None)  # [experts, 12]: 8 does not divide 12
    assert shardings["mit"]["dimension_switcher"]["kernel"].spec == P("fsdp", None)  # fsdp used once
    assert shardings["quantizer"]["codebook"].spec == P(None, None)
    assert sharding.batch_sharding(mesh, (3, 16, 16, 3)).spec == P(None, None, None, None)


@pytest.mark.parametrize(
    "mesh, message",
    [
        (dict(data=3, fsdp=1, model=1), "mesh: data\\*fsdp\\*model = 3 but there are 8 devices"),
        (dict(data=-1, fsdp=3, model=1), "mesh.data: cannot fill 8 devices"),
        (dict(data=-1, fsdp=-1, model=1), "only one axis may be -1"),
        (dict(data=0, fsdp=1, model=8), "mesh.data: must be a positive integer or -1"),
    ],
)
def test_bad_mesh_configs_name_the_field(mesh, message):
    with pytest.raises(ConfigError, match=message):
        sharding.make_mesh(ml_collections.ConfigDict(mesh))


def test_rules_naming_an_unknown_mesh_axis_are_a_config_error():
    config = tiny_config()
    config.sharding.rules = (("embed", "tensor"),)
    with pytest.raises(ConfigError, match=r"config.sharding.rules: rule for 'embed' names unknown mesh axes \['tensor'\]"):
        sharding.rules_of(config)
