"""The FID InceptionV3 against a PyTorch reference written here, through the weight converter."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from nativetok_jax.models.frozen.inception import resize_bilinear
from nativetok_jax.pretrained import files
from nativetok_jax.pretrained.inception import convert_fid_inception, load_inception

torch = pytest.importorskip("torch")
nn = torch.nn
F = torch.nn.functional


class TorchConvBN(nn.Module):
    def __init__(self, cin, cout, kernel, stride=1, padding=0):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel, stride=stride, padding=padding, bias=False)
        self.bn = nn.BatchNorm2d(cout, eps=1e-3)

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)))


def _avg_pool(x):
    return F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)


class TorchA(nn.Module):
    def __init__(self, cin, pool):
        super().__init__()
        self.branch1x1 = TorchConvBN(cin, 64, 1)
        self.branch5x5_1, self.branch5x5_2 = TorchConvBN(cin, 48, 1), TorchConvBN(48, 64, 5, padding=2)
        self.branch3x3dbl_1 = TorchConvBN(cin, 64, 1)
        self.branch3x3dbl_2 = TorchConvBN(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = TorchConvBN(96, 96, 3, padding=1)
        self.branch_pool = TorchConvBN(cin, pool, 1)

    def forward(self, x):
        return torch.cat([
            self.branch1x1(x), self.branch5x5_2(self.branch5x5_1(x)),
            self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
            self.branch_pool(_avg_pool(x)),
        ], 1)


class TorchB(nn.Module):
    def __init__(self, cin):
        super().__init__()
        self.branch3x3 = TorchConvBN(cin, 384, 3, stride=2)
        self.branch3x3dbl_1 = TorchConvBN(cin, 64, 1)
        self.branch3x3dbl_2 = TorchConvBN(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = TorchConvBN(96, 96, 3, stride=2)

    def forward(self, x):
        double = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return torch.cat([self.branch3x3(x), double, F.max_pool2d(x, 3, stride=2)], 1)


class TorchC(nn.Module):
    def __init__(self, cin, c7):
        super().__init__()
        self.branch1x1 = TorchConvBN(cin, 192, 1)
        self.branch7x7_1 = TorchConvBN(cin, c7, 1)
        self.branch7x7_2 = TorchConvBN(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7_3 = TorchConvBN(c7, 192, (7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = TorchConvBN(cin, c7, 1)
        self.branch7x7dbl_2 = TorchConvBN(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = TorchConvBN(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = TorchConvBN(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = TorchConvBN(c7, 192, (1, 7), padding=(0, 3))
        self.branch_pool = TorchConvBN(cin, 192, 1)

    def forward(self, x):
        double = x
        for i in range(1, 6):
            double = getattr(self, f"branch7x7dbl_{i}")(double)
        single = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        return torch.cat([self.branch1x1(x), single, double, self.branch_pool(_avg_pool(x))], 1)


class TorchD(nn.Module):
    def __init__(self, cin):
        super().__init__()
        self.branch3x3_1 = TorchConvBN(cin, 192, 1)
        self.branch3x3_2 = TorchConvBN(192, 320, 3, stride=2)
        self.branch7x7x3_1 = TorchConvBN(cin, 192, 1)
        self.branch7x7x3_2 = TorchConvBN(192, 192, (1, 7), padding=(0, 3))
        self.branch7x7x3_3 = TorchConvBN(192, 192, (7, 1), padding=(3, 0))
        self.branch7x7x3_4 = TorchConvBN(192, 192, 3, stride=2)

    def forward(self, x):
        seven = x
        for i in range(1, 5):
            seven = getattr(self, f"branch7x7x3_{i}")(seven)
        return torch.cat([self.branch3x3_2(self.branch3x3_1(x)), seven, F.max_pool2d(x, 3, stride=2)], 1)


class TorchE(nn.Module):
    def __init__(self, cin, max_pool):
        super().__init__()
        self.branch1x1 = TorchConvBN(cin, 320, 1)
        self.branch3x3_1 = TorchConvBN(cin, 384, 1)
        self.branch3x3_2a = TorchConvBN(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3_2b = TorchConvBN(384, 384, (3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = TorchConvBN(cin, 448, 1)
        self.branch3x3dbl_2 = TorchConvBN(448, 384, 3, padding=1)
        self.branch3x3dbl_3a = TorchConvBN(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = TorchConvBN(384, 384, (3, 1), padding=(1, 0))
        self.branch_pool = TorchConvBN(cin, 192, 1)
        self.max_pool = max_pool

    def forward(self, x):
        single = self.branch3x3_1(x)
        double = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        pooled = F.max_pool2d(x, 3, stride=1, padding=1) if self.max_pool else _avg_pool(x)
        return torch.cat([
            self.branch1x1(x), self.branch3x3_2a(single), self.branch3x3_2b(single),
            self.branch3x3dbl_3a(double), self.branch3x3dbl_3b(double), self.branch_pool(pooled),
        ], 1)


class TorchFIDInception(nn.Module):
    """pytorch-fid's ``fid_inception_v3`` layer for layer, under the same parameter names."""

    def __init__(self):
        super().__init__()
        self.Conv2d_1a_3x3 = TorchConvBN(3, 32, 3, stride=2)
        self.Conv2d_2a_3x3 = TorchConvBN(32, 32, 3)
        self.Conv2d_2b_3x3 = TorchConvBN(32, 64, 3, padding=1)
        self.Conv2d_3b_1x1 = TorchConvBN(64, 80, 1)
        self.Conv2d_4a_3x3 = TorchConvBN(80, 192, 3)
        self.Mixed_5b, self.Mixed_5c, self.Mixed_5d = TorchA(192, 32), TorchA(256, 64), TorchA(288, 64)
        self.Mixed_6a = TorchB(288)
        self.Mixed_6b, self.Mixed_6c = TorchC(768, 128), TorchC(768, 160)
        self.Mixed_6d, self.Mixed_6e = TorchC(768, 160), TorchC(768, 192)
        self.Mixed_7a = TorchD(768)
        self.Mixed_7b, self.Mixed_7c = TorchE(1280, max_pool=False), TorchE(2048, max_pool=True)
        self.fc = nn.Linear(2048, 1008)

    def forward(self, images):  # NCHW in [0, 1], already at the network's input size
        x = 2 * images - 1
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(F.max_pool2d(x, 3, stride=2)))
        x = F.max_pool2d(x, 3, stride=2)
        for name in ("5b", "5c", "5d", "6a", "6b", "6c", "6d", "6e", "7a", "7b", "7c"):
            x = getattr(self, f"Mixed_{name}")(x)
        features = x.mean((2, 3))
        return features, self.fc(features)


def _randomise(model) -> None:
    """He-scaled kernels and random but plausible batch-norm statistics, so activations keep
    their scale through the 94 layers and every parameter matters to the output."""
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.Conv2d):
                fan_in = module.weight[0].numel()
                module.weight.normal_(0.0, (2.0 / fan_in) ** 0.5, generator=generator)
            elif isinstance(module, nn.BatchNorm2d):
                width = module.num_features
                module.weight.copy_(0.5 + torch.rand(width, generator=generator))
                module.bias.copy_(0.1 * torch.randn(width, generator=generator))
                module.running_mean.copy_(0.1 * torch.randn(width, generator=generator))
                module.running_var.copy_(0.5 + torch.rand(width, generator=generator))
            elif isinstance(module, nn.Linear):
                module.weight.normal_(0.0, 2048**-0.5, generator=generator)
                module.bias.normal_(0.0, 0.1, generator=generator)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The randomised torch model and its state dict converted to the project's format."""
    torch.manual_seed(0)
    model = TorchFIDInception().eval()
    _randomise(model)
    directory = tmp_path_factory.mktemp("inception")
    pth, converted = str(directory / "pt_inception.pth"), str(directory / "fid_inception.npz")
    torch.save(model.state_dict(), pth)
    convert_fid_inception(pth, converted)
    return model, converted


def test_reference_has_the_published_names_and_shapes(reference):
    state = reference[0].state_dict()
    assert len([k for k in state if not k.endswith("num_batches_tracked")]) == 472
    assert state["Conv2d_1a_3x3.conv.weight"].shape == (32, 3, 3, 3)
    assert state["Mixed_6b.branch7x7_2.conv.weight"].shape == (128, 128, 1, 7)
    assert state["Mixed_7c.branch_pool.conv.weight"].shape == (192, 2048, 1, 1)
    assert state["Mixed_7c.branch3x3dbl_3b.bn.running_var"].shape == (384,)
    assert state["fc.weight"].shape == (1008, 2048)


def _compare(flax_model, torch_model, images: np.ndarray, torch_size: int | None = None) -> None:
    """Flax outputs on NHWC ``images`` against torch's, after torch's own bilinear resize to
    ``torch_size`` when given; tolerances relative to each output's scale."""
    with torch.no_grad():
        x = torch.from_numpy(images).permute(0, 3, 1, 2)
        if torch_size is not None:
            x = F.interpolate(x, size=(torch_size, torch_size), mode="bilinear", align_corners=False)
        features, logits = torch_model(x)
        unbiased = features @ torch_model.fc.weight.T
    graphdef, state = nnx.split(flax_model)
    out = jax.jit(lambda s, x: nnx.merge(graphdef, s)(x))(state, jnp.asarray(images))
    for name, got, expected in (("features", out.features, features),
                                ("logits", out.logits, logits),
                                ("logits_unbiased", out.logits_unbiased, unbiased)):
        expected = expected.numpy()
        scale = np.abs(expected).max()
        assert scale > 1e-2, f"{name}: degenerate reference"
        np.testing.assert_allclose(np.asarray(got), expected, rtol=1e-4, atol=1e-4 * scale, err_msg=name)


def test_converted_network_matches_pytorch(reference):
    # 107 x 107 is the smallest input whose last blocks still see 2 x 2 maps, where the padded
    # pools (average without padding, Mixed_7c's max) differ from the identity.
    model, converted = reference
    images = np.random.default_rng(0).uniform(size=(2, 107, 107, 3)).astype(np.float32)
    _compare(load_inception(converted, image_size=None), model, images)


def test_network_resizes_its_input_like_pytorch_fid(reference):
    model, converted = reference
    images = np.random.default_rng(1).uniform(size=(2, 90, 90, 3)).astype(np.float32)
    _compare(load_inception(converted, image_size=107), model, images, torch_size=107)


@pytest.mark.parametrize("in_size, out_size", [((7, 5), (12, 9)), ((13, 11), (5, 4)), ((6, 6), (6, 6))])
def test_resize_matches_torch_interpolate(in_size, out_size):
    images = np.random.default_rng(1).uniform(size=(2, *in_size, 3)).astype(np.float32)
    expected = F.interpolate(torch.from_numpy(images).permute(0, 3, 1, 2), size=out_size,
                             mode="bilinear", align_corners=False).permute(0, 2, 3, 1).numpy()
    got = np.asarray(resize_bilinear(jnp.asarray(images), *out_size))
    np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-6)


def test_wrong_files_are_one_line_weights_errors(tmp_path, reference):
    text = tmp_path / "notes.pth"
    text.write_text("not a checkpoint")
    imagenet_like = tmp_path / "imagenet_inception.pth"
    torch.save({"fc.weight": torch.zeros(1000, 2048), "fc.bias": torch.zeros(1000),
                "AuxLogits.conv0.conv.weight": torch.zeros(128, 768, 1, 1)}, imagenet_like)
    other_kind = tmp_path / "other.npz"
    files.save_weights(str(other_kind), {"w": np.zeros(2)}, kind="lpips")
    attempts = (
        (lambda: convert_fid_inception(str(text), str(tmp_path / "a.npz")), "cannot read"),
        (lambda: convert_fid_inception(str(imagenet_like), str(tmp_path / "b.npz")), "does not fit"),
        (lambda: load_inception(str(other_kind)), "expected 'fid_inception'"),
        (lambda: load_inception(str(tmp_path / "absent.npz")), "not found"),
    )
    for attempt, message in attempts:
        with pytest.raises(files.WeightsError, match=message) as error:
            attempt()
        assert "\n" not in str(error.value)
    assert not (tmp_path / "b.npz").exists()


@pytest.mark.parametrize("in_size, out_size", [((7, 5), (12, 9)), ((13, 11), (5, 4)), ((256, 256), (299, 299))])
def test_tf1_resize_matches_tensorflow(in_size, out_size):
    """ADM's evaluator runs TensorFlow's FID graph, whose ResizeBilinear has no half-pixel centres."""
    tf = pytest.importorskip("tensorflow")
    images = np.random.default_rng(2).uniform(0, 255, size=(2, *in_size, 3)).astype(np.float32)
    expected = tf.compat.v1.image.resize_bilinear(images, out_size, align_corners=False,
                                                  half_pixel_centers=False).numpy()
    got = np.asarray(resize_bilinear(jnp.asarray(images), *out_size, half_pixel=False))
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-3)


def test_network_takes_the_tensorflow_graphs_input(reference):
    """``input_convention="tensorflow"``: TF1's resize of the 0..255 values, then (x - 128) / 128
    (the graph ADM's reference statistics came from), fed to the same network as pytorch-fid's."""
    tf = pytest.importorskip("tensorflow")
    model, converted = reference
    images = np.random.default_rng(3).integers(0, 256, size=(2, 90, 90, 3)).astype(np.float32) / 255
    resized = tf.compat.v1.image.resize_bilinear(images * 255, (107, 107), align_corners=False,
                                                 half_pixel_centers=False).numpy()
    network_input = (resized - 128) / 128
    with torch.no_grad():  # pytorch-fid's model maps its [0, 1] input x to 2 x - 1 itself
        features, _ = model(torch.from_numpy((network_input + 1) / 2).permute(0, 3, 1, 2))
    flax_model = load_inception(converted, image_size=107)
    flax_model.input_convention = "tensorflow"
    got = flax_model(jnp.asarray(images)).features
    scale = np.abs(features.numpy()).max()
    np.testing.assert_allclose(np.asarray(got), features.numpy(), rtol=1e-4, atol=1e-4 * scale)
