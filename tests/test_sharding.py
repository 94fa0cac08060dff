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
from nativetok_jax.models.nativetok import build_model


def loss_and_grads(config, mesh, params, graphdef, images):
    from flax import nnx

    def loss(params):
        reconstruction, quantized = nnx.merge(graphdef, params)(images)
        return jnp.mean(jnp.square(reconstruction - images)) + quantized.loss

    with jax.set_mesh(mesh), axis_rules(sharding.rules_of(config)):
        return jax.jit(jax.value_and_grad(loss))(params)


@pytest.mark.slow
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


def _save_params(directory, config, params) -> None:
    import grain

    from nativetok_jax import checkpoints

    checkpoints.write_config(directory, config)
    store = checkpoints.Checkpoints(checkpoints.checkpoint_directory(directory), 1)
    store.save(1, {"step": np.int32(1), "params": params, "ema": {}}, iter(grain.MapDataset.range(2).to_iter_dataset()))
    store.close()


def _shardings(params) -> dict:
    from flax import traverse_util

    return {"/".join(map(str, k)): v.sharding for k, v in traverse_util.flatten_dict(params).items()}


def test_checkpoints_restore_parameters_straight_into_their_shardings(tmp_path, monkeypatch):
    """The loaders restore every parameter into its sharding on the (2, 2, 2) mesh (each host reads
    its own shards), never a whole host copy; a stored array of another shape (an earlier HNT
    stage's fewer experts) is sharded by its own logical axes."""
    from test_dvae_training import dvae_train_config

    from flax import traverse_util

    from nativetok_jax import Tokenizer, checkpoints
    from nativetok_jax.dvae import DVAE

    placements = []
    load_params = checkpoints.load_params

    def recording(*args, **kwargs):
        placements.append(kwargs.get("placement"))
        return load_params(*args, **kwargs)

    monkeypatch.setattr(checkpoints, "load_params", recording)
    config = tiny_config()
    config.mesh.update(data=2, fsdp=2, model=2)
    tokenizer = Tokenizer.from_config(config)
    _save_params(tmp_path / "tokenizer", config, tokenizer.params)
    loaded = Tokenizer.from_checkpoint(str(tmp_path / "tokenizer"))
    assert placements == [placements[0]] and placements[0] is not None  # parameters only, placed
    expected = _shardings(tokenizer.params)
    got = _shardings(loaded.params)
    assert got.keys() == expected.keys()
    for name, placed in got.items():
        assert placed.is_equivalent_to(expected[name], len(placed.spec)), name
    assert any(not s.is_fully_replicated for s in got.values())
    # Fewer experts than the model has: the stored rows sharded by the experts' axes, as restored.
    params, _ = load_params(str(tmp_path / "tokenizer"), placement=placements[0])
    assert all(isinstance(v, jax.Array) for v in jax.tree.leaves(params))
    restored = {"/".join(map(str, k)): v for k, v in traverse_util.flatten_dict(params).items()}
    key = next(k for k in restored if k.startswith("experts/") and restored[k].ndim >= 2)
    path, shape = tuple(key.split("/")), restored[key].shape
    assert restored[key].sharding.is_equivalent_to(expected[key], len(shape))
    smaller = placements[0](path, (shape[0] // 2,) + shape[1:])
    assert smaller.spec == placements[0](path, shape).spec

    dvae_config = dvae_train_config()
    dvae_config.mesh.update(data=2, fsdp=2, model=2)
    dvae = DVAE.from_config(dvae_config)
    _save_params(tmp_path / "dvae", dvae_config, dvae.params)
    loaded = DVAE.from_checkpoint(str(tmp_path / "dvae"))
    assert placements[-1] is not None
    expected, got = _shardings(dvae.params), _shardings(loaded.params)
    assert got.keys() == expected.keys()
    for name, placed in got.items():
        assert placed.is_equivalent_to(expected[name], len(placed.spec)), name
