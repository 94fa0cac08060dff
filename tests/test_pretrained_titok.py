"""The TiTok converter against a PyTorch rendering of TiTok's released tokenizer, written here from
bytedance/1d-tokenizer's source at commit 942a96fbdd873780179d1b78d5462911528bf8c8
(``modeling/titok.py`` ``TiTok`` with ``finetune_decoder``, ``modeling/modules/blocks.py``
``TiTokEncoder`` / ``TiTokDecoder`` with ``is_legacy``, ``ResidualAttentionBlock``,
``modeling/quantizer/quantizer.py`` ``VectorQuantizer`` with ``use_l2_norm``). Its parameters carry
the release's names and shapes (tiny widths, random values); the MaskGIT-VQGAN pixel decoder is
``test_vqgan``'s PyTorch VQGAN, the same port."""

from collections import OrderedDict

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from nativetok_jax import checkpoints, convert
from nativetok_jax.config import ConfigError, TITOK_RELEASES, load_config_file, titok_release_config
from nativetok_jax.models.nativetok import build_model
from nativetok_jax.pretrained import files
from nativetok_jax.pretrained.proxy import load_proxy_decoder
from nativetok_jax.pretrained.titok import convert_state_dict
from nativetok_jax.tokenizer import Tokenizer
from test_vqgan import TorchVQGAN, randomize, torch_decode

nn, F = torch.nn, torch.nn.functional
IMAGE, PATCH, WIDTH, DEPTH, HEADS, TOKENS, CODES, TOKEN_DIM = 32, 8, 128, 2, 2, 4, 8, 4
GRID = IMAGE // PATCH


class ResidualAttentionBlock(nn.Module):
    """CLIP's block as TiTok uses it: sequence-first ``nn.MultiheadAttention``, exact GELU."""

    def __init__(self, width, heads):
        super().__init__()
        self.ln_1, self.ln_2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.attn = nn.MultiheadAttention(width, heads)
        self.mlp = nn.Sequential(OrderedDict([("c_fc", nn.Linear(width, 4 * width)), ("gelu", nn.GELU()),
                                              ("c_proj", nn.Linear(4 * width, width))]))

    def forward(self, x):  # [L, N, D]
        h = self.ln_1(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        return x + self.mlp(self.ln_2(x))


class Tower(nn.Module):
    def __init__(self):
        super().__init__()
        self.class_embedding = nn.Parameter(torch.zeros(1, WIDTH))
        self.positional_embedding = nn.Parameter(torch.zeros(GRID**2 + 1, WIDTH))
        self.latent_token_positional_embedding = nn.Parameter(torch.zeros(TOKENS, WIDTH))
        self.ln_pre, self.ln_post = nn.LayerNorm(WIDTH), nn.LayerNorm(WIDTH)
        self.transformer = nn.ModuleList([ResidualAttentionBlock(WIDTH, HEADS) for _ in range(DEPTH)])

    def blocks(self, x):
        x = self.ln_pre(x).permute(1, 0, 2)
        for block in self.transformer:
            x = block(x)
        return x.permute(1, 0, 2)


class Encoder(Tower):
    def __init__(self):
        super().__init__()
        self.patch_embed = nn.Conv2d(3, WIDTH, PATCH, stride=PATCH)
        self.conv_out = nn.Conv2d(WIDTH, TOKEN_DIM, 1)

    def forward(self, pixels, latent_tokens):  # pixels NCHW in [0, 1]
        b = pixels.shape[0]
        x = self.patch_embed(pixels).reshape(b, WIDTH, -1).permute(0, 2, 1)
        x = torch.cat([self.class_embedding[None].expand(b, -1, -1), x], 1) + self.positional_embedding
        latents = latent_tokens[None].expand(b, -1, -1) + self.latent_token_positional_embedding
        x = self.blocks(torch.cat([x, latents], 1))
        latents = self.ln_post(x[:, 1 + GRID**2:]).reshape(b, WIDTH, TOKENS, 1)  # is_legacy: no transpose
        return self.conv_out(latents).reshape(b, TOKEN_DIM, 1, TOKENS)


class Decoder(Tower):
    def __init__(self):
        super().__init__()
        self.decoder_embed = nn.Linear(TOKEN_DIM, WIDTH)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, WIDTH))
        self.ffn = nn.Sequential(nn.Conv2d(WIDTH, 2 * WIDTH, 1), nn.Tanh(), nn.Conv2d(2 * WIDTH, 16, 1))

    def forward(self, z):  # [B, D, 1, L]
        b, c, h, w = z.shape
        x = self.decoder_embed(z.reshape(b, c * h, w).permute(0, 2, 1))
        masks = self.mask_token.repeat(b, GRID**2, 1)
        masks = torch.cat([self.class_embedding[None].expand(b, -1, -1), masks], 1) + self.positional_embedding
        x = self.blocks(torch.cat([masks, x + self.latent_token_positional_embedding[:w]], 1))
        x = self.ln_post(x[:, 1:1 + GRID**2]).permute(0, 2, 1).reshape(b, WIDTH, GRID, GRID)
        return self.ffn(x)  # logits over the VQGAN's codes, [B, K, g, g]


class TorchTiTok(nn.Module):
    def __init__(self, seed=0):
        super().__init__()
        self.latent_tokens = nn.Parameter(torch.zeros(TOKENS, WIDTH))
        self.encoder, self.decoder = Encoder(), Decoder()
        self.quantize = nn.Module()
        self.quantize.embedding = nn.Embedding(CODES, TOKEN_DIM)
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for name, p in self.named_parameters():
                noise = torch.randn(p.shape, generator=generator)
                if name.endswith("ln_1.weight") or name.endswith("ln_2.weight") or ".ln_" in name and "weight" in name:
                    p.copy_(1.0 + 0.1 * noise)
                elif p.ndim >= 2 and "embedding" not in name and "token" not in name:
                    p.copy_(noise / np.sqrt(p[0].numel()))
                else:
                    p.copy_(0.5 * noise)
        vqgan = TorchVQGAN(filters=32, blocks=1, multipliers=(1, 1, 2, 2), dim=8, codes=16).eval()
        randomize(vqgan, seed=seed + 1)
        self.pixel_decoder, self.pixel_quantize = vqgan.decoder, vqgan.quantize

    def encode(self, pixels):
        z = self.encoder(pixels, self.latent_tokens)
        z = F.normalize(z.permute(0, 2, 3, 1).reshape(-1, TOKEN_DIM), dim=-1)
        codebook = F.normalize(self.quantize.embedding.weight, dim=-1)
        distances = z.pow(2).sum(1, keepdim=True) + codebook.pow(2).sum(1) - 2 * z @ codebook.T
        return z.reshape(-1, TOKENS, TOKEN_DIM), distances.argmin(1).reshape(-1, TOKENS)

    def decode(self, ids):
        z = F.normalize(self.quantize.embedding(ids), dim=-1)  # [B, L, D]
        logits = self.decoder(z.reshape(ids.shape[0], 1, TOKENS, TOKEN_DIM).permute(0, 3, 1, 2))
        x = torch.einsum("nchw,cd->ndhw", logits.softmax(1), self.pixel_quantize.embedding.weight)
        return logits, torch_decode(self.pixel_decoder, x)  # pixels in [0, 1] (unclipped)


@pytest.fixture(scope="module")
def reference():
    return TorchTiTok().eval()


@pytest.fixture(scope="module")
def converted(reference, tmp_path_factory):
    directory = tmp_path_factory.mktemp("titok")
    path = str(directory / "tokenizer_titok_tiny.bin")
    torch.save(reference.state_dict(), path)
    out = str(directory / "run")
    assert convert.main(["titok", path, "--out", out]) == 0
    return out


def _images(count=3, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (count, IMAGE, IMAGE, 3), dtype=np.uint8)


def test_converted_titok_encodes_and_decodes_as_the_reference(reference, converted):
    images = _images()
    pixels = torch.from_numpy(images.transpose(0, 3, 1, 2).astype(np.float32) / 255.0)
    with torch.no_grad():
        continuous, ids = reference.encode(pixels)
        logits, decoded = reference.decode(ids)
    config = checkpoints.read_config(converted)
    assert (config.model.kind, config.model.num_tokens, config.model.legacy_token_layout) == ("titok", TOKENS, True)
    params, _ = checkpoints.load_params(converted)
    model = files.build_loaded(lambda: build_model(config.model, nnx.Rngs(0)), files.flatten(params), source=converted)
    ours = model.encode(jnp.asarray(images, jnp.float32) / 127.5 - 1.0)
    np.testing.assert_allclose(np.asarray(ours.continuous), continuous.numpy(), rtol=1e-4, atol=1e-5)
    np.testing.assert_array_equal(np.asarray(ours.ids), ids.numpy())
    our_logits = model.decode_ids(jnp.asarray(ids.numpy()))
    np.testing.assert_allclose(np.asarray(our_logits), logits.numpy().transpose(0, 2, 3, 1), rtol=1e-4, atol=1e-4)
    proxy = load_proxy_decoder(config)  # the pixel decoder the run directory names
    ours_pixels = (np.asarray(proxy.readout(proxy.features(our_logits))) + 1.0) / 2.0
    np.testing.assert_allclose(ours_pixels, decoded.numpy().transpose(0, 2, 3, 1), rtol=1e-4, atol=1e-4)
    # The public interface evaluate uses reads the run directory as a training run's.
    tokenizer = Tokenizer.from_checkpoint(converted)
    np.testing.assert_array_equal(np.asarray(tokenizer.encode(images)), ids.numpy())
    expected = np.clip(decoded.numpy().transpose(0, 2, 3, 1) * 255.0, 0, 255)
    assert np.abs(np.asarray(tokenizer.decode(ids.numpy())).astype(np.float32) - expected).max() <= 1.0


def test_evaluate_judges_a_converted_titok(converted, tmp_path):
    from nativetok_jax.evaluate import run_evaluation

    report = run_evaluation(converted, "photos", str(tmp_path / "eval.json"), num_images=2, batch_size=2, prefix=False)
    assert report["num_images"] == 2 and report["protocol"]["image_size"] == IMAGE and np.isfinite(report["psnr"])


def test_state_dict_round_trips_every_name(reference):
    state = {k: v.numpy() for k, v in reference.state_dict().items()}
    flat, config, vqgan, _ = convert_state_dict(state, "t.bin")
    # Every array of the release lands somewhere: the number of values matches, less what is folded
    # (the latent tokens' positions) and plus what TiTok has not (our hidden token, the VQGAN encoder).
    titok_values = sum(v.size for k, v in state.items() if not k.startswith("pixel_"))
    assert sum(v.size for v in flat.values()) == titok_values - TOKENS * WIDTH + WIDTH
    np.testing.assert_array_equal(flat["decoder/hidden_token"], 0)
    np.testing.assert_array_equal(flat["quantizer/codebook"], state["quantize.embedding.weight"])
    np.testing.assert_array_equal(flat["decoder/grid_position"], state["decoder.positional_embedding"])
    np.testing.assert_array_equal(vqgan["quantizer/codebook"], state["pixel_quantize.embedding.weight"])
    assert (config.model.image_size, config.model.patch_size, config.model.encoder.num_heads) == (IMAGE, PATCH, HEADS)
    assert config.model.decoder.head_hidden == 2 * WIDTH and config.model.norm_epsilon == 1e-5


def test_bad_files_are_one_line_errors_naming_the_file_and_the_key(reference):
    state = {k: v.numpy() for k, v in reference.state_dict().items()}
    with pytest.raises(files.WeightsError, match=r"x\.bin is not a TiTok tokenizer state dict: it has no "
                                                 r"'encoder\.class_embedding'"):
        convert_state_dict({"latent_tokens": state["latent_tokens"]}, "x.bin")
    broken = dict(state)
    broken["decoder.transformer.1.attn.in_proj_weight"] = np.zeros((3 * WIDTH, WIDTH + 1), np.float32)
    del broken["encoder.ln_post.bias"]
    with pytest.raises(files.WeightsError) as error:
        convert_state_dict(broken, "y.bin")
    message = str(error.value)
    assert "\n" not in message and message.startswith("y.bin")
    assert "missing: encoder.ln_post.bias" in message and "decoder.transformer.1.attn.in_proj_weight (384, 129)" in message
    with pytest.raises(files.WeightsError, match="non-legacy TiTok"):
        convert_state_dict({**state, "decoder.conv_out.weight": np.zeros((3, 3, 3, 3))}, "z.bin")


@pytest.mark.parametrize("release", sorted(TITOK_RELEASES))
def test_configs_titok_names_each_release(release):
    config = load_config_file(f"configs/titok.py:{release}")
    size, tokens = TITOK_RELEASES[release]
    widths = {"S": (512, 8, 8), "B": (768, 12, 12), "L": (1024, 24, 16)}[size]
    for tower in (config.model.encoder, config.model.decoder):
        assert (tower.width, tower.depth, tower.num_heads) == widths
    assert config.model.num_tokens == tokens and config.model.decoder.head == "proxy_codes"
    assert (config.model.quantizer.codebook_size, config.model.quantizer.token_dim) == (4096, 12)
    with pytest.raises(ConfigError, match="unknown TiTok release"):
        titok_release_config("XL-16")


@pytest.mark.parametrize("release", sorted(TITOK_RELEASES))
def test_the_released_shapes_give_the_configs_architecture(release):
    """The shapes of each released tokenizer (zero-stride arrays: nothing allocated) make the model
    ``configs/titok.py:<release>`` names."""
    from nativetok_jax.pretrained.titok import run_config

    expected = titok_release_config(release).model
    width, depth, tokens = expected.encoder.width, expected.encoder.depth, expected.num_tokens
    shapes = {"encoder.patch_embed.weight": (width, 3, 16, 16), "encoder.positional_embedding": (257, width),
              "latent_tokens": (tokens, width), "quantize.embedding.weight": (4096, 12),
              "decoder.ffn.0.weight": (2 * width, width, 1, 1), "decoder.ffn.2.weight": (1024, 2 * width, 1, 1)}
    for tower in ("encoder", "decoder"):
        shapes[f"{tower}.class_embedding"] = (1, width)
        shapes[f"{tower}.transformer.0.mlp.c_fc.weight"] = (4 * width, width)
        shapes.update({f"{tower}.transformer.{i}.ln_1.weight": (width,) for i in range(depth)})
    source = {name: np.broadcast_to(np.float32(0), shape) for name, shape in shapes.items()}
    assert run_config(source, "t.bin").model.to_dict() == expected.to_dict()
