"""The KL-f8 autoencoder (Stable Diffusion's VAE) and its converter from diffusers' layout, against a
PyTorch implementation of the same network written here with diffusers' parameter names."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from nativetok_jax import convert
from nativetok_jax.models.dit.kl_autoencoder import KLAutoencoder, KLAutoencoderConfig, PixelSpace, sample_latents
from nativetok_jax.pretrained import files
from nativetok_jax.pretrained.sd_vae import convert_state_dict, load_sd_vae
from test_lpips import _write_safetensors

nn = torch.nn


class Resnet(nn.Module):
    def __init__(self, cin, cout):
        super().__init__()
        self.norm1, self.conv1 = nn.GroupNorm(32, cin, eps=1e-6), nn.Conv2d(cin, cout, 3, padding=1)
        self.norm2, self.conv2 = nn.GroupNorm(32, cout, eps=1e-6), nn.Conv2d(cout, cout, 3, padding=1)
        self.conv_shortcut = nn.Conv2d(cin, cout, 1) if cin != cout else None

    def forward(self, x):
        h = self.conv2(nn.functional.silu(self.norm2(self.conv1(nn.functional.silu(self.norm1(x))))))
        return (x if self.conv_shortcut is None else self.conv_shortcut(x)) + h


class Attention(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.group_norm = nn.GroupNorm(32, c, eps=1e-6)
        self.to_q, self.to_k, self.to_v = nn.Linear(c, c), nn.Linear(c, c), nn.Linear(c, c)
        self.to_out = nn.ModuleList([nn.Linear(c, c), nn.Dropout(0.0)])

    def forward(self, x):
        b, c, h, w = x.shape
        rows = self.group_norm(x).view(b, c, h * w).transpose(1, 2)
        q, k, v = self.to_q(rows), self.to_k(rows), self.to_v(rows)
        weights = torch.softmax(q @ k.transpose(1, 2) / c**0.5, dim=-1)
        return x + self.to_out[0](weights @ v).transpose(1, 2).reshape(b, c, h, w)


class Mid(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.resnets = nn.ModuleList([Resnet(c, c), Resnet(c, c)])
        self.attentions = nn.ModuleList([Attention(c)])

    def forward(self, x):
        return self.resnets[1](self.attentions[0](self.resnets[0](x)))


class Sampler(nn.Module):
    def __init__(self, c, down):
        super().__init__()
        self.down = down
        self.conv = nn.Conv2d(c, c, 3, stride=2 if down else 1, padding=0 if down else 1)

    def forward(self, x):
        if self.down:
            return self.conv(nn.functional.pad(x, (0, 1, 0, 1)))
        return self.conv(nn.functional.interpolate(x, scale_factor=2.0, mode="nearest"))


class Level(nn.Module):
    def __init__(self, cin, cout, n, sampler):
        super().__init__()
        self.resnets = nn.ModuleList([Resnet(cin if i == 0 else cout, cout) for i in range(n)])
        if sampler == "down":
            self.downsamplers = nn.ModuleList([Sampler(cout, True)])
        if sampler == "up":
            self.upsamplers = nn.ModuleList([Sampler(cout, False)])

    def forward(self, x):
        for block in self.resnets:
            x = block(x)
        for sampler in list(getattr(self, "downsamplers", [])) + list(getattr(self, "upsamplers", [])):
            x = sampler(x)
        return x


class TorchAutoencoderKL(nn.Module):
    """diffusers' AutoencoderKL forward, written from its description (LDM's KL autoencoder)."""

    def __init__(self, widths=(128, 256, 512, 512), layers=2, latent=4):
        super().__init__()
        enc, dec = nn.Module(), nn.Module()
        enc.conv_in = nn.Conv2d(3, widths[0], 3, padding=1)
        enc.down_blocks = nn.ModuleList([Level(widths[max(i - 1, 0)], widths[i], layers,
                                               "down" if i < len(widths) - 1 else None) for i in range(len(widths))])
        enc.mid_block = Mid(widths[-1])
        enc.conv_norm_out, enc.conv_out = nn.GroupNorm(32, widths[-1], eps=1e-6), nn.Conv2d(widths[-1], 2 * latent, 3, padding=1)
        rev = widths[::-1]
        dec.conv_in = nn.Conv2d(latent, rev[0], 3, padding=1)
        dec.mid_block = Mid(rev[0])
        dec.up_blocks = nn.ModuleList([Level(rev[max(i - 1, 0)], rev[i], layers + 1,
                                             "up" if i < len(rev) - 1 else None) for i in range(len(rev))])
        dec.conv_norm_out, dec.conv_out = nn.GroupNorm(32, rev[-1], eps=1e-6), nn.Conv2d(rev[-1], 3, 3, padding=1)
        self.encoder, self.decoder = enc, dec
        self.quant_conv, self.post_quant_conv = nn.Conv2d(2 * latent, 2 * latent, 1), nn.Conv2d(latent, latent, 1)

    def encode(self, x):
        e = self.encoder
        h = e.conv_in(x)
        for level in e.down_blocks:
            h = level(h)
        h = e.conv_out(nn.functional.silu(e.conv_norm_out(e.mid_block(h))))
        mean, logvar = self.quant_conv(h).chunk(2, dim=1)
        return mean, logvar.clamp(-30.0, 20.0)

    def decode(self, z):
        d = self.decoder
        h = d.mid_block(d.conv_in(self.post_quant_conv(z)))
        for level in d.up_blocks:
            h = level(h)
        return d.conv_out(nn.functional.silu(d.conv_norm_out(h)))


def _random_net(seed=0, **sizes):
    torch.manual_seed(seed)
    net = TorchAutoencoderKL(**sizes).eval()
    with torch.no_grad():  # non-trivial norms and biases so a misplaced one shows
        for name, p in net.named_parameters():
            if p.ndim == 1:
                p.copy_((1.0 if "norm" in name and name.endswith("weight") else 0.0) + 0.1 * torch.randn_like(p))
    return net


def _state(net):
    return {k: v.detach().numpy().copy() for k, v in net.state_dict().items()}


def _compare(model, net, images):
    nchw = torch.from_numpy(np.asarray(images).transpose(0, 3, 1, 2).copy())
    with torch.no_grad():
        mean, logvar = net.encode(nchw * 2 - 1)
        decoded = (net.decode(mean) + 1) / 2
    # One compiled program each (op-by-op execution compiles every convolution separately).
    ours_mean, ours_logvar = nnx.jit(lambda m, x: m.encode(x))(model, images)
    s = model.config.scale_factor
    np.testing.assert_allclose(np.asarray(ours_mean).transpose(0, 3, 1, 2) / s, mean.numpy(), rtol=1e-3, atol=1e-3)
    np.testing.assert_allclose(np.asarray(ours_logvar).transpose(0, 3, 1, 2) - 2 * np.log(s), logvar.numpy(),
                               rtol=1e-3, atol=1e-3)
    ours_decoded = nnx.jit(lambda m, z: m.decode(z, clip=False))(model, ours_mean)
    np.testing.assert_allclose(np.asarray(ours_decoded).transpose(0, 3, 1, 2), decoded.numpy(), rtol=1e-3, atol=2e-3)


@pytest.mark.slow
def test_real_names_and_shapes_convert_and_match_pytorch():
    """Stable Diffusion's sizes (83,653,863 parameters) with diffusers' names, on a 16 x 16 image."""
    net = _random_net()
    flat, config = convert_state_dict(_state(net), "sd-vae-ft-ema (random)")
    assert config == KLAutoencoderConfig()
    assert sum(a.size for a in flat.values()) == 83_653_863
    model = files.build_loaded(lambda: KLAutoencoder(config, rngs=nnx.Rngs(0)), flat, source="test")
    images = jax.random.uniform(jax.random.key(0), (1, 16, 16, 3))
    _compare(model, net, images)


SMALL = dict(widths=(32, 64), layers=1, latent=4)


def test_convert_cli_writes_a_file_that_loads_and_matches(tmp_path):
    net = _random_net(1, **SMALL)
    source = tmp_path / "diffusion_pytorch_model.safetensors"
    _write_safetensors(str(source), net.state_dict())
    out = tmp_path / "sd_vae.npz"
    assert convert.main(["sd-vae", str(source), "--out", str(out)]) == 0
    model = load_sd_vae(str(out))
    assert model.config.block_widths == (32, 64) and model.config.layers_per_block == 1
    _compare(model, net, jax.random.uniform(jax.random.key(1), (2, 8, 8, 3)))
    import ml_collections

    from nativetok_jax.pretrained.sd_vae import latent_space

    rescaled = latent_space(ml_collections.ConfigDict(dict(kind="sd_vae", weights=str(out), scale_factor=0.5)))
    assert rescaled.config.scale_factor == 0.5 and rescaled.config.block_widths == (32, 64)
    assert isinstance(latent_space(ml_collections.ConfigDict(dict(kind="pixels"))), PixelSpace)


def test_legacy_attention_names_and_prefix_are_read():
    net = _random_net(2, **SMALL)
    legacy = {}
    for key, value in _state(net).items():
        for new, old in (("to_q", "query"), ("to_k", "key"), ("to_v", "value"), ("to_out.0", "proj_attn")):
            key = key.replace(f".{new}.", f".{old}.")
        legacy["vae." + key] = value
    flat, _ = convert_state_dict(legacy, "legacy")
    reference, _ = convert_state_dict(_state(net), "new")
    assert flat.keys() == reference.keys()
    for key in flat:
        np.testing.assert_array_equal(flat[key], reference[key])


def _compvis(state, levels=2):
    """diffusers' names -> CompVis' LDM names (attention as 1x1 convs, decoder levels finest first)."""
    out = {}
    for key, value in state.items():
        for old, new in ((".conv_shortcut.", ".nin_shortcut."), (".downsamplers.0.", ".downsample."),
                         (".upsamplers.0.", ".upsample."), (".mid_block.resnets.0.", ".mid.block_1."),
                         (".mid_block.resnets.1.", ".mid.block_2."), (".attentions.0.group_norm.", ".attn_1.norm."),
                         (".attentions.0.to_q.", ".attn_1.q."), (".attentions.0.to_k.", ".attn_1.k."),
                         (".attentions.0.to_v.", ".attn_1.v."), (".attentions.0.to_out.0.", ".attn_1.proj_out."),
                         ("mid_block.attn_1", "mid.attn_1"), ("coder.conv_norm_out.", "coder.norm_out.")):
            key = key.replace(old, new)
        if key.startswith("encoder.down_blocks."):
            i, j = key.split(".")[2], key.split(".")[4] if ".resnets." in key else None
            key = key.replace(f"down_blocks.{i}.resnets.{j}.", f"down.{i}.block.{j}.").replace(
                f"down_blocks.{i}.", f"down.{i}.")
        if key.startswith("decoder.up_blocks."):
            i = int(key.split(".")[2])
            key = key.replace(f"up_blocks.{i}.resnets.", f"up.{levels - 1 - i}.block.").replace(
                f"up_blocks.{i}.", f"up.{levels - 1 - i}.")
        if ".attn_1." in key and key.endswith("weight") and value.ndim == 2:
            value = value[:, :, None, None]
        out["first_stage_model." + key] = value
    return out


def test_compvis_layout_converts_to_the_same_weights():
    state = _state(_random_net(4, **SMALL))
    compvis = _compvis(state)
    assert "first_stage_model.decoder.up.1.upsample.conv.weight" in compvis  # the coarsest level, CompVis' top
    assert "first_stage_model.encoder.mid.attn_1.q.weight" in compvis
    flat, _ = convert_state_dict(compvis, "vae-ft-mse-840000-ema-pruned.safetensors")
    reference, _ = convert_state_dict(state, "diffusers")
    assert flat.keys() == reference.keys()
    for key in flat:
        np.testing.assert_array_equal(flat[key], reference[key])


def test_a_wrong_file_names_the_problem(tmp_path):
    state = _state(_random_net(3, **SMALL))
    del state["decoder.conv_out.bias"]
    state["encoder.extra.weight"] = np.zeros(3, np.float32)
    with pytest.raises(files.WeightsError, match=r"1 missing: decoder.conv_out.bias; 1 unexpected: encoder.extra"):
        convert_state_dict(state, "broken.safetensors")
    with pytest.raises(files.WeightsError, match="not a diffusers AutoencoderKL"):
        convert_state_dict({"foo": np.zeros(1)}, "foo.safetensors")


def test_pixel_space_and_posterior_sampling():
    images = jax.random.uniform(jax.random.key(2), (2, 4, 4, 3))
    mean, logvar = PixelSpace().encode(images)
    np.testing.assert_allclose(PixelSpace().decode(mean), images, atol=1e-6)
    z = sample_latents(mean, logvar, jax.random.key(3))
    np.testing.assert_allclose(z, mean, atol=1e-5)
    draws = sample_latents(jnp.zeros((4000,)), jnp.full((4000,), np.log(4.0)), jax.random.key(4))
    assert float(draws.std()) == pytest.approx(2.0, rel=0.05)
