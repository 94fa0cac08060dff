"""The DiT converter against an implementation we did not write: diffusers' ``DiTTransformer2DModel``
(diffusers 0.42.1, the dev extra) with random weights at its real parameter names, and the same
weights under facebookresearch/DiT's ``models.py`` names (read at commit ed81ce2 of
github.com/facebookresearch/DiT), both converted and run through our DiT and our sampler."""

import os

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from nativetok_jax import checkpoints, convert
from nativetok_jax.diffusion.guidance import guided
from nativetok_jax.models.dit.transformer import dit_from_config, sincos_2d_positions
from nativetok_jax.pretrained import files
from nativetok_jax.pretrained.dit import convert_state_dict
from nativetok_jax.sample import sample_diffusion
from test_lpips import _write_safetensors

diffusers = pytest.importorskip("diffusers")

WIDTH, HEADS, DEPTH, CLASSES, PATCH = 16, 2, 2, 10, 2


def _reference(in_channels=4, side=8, seed=0):
    """A tiny diffusers DiT with every weight random (DiT zero-initialises the modulation and output
    layers, which would make any mapping of them agree), its per-block copies of the one timestep and
    label embedder equal (as in diffusers' converted DiT checkpoints), and the two settings in which
    diffusers' module departs from DiT's ``models.py`` set to DiT's: the second LayerNorm's epsilon
    (``norm_eps``, 1e-5 by default; DiT 1e-6) and the timestep frequencies (diffusers divides the
    exponent by ``half - 1``, ``downscale_freq_shift=1``; DiT by ``half``)."""
    torch.manual_seed(seed)
    model = diffusers.DiTTransformer2DModel(
        num_attention_heads=HEADS, attention_head_dim=WIDTH // HEADS, in_channels=in_channels,
        out_channels=2 * in_channels, num_layers=DEPTH, sample_size=side, patch_size=PATCH,
        num_embeds_ada_norm=CLASSES, norm_eps=1e-6).eval()
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.copy_(0.3 * torch.randn_like(parameter))
        first = model.transformer_blocks[0].norm1.emb
        for block in model.transformer_blocks:
            block.norm1.emb.load_state_dict(first.state_dict())
            block.norm1.emb.time_proj.downscale_freq_shift = 0
    return model


def _dit_names(state, side):
    """The diffusers weights renamed to facebookresearch/DiT's ``models.py`` (its ``DiT`` module)."""
    emb = "transformer_blocks.0.norm1.emb."
    out = {
        "x_embedder.proj.weight": state["pos_embed.proj.weight"], "x_embedder.proj.bias": state["pos_embed.proj.bias"],
        "t_embedder.mlp.0.weight": state[emb + "timestep_embedder.linear_1.weight"],
        "t_embedder.mlp.0.bias": state[emb + "timestep_embedder.linear_1.bias"],
        "t_embedder.mlp.2.weight": state[emb + "timestep_embedder.linear_2.weight"],
        "t_embedder.mlp.2.bias": state[emb + "timestep_embedder.linear_2.bias"],
        "y_embedder.embedding_table.weight": state[emb + "class_embedder.embedding_table.weight"],
        "pos_embed": torch.from_numpy(sincos_2d_positions(WIDTH, side // PATCH))[None],
        "final_layer.adaLN_modulation.1.weight": state["proj_out_1.weight"],
        "final_layer.adaLN_modulation.1.bias": state["proj_out_1.bias"],
        "final_layer.linear.weight": state["proj_out_2.weight"], "final_layer.linear.bias": state["proj_out_2.bias"],
    }
    for i in range(DEPTH):
        b = f"transformer_blocks.{i}."
        for leaf in ("weight", "bias"):
            out[f"blocks.{i}.attn.qkv.{leaf}"] = torch.cat([state[f"{b}attn1.to_{n}.{leaf}"] for n in "qkv"])
            out[f"blocks.{i}.attn.proj.{leaf}"] = state[f"{b}attn1.to_out.0.{leaf}"]
            out[f"blocks.{i}.mlp.fc1.{leaf}"] = state[f"{b}ff.net.0.proj.{leaf}"]
            out[f"blocks.{i}.mlp.fc2.{leaf}"] = state[f"{b}ff.net.2.{leaf}"]
            out[f"blocks.{i}.adaLN_modulation.1.{leaf}"] = state[f"{b}norm1.linear.{leaf}"]
    return out


def _ours(run_directory):
    config = checkpoints.read_config(run_directory)
    params, step = checkpoints.load_params(run_directory)
    assert step == 0
    return files.build_loaded(lambda: dit_from_config(config.model, nnx.Rngs(0)), files.flatten(params),
                              source=run_directory), config


def _inputs(channels=4, side=8, batch=3):
    rng = np.random.default_rng(1)
    x = rng.standard_normal((batch, side, side, channels)).astype(np.float32)
    return x, np.array([0, 417, 999][:batch], np.int32), np.array([3, 0, 9][:batch], np.int32)


def test_diffusers_dit_converts_to_the_same_function_with_guidance(tmp_path):
    reference = _reference()
    path = str(tmp_path / "diffusion_pytorch_model.safetensors")
    _write_safetensors(path, reference.state_dict())
    out = str(tmp_path / "run")
    summary = convert.convert("dit", [path], out, image_size=64, num_heads=HEADS, vae="sd_vae.npz")
    assert "depth 2, width 16, 2 heads, patch 2, 64 px" in summary
    model, config = _ours(out)
    assert (config.task, config.model.num_classes, config.model.learn_sigma) == ("diffusion", CLASSES, True)
    assert config.model.autoencoder.weights == "sd_vae.npz" and config.model.image_size == 64
    s = config.model.sample  # DiT's FID protocol: DDPM-250, guidance 1.5 on the first three channels
    assert (s.method, s.respacing, s.guidance_scale, s.guided_channels) == ("ddpm", "250", 1.5, 3)

    x, t, labels = _inputs()
    nchw = torch.from_numpy(x.transpose(0, 3, 1, 2).copy())
    with torch.no_grad():
        expected = reference(nchw, timestep=torch.from_numpy(t).long(), class_labels=torch.from_numpy(labels).long(),
                             return_dict=False)[0].numpy()
    # float32 sums in another order on another CPU: outputs reach ~5 in magnitude, and 1.3e-4 apart
    # was seen on an AMD EPYC (within 1e-4 elsewhere), so the tolerance is 1e-4 of the outputs' scale.
    atol = 1e-4 * float(np.abs(expected).max())
    np.testing.assert_allclose(np.asarray(model(jnp.asarray(x), jnp.asarray(t), jnp.asarray(labels))).transpose(0, 3, 1, 2),
                               expected, rtol=1e-4, atol=atol)
    # Guidance as diffusers' DiTPipeline does it: [x; x] with [labels; null], every latent channel guided.
    scale = 4.0
    with torch.no_grad():
        both = reference(torch.cat([nchw, nchw]), timestep=torch.from_numpy(np.concatenate([t, t])).long(),
                         class_labels=torch.from_numpy(np.concatenate([labels, np.full(3, CLASSES)])).long(),
                         return_dict=False)[0].numpy()
    eps, rest = both[:, :4], both[:, 4:]
    conditional, unconditional = np.split(eps, 2)
    expected = np.concatenate([unconditional + scale * (conditional - unconditional), rest[:3]], axis=1)
    ours = guided(model, scale, model.null_class)(jnp.asarray(x), jnp.asarray(t), jnp.asarray(labels))
    np.testing.assert_allclose(np.asarray(ours).transpose(0, 3, 1, 2), expected, rtol=1e-4,
                               atol=1e-4 * float(np.abs(expected).max()))


def test_dit_checkpoint_names_convert_to_the_same_arrays_and_its_size_is_read_off_pos_embed(tmp_path):
    state = _reference().state_dict()
    from_diffusers, sizes, _ = convert_state_dict({k: v.numpy() for k, v in state.items()}, "d.safetensors",
                                                  image_size=64, num_heads=HEADS)
    path = str(tmp_path / "DiT-tiny.pt")
    torch.save({"model": _dit_names(state, side=8)}, path)  # a wrapped state dict is unwrapped
    out = str(tmp_path / "run")
    convert.convert("dit", [path], out, num_heads=HEADS)
    params, _ = checkpoints.load_params(out)
    converted = files.flatten(params)
    assert converted.keys() == from_diffusers.keys()
    for key, value in from_diffusers.items():
        np.testing.assert_array_equal(converted[key], value, err_msg=key)
    assert checkpoints.read_config(out).model.image_size == 64  # 4 x 4 positions, patch 2, the VAE's 8


def test_a_converted_pixel_space_dit_samples_through_our_sampler(tmp_path):
    path = str(tmp_path / "pixels.safetensors")
    _write_safetensors(path, _reference(in_channels=3, side=16).state_dict())
    out = str(tmp_path / "run")
    convert.convert("dit", [path], out, image_size=16, num_heads=HEADS)
    config = checkpoints.read_config(out)
    assert config.model.autoencoder.kind == "pixels"
    images = sample_diffusion(out, str(tmp_path / "samples"), sampler="ddim", num_steps=2, guidance_scale=1.5,
                              num_samples=8, batch_size=8)
    assert images.shape == (8, 16, 16, 3) and images.dtype == np.uint8
    assert os.path.exists(tmp_path / "samples" / "samples.npz")


def test_bad_files_are_one_line_errors_naming_the_file_and_the_key(tmp_path):
    state = {k: v.numpy() for k, v in _reference().state_dict().items()}
    with pytest.raises(files.WeightsError, match=r"x\.pt is not a DiT state dict.*x_embedder\.proj\.weight"):
        convert_state_dict({"encoder.conv_in.weight": np.zeros((4, 3, 3, 3))}, "x.pt")
    broken = dict(state)
    broken["transformer_blocks.1.ff.net.2.weight"] = np.zeros((16, 63), np.float32)
    del broken["proj_out_2.bias"]
    with pytest.raises(files.WeightsError) as error:
        convert_state_dict(broken, "y.safetensors", num_heads=HEADS)
    message = str(error.value)
    assert "\n" not in message and message.startswith("y.safetensors")
    assert "missing: proj_out_2.bias" in message and "transformer_blocks.1.ff.net.2.weight (16, 63)" in message
    copies = dict(state)
    copies["transformer_blocks.1.norm1.emb.class_embedder.embedding_table.weight"] = np.zeros((11, 16), np.float32)
    with pytest.raises(files.WeightsError, match="differs from block 0's"):
        convert_state_dict(copies, "z.safetensors", num_heads=HEADS)
    with pytest.raises(files.WeightsError, match="head count"):
        convert_state_dict(state, "w.safetensors")  # width 16: in no DiT table, not a multiple of 64
    assert convert.main(["dit", str(tmp_path / "absent.pt"), "--out", str(tmp_path / "o")]) == 1
    path = str(tmp_path / "d.safetensors")
    _write_safetensors(path, _reference().state_dict())  # 8 x 8 latents of 64 px, not of 36 px
    assert convert.main(["dit", path, "--out", str(tmp_path / "o"), "--num_heads", "2", "--image_size", "36"]) == 1
    with pytest.raises(files.WeightsError, match="--vae: only the dit converter uses it"):
        convert.convert("titok", ["t.bin"], str(tmp_path / "o"), vae="sd_vae.npz")


def test_dit_xl2_sizes_are_read_off_the_released_shapes():
    """diffusers' facebook/DiT-XL-2-256 shapes (zero-stride arrays: nothing allocated) give DiT-XL/2's
    sizes, and the run config builds DiT's 675,129,632 parameters (positions included)."""
    from nativetok_jax.models.dit.transformer import parameter_count
    from nativetok_jax.pretrained.dit import _sizes, run_config

    width, depth = 1152, 28
    shapes = {"pos_embed.proj.weight": (width, 4, 2, 2), "proj_out_2.weight": (2 * 2 * 8, width),
              "transformer_blocks.0.norm1.emb.class_embedder.embedding_table.weight": (1001, width),
              "transformer_blocks.0.ff.net.0.proj.weight": (4 * width, width)}
    shapes.update({f"transformer_blocks.{i}.norm1.linear.weight": (6 * width, width) for i in range(depth)})
    source = {name: np.broadcast_to(np.float32(0), shape) for name, shape in shapes.items()}
    sizes = _sizes(source, "diffusers", "x.safetensors", image_size=None, num_heads=None)
    assert (sizes["depth"], sizes["width"], sizes["num_heads"], sizes["patch_size"]) == (28, 1152, 16, 2)
    assert (sizes["num_classes"], sizes["learn_sigma"], sizes["image_size"]) == (1000, True, 256)
    config = run_config(sizes)
    assert config.model.size == "XL"
    assert parameter_count(nnx.eval_shape(lambda: dit_from_config(config.model, nnx.Rngs(0)))) == 675_129_632
