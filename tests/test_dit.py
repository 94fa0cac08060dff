"""DiT in Flax NNX against DiT's facts and an independent PyTorch implementation."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from nativetok_jax.config import ConfigError, dit_latent_shape, dit_model_config, validate_dit_model
from nativetok_jax.diffusion.guidance import guided
from nativetok_jax.layers.transformer import slice_stack
from nativetok_jax.models.dit.transformer import DiT, dit, dit_from_config, parameter_count, sincos_2d_positions

TINY = dict(input_size=8, in_channels=4, patch_size=2, width=32, depth=2, num_heads=4, num_classes=5)


def _inputs(batch=3, key=0):
    k1, k2 = jax.random.split(jax.random.key(key))
    x = jax.random.normal(k1, (batch, 8, 8, 4))
    t = jnp.array([0, 500, 999, 250, 10, 700][:batch])
    labels = jnp.array([0, 4, 5, 2, 1, 3][:batch])  # 5 = the null class
    return x, t, labels


def _randomised(model, scale=0.2, seed=1):
    """Every parameter random, so no zero-initialised layer hides a mismatch."""
    graphdef, state = nnx.split(model)
    leaves, tree = jax.tree.flatten(state)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    leaves = [scale * jax.random.normal(k, leaf.shape) for k, leaf in zip(keys, leaves)]
    return nnx.merge(graphdef, jax.tree.unflatten(tree, leaves))


def test_output_is_exactly_zero_at_initialisation():
    model = DiT(**TINY, rngs=nnx.Rngs(0))
    out = model(*_inputs())
    assert out.shape == (3, 8, 8, 8) and out.dtype == jnp.float32
    assert np.all(np.asarray(out) == 0.0)


def test_scanned_equals_unrolled_and_remat():
    model = _randomised(DiT(**TINY, rngs=nnx.Rngs(0)))
    x, t, labels = _inputs()
    scanned = model(x, t, labels)
    c = model.condition(t, labels)
    rows = model.embed(x)
    for i in range(model.depth):
        rows = slice_stack(model.blocks, i)(rows, c)
    np.testing.assert_allclose(model.readout(rows, c), scanned, rtol=1e-5, atol=1e-5)
    remat = _randomised(DiT(**TINY, remat=True, unroll=True, rngs=nnx.Rngs(0)))

    def loss(m):
        return jnp.square(m(x, t, labels)).mean()
    np.testing.assert_allclose(remat(x, t, labels), scanned, rtol=1e-5, atol=1e-5)
    g1, g2 = nnx.grad(loss)(model), nnx.grad(loss)(remat)
    for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g2)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("size,expected", [("B", 130_512_416), ("L", 458_102_816), ("XL", 675_129_632)])
def test_parameter_counts_are_dits(size, expected):
    model = nnx.eval_shape(lambda: dit(size, patch_size=2, rngs=nnx.Rngs(0)))
    assert parameter_count(model) == expected


def test_every_parameter_has_logical_axes_and_blocks_are_stacked():
    model = nnx.eval_shape(lambda: DiT(**TINY, rngs=nnx.Rngs(0)))
    for path, variable in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        axes = variable.get_metadata().get("out_sharding")
        assert axes is not None and len(axes) == variable.ndim, path
        if path[0] == "blocks":
            assert axes[0] == "layers" and variable.shape[0] == TINY["depth"], path


def test_bad_inputs_name_the_problem():
    model = DiT(**TINY, rngs=nnx.Rngs(0))
    x, t, labels = _inputs()
    with pytest.raises(ValueError, match="x must be"):
        model(x[:, :4], t, labels)
    with pytest.raises(ValueError, match="t and labels"):
        model(x, t[:2], labels)
    with pytest.raises(ValueError, match="patch_size"):
        DiT(**{**TINY, "patch_size": 3}, rngs=nnx.Rngs(0))


def test_sincos_positions_match_mae_layout():
    positions = sincos_2d_positions(8, 3)  # [9, 8]; channels 0-3 the column, 4-7 the row
    assert positions.shape == (9, 8)
    np.testing.assert_allclose(positions[4, :2], np.sin([1.0, 1.0 / 100]), rtol=1e-6)  # patch (1, 1)
    np.testing.assert_allclose(positions[5, :2], np.sin([2.0, 2.0 / 100]), rtol=1e-6)  # column 2
    np.testing.assert_allclose(positions[5, 4:6], np.sin([1.0, 1.0 / 100]), rtol=1e-6)  # row 1


# --- An independent PyTorch DiT, written from the paper and facebookresearch/DiT's models.py. ---

class TorchDiT(torch.nn.Module):
    def __init__(self, input_size, in_channels, patch_size, width, depth, num_heads, num_classes):
        super().__init__()
        self.p, self.c, self.heads = patch_size, in_channels, num_heads
        self.out_channels = 2 * in_channels
        self.x_embedder = torch.nn.Conv2d(in_channels, width, patch_size, stride=patch_size)
        self.t1, self.t2 = torch.nn.Linear(256, width), torch.nn.Linear(width, width)
        self.y_embedder = torch.nn.Embedding(num_classes + 1, width)
        grid = input_size // patch_size
        self.register_buffer("pos", torch.from_numpy(self._positions(width, grid)).float())
        self.blocks = torch.nn.ModuleList([torch.nn.ModuleDict(dict(
            qkv=torch.nn.Linear(width, 3 * width), proj=torch.nn.Linear(width, width),
            fc1=torch.nn.Linear(width, 4 * width), fc2=torch.nn.Linear(4 * width, width),
            ada=torch.nn.Linear(width, 6 * width))) for _ in range(depth)])
        self.final_ada = torch.nn.Linear(width, 2 * width)
        self.final_linear = torch.nn.Linear(width, patch_size * patch_size * self.out_channels)

    @staticmethod
    def _positions(dim, grid):
        def one_d(d, pos):
            omega = 1.0 / 10000 ** (np.arange(d // 2) / (d / 2.0))
            out = np.einsum("m,d->md", pos.reshape(-1), omega)
            return np.concatenate([np.sin(out), np.cos(out)], axis=1)
        gw, gh = np.meshgrid(np.arange(grid, dtype=np.float64), np.arange(grid, dtype=np.float64))
        return np.concatenate([one_d(dim // 2, gw), one_d(dim // 2, gh)], axis=1)

    def forward(self, x, t, y):
        n = x.shape[0]
        h = self.x_embedder(x).flatten(2).transpose(1, 2) + self.pos
        half = 128
        freqs = torch.exp(-np.log(10000) * torch.arange(half, dtype=torch.float32) / half)
        args = t[:, None].float() * freqs[None]
        temb = self.t2(torch.nn.functional.silu(self.t1(torch.cat([torch.cos(args), torch.sin(args)], -1))))
        c = temb + self.y_embedder(y)
        ln = lambda z: torch.nn.functional.layer_norm(z, z.shape[-1:], eps=1e-6)  # noqa: E731
        for b in self.blocks:
            s1, sc1, g1, s2, sc2, g2 = b["ada"](torch.nn.functional.silu(c)).chunk(6, dim=1)
            a = ln(h) * (1 + sc1[:, None]) + s1[:, None]
            qkv = b["qkv"](a).reshape(n, -1, 3, self.heads, a.shape[-1] // self.heads).permute(2, 0, 3, 1, 4)
            att = torch.nn.functional.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2])
            h = h + g1[:, None] * b["proj"](att.transpose(1, 2).reshape(n, -1, a.shape[-1]))
            m = ln(h) * (1 + sc2[:, None]) + s2[:, None]
            h = h + g2[:, None] * b["fc2"](torch.nn.functional.gelu(b["fc1"](m), approximate="tanh"))
        shift, scale = self.final_ada(torch.nn.functional.silu(c)).chunk(2, dim=1)
        out = self.final_linear(ln(h) * (1 + scale[:, None]) + shift[:, None])
        g = int(out.shape[1] ** 0.5)
        out = out.reshape(n, g, g, self.p, self.p, self.out_channels)
        return torch.einsum("nhwpqc->nchpwq", out).reshape(n, self.out_channels, g * self.p, g * self.p)

    def forward_with_cfg(self, x, t, y, cfg_scale):
        """DiT's: guidance on the first 3 channels of a doubled batch."""
        half = x[: len(x) // 2]
        out = self.forward(torch.cat([half, half]), t, y)
        eps, rest = out[:, :3], out[:, 3:]
        cond, uncond = torch.split(eps, len(eps) // 2)
        half_eps = uncond + cfg_scale * (cond - uncond)
        return torch.cat([torch.cat([half_eps, half_eps]), rest], dim=1)


def _to_torch(model: DiT) -> TorchDiT:
    net = TorchDiT(**TINY)
    w, p, c = model.width, model.patch_size, model.in_channels
    t = lambda a: torch.from_numpy(np.array(a, dtype=np.float32))  # noqa: E731
    sd = {
        "x_embedder.weight": t(np.asarray(model.patch_embedding.kernel[...]).reshape(p, p, c, w).transpose(3, 2, 0, 1)),
        "x_embedder.bias": t(model.patch_embedding.bias[...]),
        "t1.weight": t(model.timestep_embedder.fc1.kernel[...].T), "t1.bias": t(model.timestep_embedder.fc1.bias[...]),
        "t2.weight": t(model.timestep_embedder.fc2.kernel[...].T), "t2.bias": t(model.timestep_embedder.fc2.bias[...]),
        "y_embedder.weight": t(model.label_embedding[...]),
        "final_ada.weight": t(model.final_layer.modulation.kernel[...].T),
        "final_ada.bias": t(model.final_layer.modulation.bias[...]),
        "final_linear.weight": t(model.final_layer.linear.kernel[...].T),
        "final_linear.bias": t(model.final_layer.linear.bias[...]),
        "pos": net.pos,
    }
    for i in range(model.depth):
        blk = slice_stack(model.blocks, i)
        att = blk.attention
        sd[f"blocks.{i}.qkv.weight"] = t(np.concatenate(
            [np.asarray(v[...]).reshape(w, w).T for v in (att.query, att.key, att.value)]))
        sd[f"blocks.{i}.qkv.bias"] = t(np.concatenate(
            [np.asarray(v[...]).reshape(w) for v in (att.query_bias, att.key_bias, att.value_bias)]))
        sd[f"blocks.{i}.proj.weight"] = t(np.asarray(att.out[...]).reshape(w, w).T)
        sd[f"blocks.{i}.proj.bias"] = t(att.out_bias[...])
        for name, dense in (("fc1", blk.mlp.fc1), ("fc2", blk.mlp.fc2), ("ada", blk.modulation)):
            sd[f"blocks.{i}.{name}.weight"] = t(dense.kernel[...].T)
            sd[f"blocks.{i}.{name}.bias"] = t(dense.bias[...])
    net.load_state_dict(sd)
    return net


def test_matches_an_independent_pytorch_dit_with_guidance():
    model = _randomised(DiT(**TINY, rngs=nnx.Rngs(0)))
    net = _to_torch(model)
    x, t, labels = _inputs(batch=3)
    nchw = lambda a: torch.from_numpy(np.asarray(a).transpose(0, 3, 1, 2).copy())  # noqa: E731
    with torch.no_grad():
        reference = net(nchw(x), torch.from_numpy(np.array(t)), torch.from_numpy(np.array(labels)))
    np.testing.assert_allclose(np.asarray(model(x, t, labels)).transpose(0, 3, 1, 2), reference.numpy(),
                               rtol=1e-4, atol=1e-4)
    # Guidance: DiT's forward_with_cfg on [x; x] with labels [y; null] vs ours on x alone.
    labels = jnp.array([0, 4, 2])
    doubled_labels = torch.from_numpy(np.concatenate([np.asarray(labels), np.full(3, 5)]))
    with torch.no_grad():
        reference = net.forward_with_cfg(nchw(jnp.concatenate([x, x])), torch.from_numpy(np.array(jnp.concatenate([t, t]))),
                                         doubled_labels, 4.0)[:3]
    ours = guided(model, 4.0, model.null_class, guided_channels=3)(x, t, labels)
    np.testing.assert_allclose(np.asarray(ours).transpose(0, 3, 1, 2), reference.numpy(), rtol=1e-4, atol=1e-4)


def test_label_dropout_uses_the_null_class():
    model = nnx.eval_shape(lambda: DiT(**TINY, rngs=nnx.Rngs(0)))
    dropped = model.drop_labels(jnp.zeros(10_000, jnp.int32), jax.random.key(0), 0.1)
    assert set(np.unique(dropped)) == {0, 5}
    assert float((dropped == 5).mean()) == pytest.approx(0.1, abs=0.01)


@pytest.mark.parametrize("arg,expected", [("B", 130_512_416), ("XL/2", 675_129_632), ("S/8", None)])
def test_config_builds_the_named_dit(tmp_path, arg, expected):
    import importlib.util
    import os

    spec = importlib.util.spec_from_file_location("dit_config", os.path.join(os.path.dirname(__file__), os.pardir,
                                                                             "configs", "dit.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config(arg)
    weights = tmp_path / "vae.npz"
    weights.write_bytes(b"")
    config.model.autoencoder.weights = str(weights)
    model = nnx.eval_shape(lambda: dit_from_config(config.model, nnx.Rngs(0)))
    assert model.input_size == 32 and model.in_channels == 4 and model.dtype == jnp.bfloat16
    if expected:
        assert parameter_count(model) == expected
    else:
        assert model.patch_size == 8 and model.width == 384


def test_config_errors_name_the_field(tmp_path):
    model = dit_model_config("S", 2)
    with pytest.raises(ConfigError, match="model.autoencoder.weights"):
        validate_dit_model(model)
    model.autoencoder.kind = "pixels"
    model.image_size = 32
    validate_dit_model(model)
    assert dit_latent_shape(model) == (32, 32, 3)
    for field, value, message in [("patch_size", 3, "model.patch_size"), ("width", 390, "model.width"),
                                  ("sample.respacing", "ddim2000", "model.sample.respacing"),
                                  ("sample.guided_channels", 4, "model.sample.guided_channels"),
                                  ("diffusion.schedule", "sqrt", "model.diffusion.schedule")]:
        broken = dit_model_config("S", 2)
        broken.autoencoder.kind = "pixels"
        broken.image_size = 32
        section, _, name = field.rpartition(".")
        (broken[section] if section else broken)[name] = value
        with pytest.raises(ConfigError, match=message):
            validate_dit_model(broken)
    with pytest.raises(ConfigError, match="model.size"):
        dit_model_config("XXL")


def test_sharded_dit_samples_with_guidance_independently_of_the_batch_and_in_bfloat16():
    """The real DiT through ``make_sampler``: parameters sharded over (data, fsdp, model) = (2, 2, 2);
    sample i is the same alone and in a batch of 8; bfloat16 compute keeps float32 diffusion arithmetic."""
    import ml_collections

    from nativetok_jax.config import DEFAULT_RULES
    from nativetok_jax.diffusion.gaussian import build_diffusion
    from nativetok_jax.diffusion.samplers import make_sampler
    from nativetok_jax.layers.partitioning import axis_rules
    from nativetok_jax.sharding import batch_sharding, init_sharded, make_mesh

    mesh = make_mesh(ml_collections.ConfigDict(dict(data=2, fsdp=2, model=2)))
    build = lambda rngs: _randomised(DiT(**TINY, rngs=rngs), scale=0.05)  # noqa: E731
    graphdef, params, _ = init_sharded(build, 0, mesh, DEFAULT_RULES)
    assert not params["blocks"]["mlp"]["fc1"]["kernel"].sharding.is_fully_replicated
    bfloat16 = nnx.split(nnx.eval_shape(lambda: DiT(**TINY, dtype=jnp.bfloat16, rngs=nnx.Rngs(0))))[0]
    diffusion = build_diffusion(respacing="ddim4")

    def sampler_of(graph):
        def apply_fn(p, x, t, y):
            return nnx.merge(graph, p)(x, t, y)
        return make_sampler(apply_fn, diffusion, (8, 8, 4), method="ddim", eta=1.0, guidance_scale=3.0, null_label=5)

    labels = jnp.array([0, 1, 2, 3, 4, 0, 1, 2])
    key = jax.random.key(3)
    with axis_rules(DEFAULT_RULES), jax.set_mesh(mesh):
        sampler = sampler_of(graphdef)
        batch = sampler(params, jax.device_put(labels, batch_sharding(mesh, labels.shape)), key)
        alone = sampler(params, labels[5:6], key, jnp.array([5]))
        half = sampler_of(bfloat16)(params, labels, key)
    assert batch.dtype == jnp.float32 and batch.shape == (8, 8, 8, 4)
    np.testing.assert_allclose(alone[0], batch[5], rtol=1e-4, atol=1e-4)
    assert not np.allclose(batch[0], batch[5], rtol=1e-2, atol=1e-2)  # same label, other index
    assert half.dtype == jnp.float32 and np.all(np.isfinite(half))
    assert np.corrcoef(np.ravel(half), np.ravel(batch))[0, 1] > 0.99  # bfloat16 network, same samples nearly


def test_a_tiny_dit_learns_under_the_diffusion_loss():
    """DiT + diffusion_loss + AdamW wired together: the held-out eps-MSE of a fixed batch falls."""
    import optax

    from nativetok_jax.diffusion.gaussian import build_diffusion
    from nativetok_jax.diffusion.losses import diffusion_loss, eps_mse_at

    model = DiT(**TINY, rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(model)
    diffusion = build_diffusion()
    x0 = jnp.tile(jnp.linspace(-1, 1, 8)[None, :, None, None], (4, 1, 8, 4)) * jnp.array([1, -1, 0.5, 0])
    labels = jnp.array([0, 1, 2, 3])
    optimizer = optax.adamw(3e-3, b1=0.9, b2=0.999, weight_decay=0.0)

    def apply(p):
        return lambda x, t, y: nnx.merge(graphdef, p)(x, t, y)

    @jax.jit
    def step(p, state, key):
        (loss, metrics), grads = jax.value_and_grad(
            lambda q: diffusion_loss(apply(q), diffusion, x0, labels, key), has_aux=True)(p)
        updates, state = optimizer.update(grads, state, p)
        return optax.apply_updates(p, updates), state, metrics

    @jax.jit
    def held_out(p):
        keys = jax.random.split(jax.random.key(99), 3)
        return jnp.mean(jnp.stack([eps_mse_at(apply(p), diffusion, x0, labels, k, s)
                                   for k, s in zip(keys, (100, 500, 900))]))

    before = float(held_out(params))
    state = optimizer.init(params)
    for i in range(60):
        params, state, metrics = step(params, state, jax.random.key(i))
        assert np.isfinite(float(metrics["loss"]))
    after = float(held_out(params))
    assert before == pytest.approx(1.0, abs=0.15)  # the zero output at initialisation predicts no noise
    assert after < 0.8 * before, (before, after)
