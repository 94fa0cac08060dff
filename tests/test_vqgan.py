"""The MaskGIT VQGAN against a PyTorch reference with the released model's names and shapes.

The reference below is written from the architecture (torch.nn only), named like the PyTorch port
TiTok ships (``maskgit-vqgan-imagenet-f16-256.bin``), and filled with random weights of the real
sizes. Its state dict and a maskgit-style Flax checkpoint built from the same weights must both
convert to the same parameters, and the converted model must give the reference's codes and
images (at 32 x 32 px, i.e. 2 x 2 codes, to stay cheap).
"""

import math

import jax
import numpy as np
import pytest
from flax import nnx

from nativetok_jax import convert
from nativetok_jax.models.frozen.vqgan import VQGAN, VQGANConfig
from nativetok_jax.pretrained import files
from nativetok_jax.pretrained.maskgit_vqgan import convert_maskgit_vqgan, load_maskgit_vqgan

torch = pytest.importorskip("torch")
nn = torch.nn
F = torch.nn.functional

# The released tokenizer_imagenet256_checkpoint holds 168 arrays, 54,515,587 numbers.
RELEASED_ARRAYS = 168
RELEASED_PARAMETERS = 54_515_587
# A few shapes from the released Flax checkpoint, the shortcuts and the decoder's ends above all.
RELEASED_MASKGIT_SHAPES = {
    "encoder/Conv_0/kernel": (3, 3, 3, 128),
    "encoder/Conv_1/kernel": (1, 1, 512, 256),
    "encoder/ResBlock_4/Conv_2/kernel": (1, 1, 256, 256),
    "encoder/ResBlock_8/GroupNorm_0/scale": (256,),
    "encoder/ResBlock_11/Conv_1/kernel": (3, 3, 512, 512),
    "decoder/Conv_0/kernel": (3, 3, 256, 512),
    "decoder/Conv_2/kernel": (3, 3, 256, 256),
    "decoder/Conv_4/bias": (128,),
    "decoder/Conv_5/kernel": (3, 3, 128, 3),
    "decoder/ResBlock_4/Conv_0/kernel": (3, 3, 512, 256),
    "decoder/ResBlock_8/Conv_2/kernel": (1, 1, 128, 128),
    "decoder/GroupNorm_0/scale": (128,),
    "quantizer/codebook": (1024, 256),
}


class ResnetBlock(nn.Module):
    def __init__(self, in_width, out_width):
        super().__init__()
        self.norm1 = nn.GroupNorm(32, in_width, eps=1e-6)
        self.conv1 = nn.Conv2d(in_width, out_width, 3, padding=1, bias=False)
        self.norm2 = nn.GroupNorm(32, out_width, eps=1e-6)
        self.conv2 = nn.Conv2d(out_width, out_width, 3, padding=1, bias=False)
        if in_width != out_width:  # maskgit's shortcut convolves the branch output
            self.nin_shortcut = nn.Conv2d(out_width, out_width, 1, bias=False)

    def forward(self, x):
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return h + (self.nin_shortcut(h) if hasattr(self, "nin_shortcut") else x)


class Level(nn.Module):
    def __init__(self, in_width, out_width, blocks, upsample=False):
        super().__init__()
        widths = [in_width] + [out_width] * blocks
        self.block = nn.ModuleList([ResnetBlock(widths[j], out_width) for j in range(blocks)])
        if upsample:
            self.upsample_conv = nn.Conv2d(out_width, out_width, 3, padding=1)


class TorchVQGAN(nn.Module):
    def __init__(self, filters=128, blocks=2, multipliers=(1, 1, 2, 2, 4), dim=256, codes=1024):
        super().__init__()
        widths = [filters * m for m in multipliers]
        top = widths[-1]
        self.encoder = nn.Module()
        self.encoder.conv_in = nn.Conv2d(3, filters, 3, padding=1, bias=False)
        self.encoder.down = nn.ModuleList(
            [Level(w_in, w, blocks) for w_in, w in zip([filters] + widths[:-1], widths)])
        self.encoder.mid = nn.ModuleList([ResnetBlock(top, top) for _ in range(blocks)])
        self.encoder.norm_out = nn.GroupNorm(32, top, eps=1e-6)
        self.encoder.conv_out = nn.Conv2d(top, dim, 1)
        self.decoder = nn.Module()
        self.decoder.conv_in = nn.Conv2d(dim, top, 3, padding=1)
        self.decoder.mid = nn.ModuleList([ResnetBlock(top, top) for _ in range(blocks)])
        self.decoder.up = nn.ModuleList(
            [Level((widths + [top])[i + 1], widths[i], blocks, upsample=i > 0) for i in range(len(widths))])
        self.decoder.norm_out = nn.GroupNorm(32, filters * multipliers[0], eps=1e-6)
        self.decoder.conv_out = nn.Conv2d(widths[0], 3, 3, padding=1)
        self.quantize = nn.Module()
        self.quantize.embedding = nn.Embedding(codes, dim)

    def encode_features(self, images):  # NCHW in [0, 1]
        e = self.encoder
        x = e.conv_in(images)
        for i, level in enumerate(e.down):
            for block in level.block:
                x = block(x)
            if i < len(e.down) - 1:
                x = F.avg_pool2d(x, 2, 2)
        for block in e.mid:
            x = block(x)
        return e.conv_out(F.silu(e.norm_out(x)))

    def distances(self, features):
        z = features.permute(0, 2, 3, 1).reshape(-1, features.shape[1])
        codebook = self.quantize.embedding.weight
        return (z.pow(2).sum(1, keepdim=True) + codebook.pow(2).sum(1)[None] - 2 * z @ codebook.T)

    def encode(self, images):
        features = self.encode_features(images)
        b, _, h, w = features.shape
        return self.distances(features).argmin(1).reshape(b, h, w)

    def decode_ids(self, ids):
        return torch_decode(self.decoder, self.quantize.embedding(ids).permute(0, 3, 1, 2))


def torch_decode(d: nn.Module, x):
    """The reference VQGAN decoder ``d`` on code vectors ``[B, D, h, w]`` (TiTok's test feeds it
    soft codes)."""
    x = d.conv_in(x)
    for block in d.mid:
        x = block(x)
    for level in reversed(d.up):
        for block in level.block:
            x = block(x)
        if hasattr(level, "upsample_conv"):
            x = level.upsample_conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))
    return d.conv_out(F.silu(d.norm_out(x)))


def randomize(model: nn.Module, seed: int) -> None:
    """Weights of a sensible scale, norms and biases away from 1 and 0 so a swapped or dropped
    scale/bias would show, and a spread-out codebook so the nearest code is never a near tie."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=generator)
            if name == "quantize.embedding.weight":
                p.copy_(noise)
            elif p.ndim == 4:
                p.copy_(noise / math.sqrt(p[0].numel()))
            elif "norm" in name and name.endswith("weight"):
                p.copy_(1.0 + 0.1 * noise)
            else:
                p.copy_(0.1 * noise)


def maskgit_tree(state: dict, levels: int = 5, blocks: int = 2) -> dict:
    """The same weights under maskgit's linen names, derived from linen's naming rule (each
    module type numbered in order of creation inside its parent), in the order maskgit's
    Encoder and Decoder create their layers."""
    tree: dict = {}

    def put(path, value):
        *parents, leaf = path.split("/")
        node = tree
        for name in parents:
            node = node.setdefault(name, {})
        node[leaf] = value

    def namer():
        counts: dict = {}

        def name(kind):
            counts[kind] = counts.get(kind, -1) + 1
            return f"{kind}_{counts[kind]}"
        return name

    def conv(dst, src):
        put(f"{dst}/kernel", state[f"{src}.weight"].transpose(2, 3, 1, 0))
        if f"{src}.bias" in state:
            put(f"{dst}/bias", state[f"{src}.bias"])

    def norm(dst, src):
        put(f"{dst}/scale", state[f"{src}.weight"])
        put(f"{dst}/bias", state[f"{src}.bias"])

    def resblock(dst, src):
        name = namer()
        norm(f"{dst}/{name('GroupNorm')}", f"{src}.norm1")
        conv(f"{dst}/{name('Conv')}", f"{src}.conv1")
        norm(f"{dst}/{name('GroupNorm')}", f"{src}.norm2")
        conv(f"{dst}/{name('Conv')}", f"{src}.conv2")
        if f"{src}.nin_shortcut.weight" in state:
            conv(f"{dst}/{name('Conv')}", f"{src}.nin_shortcut")

    name = namer()
    conv(f"encoder/{name('Conv')}", "encoder.conv_in")
    for i in range(levels):
        for j in range(blocks):
            resblock(f"encoder/{name('ResBlock')}", f"encoder.down.{i}.block.{j}")
    for j in range(blocks):
        resblock(f"encoder/{name('ResBlock')}", f"encoder.mid.{j}")
    norm(f"encoder/{name('GroupNorm')}", "encoder.norm_out")
    conv(f"encoder/{name('Conv')}", "encoder.conv_out")

    name = namer()
    conv(f"decoder/{name('Conv')}", "decoder.conv_in")
    for j in range(blocks):
        resblock(f"decoder/{name('ResBlock')}", f"decoder.mid.{j}")
    for i in reversed(range(levels)):
        for j in range(blocks):
            resblock(f"decoder/{name('ResBlock')}", f"decoder.up.{i}.block.{j}")
        if i > 0:
            conv(f"decoder/{name('Conv')}", f"decoder.up.{i}.upsample_conv")
    norm(f"decoder/{name('GroupNorm')}", "decoder.norm_out")
    conv(f"decoder/{name('Conv')}", "decoder.conv_out")

    put("quantizer/codebook", state["quantize.embedding.weight"])
    return tree


def write_msgpack(path, tree) -> None:
    from flax import serialization

    with open(path, "wb") as f:
        f.write(serialization.msgpack_serialize(tree))


@pytest.fixture(scope="module")
def reference():
    torch.manual_seed(0)
    model = TorchVQGAN().eval()
    randomize(model, seed=0)
    return model


@pytest.fixture(scope="module")
def state(reference):
    return {k: v.detach().numpy() for k, v in reference.state_dict().items()}


@pytest.fixture(scope="module")
def converted(reference, tmp_path_factory):
    directory = tmp_path_factory.mktemp("vqgan")
    torch.save(reference.state_dict(), directory / "maskgit-vqgan-imagenet-f16-256.bin")
    convert_maskgit_vqgan(str(directory / "maskgit-vqgan-imagenet-f16-256.bin"), str(directory / "port.npz"))
    return directory / "port.npz"


def test_reference_has_the_released_layout(reference, state):
    assert len(state) == RELEASED_ARRAYS
    assert sum(p.numel() for p in reference.parameters()) == RELEASED_PARAMETERS
    tree = files.flatten(maskgit_tree(state))
    assert len(tree) == RELEASED_ARRAYS
    for name, shape in RELEASED_MASKGIT_SHAPES.items():
        assert tree[name].shape == shape, name


def test_flax_model_has_the_released_size():
    abstract = nnx.eval_shape(lambda: VQGAN(rngs=nnx.Rngs(0)))
    leaves = jax.tree.leaves(nnx.state(abstract, nnx.Param))
    assert len(leaves) == RELEASED_ARRAYS
    assert sum(math.prod(x.shape) for x in leaves) == RELEASED_PARAMETERS


def test_converted_port_matches_the_reference(reference, converted):
    model = load_maskgit_vqgan(str(converted))
    assert model.config == VQGANConfig()
    images = np.random.default_rng(0).uniform(0, 1, (2, 32, 32, 3)).astype(np.float32)
    with torch.no_grad():
        x = torch.from_numpy(images).permute(0, 3, 1, 2)
        ref_features = reference.encode_features(x).permute(0, 2, 3, 1).numpy()
        ref_distances = np.sort(reference.distances(reference.encode_features(x)).numpy(), axis=1)
        ref_ids = reference.encode(x).numpy()
        ref_images = reference.decode_ids(torch.from_numpy(ref_ids)).permute(0, 2, 3, 1).numpy()
    # The nearest code wins by a clear margin, so equal ids test the network, not rounding.
    assert (ref_distances[:, 1] - ref_distances[:, 0]).min() > 1.0

    features, ids, raw, clipped = jax.jit(lambda m, x: (
        m.encode_features(x), m.encode(x),
        m.decode_ids(m.encode(x), clip=False), m.decode_ids(m.encode(x))))(model, images)
    assert ids.shape == (2, 2, 2) and ids.dtype == np.int32
    np.testing.assert_allclose(features, ref_features, rtol=1e-4, atol=1e-4 * np.abs(ref_features).max())
    np.testing.assert_array_equal(ids, ref_ids)
    assert raw.shape == (2, 32, 32, 3)
    scale = np.abs(ref_images).max()
    np.testing.assert_allclose(raw, ref_images, rtol=1e-4, atol=1e-4 * scale)
    np.testing.assert_allclose(clipped, np.clip(ref_images, 0, 1), rtol=1e-4, atol=1e-4 * scale)
    assert 0.05 < np.mean((ref_images > 0) & (ref_images < 1))  # clipping did not hide everything
    np.testing.assert_array_equal(model.codebook, reference.quantize.embedding.weight.detach().numpy())


def test_maskgit_checkpoint_converts_to_the_same_parameters(state, converted, tmp_path):
    checkpoint = tmp_path / "tokenizer_imagenet256_checkpoint"
    write_msgpack(checkpoint, {"params": maskgit_tree(state)})
    convert_maskgit_vqgan(str(checkpoint), str(tmp_path / "maskgit.npz"))
    from_maskgit, meta = files.load_weights(str(tmp_path / "maskgit.npz"), kind="maskgit_vqgan")
    from_port, port_meta = files.load_weights(str(converted), kind="maskgit_vqgan")
    assert meta["config"] == port_meta["config"] == VQGANConfig().to_dict()
    assert "maskgit" in meta["source"] and "PyTorch" in port_meta["source"]
    assert sorted(from_maskgit) == sorted(from_port)
    for key in from_port:
        np.testing.assert_array_equal(from_maskgit[key], from_port[key], err_msg=key)


@pytest.fixture(scope="module")
def small():
    model = TorchVQGAN(filters=32, blocks=1, multipliers=(1, 2), dim=8, codes=16).eval()
    randomize(model, seed=1)
    return model


def small_tree(small) -> dict:
    return maskgit_tree({k: v.detach().numpy() for k, v in small.state_dict().items()}, levels=2, blocks=1)


def test_small_maskgit_checkpoint_round_trips(small, tmp_path, capsys):
    """Sizes are read off the weights: a smaller VQGAN converts (here via the command line) and rebuilds too."""
    write_msgpack(tmp_path / "small", {"target": {"params": small_tree(small)}})
    assert convert.main(["maskgit-vqgan", str(tmp_path / "small"), "--out", str(tmp_path / "small.npz")]) == 0
    count = sum(p.numel() for p in small.parameters())
    assert f"maskgit_vqgan, {len(small.state_dict())} arrays, {count:,} parameters" in capsys.readouterr().out
    model = load_maskgit_vqgan(str(tmp_path / "small.npz"))
    assert model.config == VQGANConfig(filters=32, num_res_blocks=1, channel_multipliers=(1, 2),
                                       embedding_dim=8, codebook_size=16)
    ids = np.array([[[0, 5], [15, 3]]], dtype=np.int32)
    with torch.no_grad():
        expected = small.decode_ids(torch.from_numpy(ids).long()).permute(0, 2, 3, 1).numpy()
    np.testing.assert_allclose(model.decode_ids(ids, clip=False), expected, rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="multiples of 2"):
        model.encode(np.zeros((1, 5, 6, 3), np.float32))


def one_line_error(call) -> str:
    with pytest.raises(files.WeightsError) as error:
        call()
    message = str(error.value)
    assert "\n" not in message
    return message


def test_wrong_files_give_one_line_errors(small, tmp_path):
    out = str(tmp_path / "out.npz")
    (tmp_path / "noise").write_bytes(np.random.default_rng(0).bytes(256))
    assert "neither" in one_line_error(lambda: convert_maskgit_vqgan(str(tmp_path / "noise"), out))

    write_msgpack(tmp_path / "other", {"params": {"dense": {"kernel": np.zeros((2, 2), np.float32)}}})
    assert "encoder/Conv_0/kernel" in one_line_error(
        lambda: convert_maskgit_vqgan(str(tmp_path / "other"), out))

    partial = {k: v for k, v in small.state_dict().items() if k != "decoder.up.1.upsample_conv.bias"}
    torch.save(partial, tmp_path / "partial.pth")
    message = one_line_error(lambda: convert_maskgit_vqgan(str(tmp_path / "partial.pth"), out))
    assert "1 missing: decoder.up.1.upsample_conv.bias" in message

    tree = small_tree(small)
    tree["decoder"]["Conv_2"]["kernel"] = np.zeros((3, 3, 32, 4), np.float32)
    write_msgpack(tmp_path / "misshaped", {"params": tree})
    assert "decoder/Conv_2/kernel (3, 3, 32, 4)" in one_line_error(
        lambda: convert_maskgit_vqgan(str(tmp_path / "misshaped"), out))

    files.save_weights(str(tmp_path / "lpips.npz"), {"a": np.zeros(1)}, kind="lpips")
    assert "expected 'maskgit_vqgan'" in one_line_error(lambda: load_maskgit_vqgan(str(tmp_path / "lpips.npz")))
