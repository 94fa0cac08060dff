"""LPIPS: the Flax module and converter against a PyTorch reference with the published key names."""

import json
import struct

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nativetok_jax.pretrained import files
from nativetok_jax.pretrained.lpips import convert_lpips, load_lpips

torch = pytest.importorskip("torch")
nn = torch.nn

SIZE = 32
TAP_CHANNELS = (64, 128, 256, 512, 512)
# torchvision's vgg16().features up to relu5_3, cut into the five slices of the lpips package.
SLICES = (
    (0, (64, 64)),
    (4, ("M", 128, 128)),
    (9, ("M", 256, 256, 256)),
    (16, ("M", 512, 512, 512)),
    (23, ("M", 512, 512, 512)),
)


class TorchLPIPS(nn.Module):
    """The ``lpips`` package's ``LPIPS(net="vgg", version="0.1")``, written out: same module
    names (``net.sliceN.M``, ``linN.model.1``, ``scaling_layer``), same arithmetic."""

    def __init__(self):
        super().__init__()
        self.scaling_layer = nn.Module()
        self.scaling_layer.register_buffer("shift", torch.tensor([-0.030, -0.088, -0.188])[None, :, None, None])
        self.scaling_layer.register_buffer("scale", torch.tensor([0.458, 0.448, 0.450])[None, :, None, None])
        self.net = nn.Module()
        in_channels = 3
        for number, (start, layout) in enumerate(SLICES, start=1):
            block = nn.Sequential()
            index = start
            for entry in layout:
                if entry == "M":
                    block.add_module(str(index), nn.MaxPool2d(2, 2))
                    index += 1
                else:
                    block.add_module(str(index), nn.Conv2d(in_channels, entry, 3, padding=1))
                    block.add_module(str(index + 1), nn.ReLU())
                    in_channels = entry
                    index += 2
            setattr(self.net, f"slice{number}", block)
        for i, channels in enumerate(TAP_CHANNELS):
            head = nn.Module()
            head.model = nn.Sequential(nn.Dropout(), nn.Conv2d(channels, 1, 1, bias=False))
            nn.init.uniform_(head.model[1].weight, 0.0, 1.0)  # the published heads are non-negative
            setattr(self, f"lin{i}", head)
        self.eval()

    def forward(self, x, y):
        def taps(images):
            h = (images - self.scaling_layer.shift) / self.scaling_layer.scale
            out = []
            for number in range(1, 6):
                h = getattr(self.net, f"slice{number}")(h)
                out.append(h)
            return out

        total = 0.0
        for i, (a, b) in enumerate(zip(taps(x), taps(y))):
            a = a / (torch.sqrt(torch.sum(a**2, dim=1, keepdim=True)) + 1e-10)
            b = b / (torch.sqrt(torch.sum(b**2, dim=1, keepdim=True)) + 1e-10)
            total = total + getattr(self, f"lin{i}").model((a - b) ** 2).mean([2, 3])
        return total[:, 0]


def _torchvision_state(full_state):
    """The ``vgg16-397923af.pth`` layout: ``features.N.*`` plus the (ignored) classifier."""
    state = {"features." + k.split(".", 2)[2]: v for k, v in full_state.items() if k.startswith("net.")}
    state["classifier.0.weight"] = torch.zeros(4, 8)
    state["classifier.0.bias"] = torch.zeros(4)
    return state


def _lin_state(full_state):
    return {k: v for k, v in full_state.items() if k.startswith("lin")}


def _write_safetensors(path, state):
    header, offset, blobs = {}, 0, []
    for name, tensor in state.items():
        data = tensor.detach().numpy().astype("<f4").tobytes()
        header[name] = {"dtype": "F32", "shape": list(tensor.shape), "data_offsets": [offset, offset + len(data)]}
        offset += len(data)
        blobs.append(data)
    encoded = json.dumps(header).encode()
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(encoded)) + encoded + b"".join(blobs))


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The torch model, its state dict saved in both published layouts, and the converted file."""
    torch.manual_seed(0)
    model = TorchLPIPS()
    full_state = model.state_dict()
    directory = tmp_path_factory.mktemp("lpips")
    paths = {name: str(directory / name) for name in ("vgg16.pth", "vgg.pth", "full.pth", "lpips.npz")}
    torch.save(_torchvision_state(full_state), paths["vgg16.pth"])
    torch.save(_lin_state(full_state), paths["vgg.pth"])
    torch.save(full_state, paths["full.pth"])
    convert_lpips(paths["vgg16.pth"], paths["vgg.pth"], paths["lpips.npz"])
    return model, full_state, paths


@pytest.fixture(scope="module")
def flax_model(reference):
    return load_lpips(reference[2]["lpips.npz"])


@pytest.fixture(scope="module")
def flax_distance(flax_model):
    return jax.jit(lambda a, b: flax_model(a, b))


def _pairs(seed, batch=3):
    rng = np.random.default_rng(seed)
    x = rng.uniform(-1, 1, (batch, SIZE, SIZE, 3)).astype(np.float32)
    y = np.clip(x + rng.normal(0, 0.3, x.shape), -1, 1).astype(np.float32)
    return x, y


def _torch_distance(model, x, y):
    with torch.no_grad():
        return model(torch.from_numpy(x).permute(0, 3, 1, 2), torch.from_numpy(y).permute(0, 3, 1, 2)).numpy()


def test_matches_torch_reference(reference, flax_distance):
    model, distance = reference[0], flax_distance
    for seed in (0, 1):
        x, y = _pairs(seed)
        got = np.asarray(distance(x, y))
        assert got.dtype == np.float32 and got.shape == (3,)
        np.testing.assert_allclose(got, _torch_distance(model, x, y), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(np.asarray(distance(x, x)), 0.0, atol=1e-7)
    np.testing.assert_allclose(np.asarray(distance(y, x)), got, rtol=1e-6)


@pytest.mark.slow
def test_gradient_is_finite_and_bfloat16_is_close(reference, flax_model, flax_distance):
    x, y = _pairs(2)
    grad = jax.jit(jax.grad(lambda a, b: flax_model(a, b).sum()))
    grads = grad(x, y)
    assert np.all(np.isfinite(grads)) and np.any(grads != 0)
    assert np.all(np.isfinite(grad(x, x)))  # the loss at its minimum
    low = load_lpips(reference[2]["lpips.npz"], dtype=jnp.bfloat16)
    np.testing.assert_allclose(np.asarray(jax.jit(low)(x, y)), np.asarray(flax_distance(x, y)), rtol=0.1)


def test_whole_module_state_dict_and_safetensors_convert_the_same(reference, tmp_path):
    _, full_state, paths = reference
    expected, _ = files.load_weights(paths["lpips.npz"], kind="lpips")
    wrapped = str(tmp_path / "wrapped.safetensors")
    # A training checkpoint that holds the LPIPS module inside a larger one.
    _write_safetensors(wrapped, {f"loss.perceptual_loss.{k}": v for k, v in full_state.items()})
    for source in (paths["full.pth"], wrapped):
        out = str(tmp_path / "out.npz")
        convert_lpips(None, source, out)
        got, meta = files.load_weights(out, kind="lpips")
        assert meta["kind"] == "lpips"
        assert sorted(got) == sorted(expected)
        for key in expected:
            np.testing.assert_array_equal(got[key], expected[key], err_msg=key)


def _one_line_error(match, call, *args):
    with pytest.raises(files.WeightsError, match=match) as info:
        call(*args)
    assert "\n" not in str(info.value)


def test_bad_files_give_one_line_errors(reference, tmp_path):
    _, full_state, paths = reference
    out = str(tmp_path / "out.npz")
    # The VGG file where the heads belong.
    _one_line_error(r"5 missing: lin0\.model\.1\.weight", convert_lpips, paths["vgg16.pth"], paths["vgg16.pth"], out)
    # The heads file alone, without the VGG16 weights.
    _one_line_error(r"26 missing: net\.slice1\.0\.weight", convert_lpips, None, paths["vgg.pth"], out)
    misshaped = dict(full_state)
    misshaped["net.slice3.12.weight"] = torch.zeros(256, 128, 3, 3)
    torch.save(misshaped, str(tmp_path / "bad.pth"))
    _one_line_error(r"wrong shape: net\.slice3\.12\.weight", convert_lpips, None, str(tmp_path / "bad.pth"), out)
    # Two modules that each end in a ``lin0`` head: which one is LPIPS is not guessed.
    twice = {f"a.{k}": v for k, v in full_state.items()}
    twice.update({f"b.{k}": v for k, v in full_state.items() if k.startswith("lin0")})
    torch.save(twice, str(tmp_path / "twice.pth"))
    _one_line_error(r"ambiguous: lin0\.model\.1\.weight", convert_lpips, None, str(tmp_path / "twice.pth"), out)
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    _one_line_error("cannot read", convert_lpips, None, str(tmp_path / "junk.pth"), out)
    _one_line_error("not found", convert_lpips, str(tmp_path / "absent.pth"), paths["vgg.pth"], out)
    files.save_weights(out, {"w": np.zeros(2)}, kind="vqgan")
    _one_line_error("holds 'vqgan' weights, expected 'lpips'", load_lpips, out)
    files.save_weights(out, {"convs/0/kernel": np.zeros(2)}, kind="lpips")
    _one_line_error("does not fit the model", load_lpips, out)


def test_rejects_mismatched_inputs(flax_model):
    with pytest.raises(ValueError, match="NHWC RGB"):
        flax_model(np.zeros((1, 8, 8, 3), np.float32), np.zeros((1, 8, 8, 4), np.float32))


def test_convert_on_a_truncated_safetensors_file_prints_one_error_line(reference, tmp_path, capsys):
    from nativetok_jax import convert

    _, full_state, paths = reference
    whole = str(tmp_path / "lpips.safetensors")
    _write_safetensors(whole, full_state)
    data = open(whole, "rb").read()
    truncated = str(tmp_path / "truncated.safetensors")
    with open(truncated, "wb") as f:
        f.write(data[: len(data) // 2])  # an interrupted download
    assert convert.main(["lpips", truncated, "--out", str(tmp_path / "out.npz")]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"error: {truncated} is not a readable safetensors file: ")
    assert "incomplete metadata" in err  # the safetensors library's reason


def test_safetensors_bfloat16_tensors_are_read_as_exact_float32(tmp_path):
    import ml_dtypes
    from safetensors.numpy import save_file

    values = np.array([[1.0, -2.5, 3.140625], [0.0, 1e-3, 65280.0]], dtype=ml_dtypes.bfloat16)
    save_file({"w": values, "step": np.array([7], np.int64)}, str(tmp_path / "w.safetensors"))
    read = files.read_state_dict(str(tmp_path / "w.safetensors"))
    assert read["w"].dtype == np.float32 and read["step"].dtype == np.int64
    np.testing.assert_array_equal(read["w"], values.astype(np.float32))
