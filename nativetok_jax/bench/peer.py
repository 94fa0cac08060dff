"""The authors' PyTorch prototype, imported from a local checkout, as ``bench compare --prototype`` runs it.

The public repository wangbei1/order_1-d holds the NativeTok authors' code; nothing of it is kept
in this project. From a checkout ``DIR`` this module imports

- ``DIR/modeling/blocks_new.py``: ``TiTokEncoder`` (patch embedding, the "pixel" transformer = our
  MIT, ``reduce_ffn`` = our dimension switcher, then a Python loop over one small transformer per
  token, expert ``i`` on ``[X ; t_0 .. t_{i-1} ; latent_i]``, and a 1x1-convolution token head) and
  ``TiTokDecoder`` (a ViT over mask tokens and the tokens, then ``1x1 conv -> tanh -> 1x1 conv`` to
  1024 VQGAN-code logits per grid cell);
- ``DIR/modeling/quantizer.py``: ``VectorQuantizer`` (l2-normalised, as their ``TiTok_new`` uses it);

and builds them as ``modeling/titok_new.py``'s ``TiTok_new`` does, with its learned latent tokens
(``width ** -0.5`` normal), but without its VQGAN pixel decoder and loss network: the step is
encoder -> quantiser -> decoder, as ours is. Their modules read sizes from a config namespace; head
counts and the decoder's depth come from named model sizes (``ENCODER_HEADS``, ``DECODER_SIZES``),
so only sizes their code can build are accepted (one-line errors otherwise).

PyTorch is a development dependency (``pip install -e .[dev]``), so it is imported by the caller
(``bench compare``) only when a comparison runs.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
from collections.abc import Callable
from types import ModuleType, SimpleNamespace
from typing import Any

import ml_collections
import torch

CODE_LOGITS = 1024  # TiTokDecoder's output channels: logits over their VQGAN's codebook
FILES = {"blocks": os.path.join("modeling", "blocks_new.py"), "quantizer": os.path.join("modeling", "quantizer.py")}
CLASSES = {"blocks": ("TiTokEncoder", "TiTokDecoder"), "quantizer": ("VectorQuantizer",)}
ENCODER_HEADS = {"large": 4}  # TiTokEncoder: model size -> heads, of the pixel transformer and of every expert
DECODER_SIZES = {"small": (8, 8), "base": (12, 12), "large": (30, 16)}  # TiTokDecoder: model size -> (depth, heads)
# Their parameters by our model's parts (name prefixes of their modules, as built by ``build``).
PARTS = {
    "mit": ("encoder.patch_embed", "encoder.class_embedding", "encoder.positional_embedding",
            "encoder.transformers_Pixel", "encoder.reduce_ffn"),
    "experts": ("encoder.transformers_tokens", "encoder.ln_pre", "latent_tokens"),
    "token_head": ("encoder.ln_post", "encoder.conv_out"),
    "quantizer": ("quantize",),
    "decoder": ("decoder",),
}
# What differs between the two steps by construction, beyond the part counts the report gives.
DIFFERENCES = (
    "decoder head: ours Linear(width, 2 width) -> tanh -> Linear to 3 p^2 pixel values per patch; theirs the same "
    "hidden layer (1x1 conv) -> 1024 VQGAN-code logits per grid cell",
    "loss: ours the config's pixel L2 + quantiser loss; theirs the mean square of the 1024 logits + their quantiser "
    "loss (their stage-1 cross-entropy needs a VQGAN's codes); both clip gradients and step AdamW with our settings",
    "experts: ours one LayerNorm, learned query and slot position per expert, the last layer computing the query row "
    "only, earlier tokens in padded slot buffers (model.experts.chunks scans); theirs one shared LayerNorm and a "
    "latent token per expert, every row of every layer on unpadded sequences",
    "MIT: ours ends with a LayerNorm before the dimension switcher; theirs has none",
)


def load(directory: str) -> dict[str, ModuleType]:
    """Imports ``FILES`` from the checkout ``directory`` (under private module names, leaving
    ``sys.path`` alone).

    Raises:
      SystemExit: ``directory`` is not a directory, a file is missing or defines no ``CLASSES``
        (one line naming what was looked for).
    """
    if not os.path.isdir(directory):
        raise SystemExit(f"error: --prototype {directory}: no such directory (expected a checkout of "
                         f"github.com/wangbei1/order_1-d)")
    modules = {}
    for key, relative in FILES.items():
        path = os.path.join(directory, relative)
        if not os.path.isfile(path):
            raise SystemExit(f"error: --prototype {directory}: no {relative} there (expected a checkout of "
                             f"github.com/wangbei1/order_1-d)")
        spec = importlib.util.spec_from_file_location(f"order_1d_{key}", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        missing = [name for name in CLASSES[key] if not hasattr(module, name)]
        if missing:
            raise SystemExit(f"error: --prototype {directory}: {relative} defines no {', '.join(missing)}")
        modules[key] = module
    return modules


def commit_of(directory: str) -> str | None:
    """The checkout's git commit, or None when it is no git work tree of its own."""
    if not os.path.exists(os.path.join(directory, ".git")):  # not a folder inside some other repository's tree
        return None
    try:
        result = subprocess.run(["git", "-C", directory, "rev-parse", "HEAD"], capture_output=True, text=True,
                                timeout=10, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    return (result.stdout.strip() or None) if result.returncode == 0 else None


def size_names(model: ml_collections.ConfigDict) -> tuple[str, str]:
    """Their (encoder, decoder) model-size names for ``config.model``'s sizes.

    Raises:
      SystemExit: their modules cannot build these sizes (one line naming the field).
    """
    e, x, d = model.encoder, model.experts, model.decoder
    encoder = next((name for name, heads in ENCODER_HEADS.items() if heads == e.num_heads == x.num_heads), None)
    if encoder is None:
        raise SystemExit(f"error: --prototype: their TiTokEncoder has {sorted(ENCODER_HEADS.values())} heads in its "
                         f"pixel transformer and experts alike; model.encoder.num_heads = {e.num_heads}, "
                         f"model.experts.num_heads = {x.num_heads}")
    decoder = next((name for name, size in DECODER_SIZES.items() if size == (d.depth, d.num_heads)), None)
    if decoder is None:
        raise SystemExit(f"error: --prototype: their TiTokDecoder's (depth, heads) are one of "
                         f"{sorted(DECODER_SIZES.values())}; model.decoder has ({d.depth}, {d.num_heads})")
    if d.width != x.width:
        raise SystemExit(f"error: --prototype: their decoder is as wide as the experts; model.decoder.width = "
                         f"{d.width}, model.experts.width = {x.width}")
    ratios = {part.mlp_ratio for part in (e, x, d)}
    if ratios != {4.0}:
        raise SystemExit(f"error: --prototype: their blocks have mlp_ratio 4; the config has {sorted(ratios)}")
    return encoder, decoder


def namespace(model: ml_collections.ConfigDict) -> SimpleNamespace:
    """The config namespace their modules read, for ``config.model``'s sizes."""
    encoder, decoder = size_names(model)
    vq = SimpleNamespace(
        vit_enc_patch_size=model.patch_size, vit_dec_patch_size=model.patch_size, vit_enc_model_size=encoder,
        vit_dec_model_size=decoder, num_latent_tokens=model.num_tokens, token_size=model.quantizer.token_dim,
        width=model.experts.width, embedding_width=model.encoder.width, layers_x=model.encoder.depth,
        layers_token=model.experts.depth, codebook_size=model.quantizer.codebook_size,
        commitment_cost=model.quantizer.commitment_weight, use_l2_norm=True)
    return SimpleNamespace(dataset=SimpleNamespace(preprocessing=SimpleNamespace(crop_size=model.image_size)),
                           model=SimpleNamespace(vq_model=vq))


def build(modules: dict[str, ModuleType], model: ml_collections.ConfigDict) -> torch.nn.Module:
    """Their encoder, quantiser, decoder and latent tokens in one module (parameter names as ``PARTS``)."""
    config = namespace(model)
    vq = config.model.vq_model
    net = torch.nn.Module()
    net.encoder = modules["blocks"].TiTokEncoder(config)
    net.decoder = modules["blocks"].TiTokDecoder(config)
    net.quantize = modules["quantizer"].VectorQuantizer(codebook_size=vq.codebook_size, token_size=vq.token_size,
                                                        commitment_cost=vq.commitment_cost, use_l2_norm=True)
    net.latent_tokens = torch.nn.Parameter(vq.width**-0.5 * torch.randn(vq.num_latent_tokens, vq.width))
    return net


def parts(named_parameters) -> dict[str, int]:
    """Parameter counts by ``PARTS`` (``other``: any name no part claims)."""
    counts = dict.fromkeys([*PARTS, "other"], 0)
    for name, value in named_parameters:
        part = next((p for p, prefixes in PARTS.items() if name.startswith(prefixes)), "other")
        counts[part] += value.numel()
    return counts


def training_step(net: torch.nn.Module, loss: Callable[[], torch.Tensor], train: ml_collections.ConfigDict,
                  device: str, dtype: str) -> Callable[[], float]:
    """One eager training step as a closure returning the loss: ``loss()`` (under autocast for
    bfloat16), backward, gradient clipping and AdamW with ``train``'s settings, as our step does."""
    optimizer = torch.optim.AdamW(net.parameters(), lr=train.learning_rate, betas=(train.beta1, train.beta2),
                                  weight_decay=train.weight_decay)
    autocast = torch.autocast(device_type=device.split(":")[0], dtype=torch.bfloat16, enabled=dtype == "bfloat16")

    def run() -> float:
        with autocast:
            value = loss()
        value.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), train.grad_clip_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        return float(value.detach())

    return run


def prototype_loss(net: torch.nn.Module, images: torch.Tensor) -> torch.Tensor:
    """Their encoder -> quantiser -> decoder on ``images`` ``[B, 3, H, W]``: the mean square of the
    decoder's logits plus the quantiser's loss."""
    latent = net.latent_tokens.unsqueeze(0).expand(images.shape[0], -1, -1)
    quantized, result = net.quantize(net.encoder(pixel_values=images, latent_tokens=latent))
    return net.decoder(quantized).float().pow(2).mean() + result["quantizer_loss"]


def compared_parts(ours: dict[str, int], theirs: dict[str, int]) -> dict[str, dict[str, int]]:
    """``{part: {ours, theirs}}`` for every part either side has."""
    return {part: dict(ours=ours.get(part, 0), theirs=theirs.get(part, 0))
            for part in dict.fromkeys([*ours, *theirs]) if ours.get(part, 0) or theirs.get(part, 0)}


def differences(by_part: dict[str, dict[str, int]]) -> list[str]:
    """Every part whose counts differ, then ``DIFFERENCES``."""
    counted = [f"{part} parameters: ours {c['ours']:,}, theirs {c['theirs']:,} ({c['ours'] - c['theirs']:+,})"
               for part, c in by_part.items() if c["ours"] != c["theirs"]]
    return counted + list(DIFFERENCES)


def opponent(modules: dict[str, ModuleType], config: ml_collections.ConfigDict, batch_size: int,
             device: str, dtype: str, ours_parts: dict[str, int]) -> dict[str, Any]:
    """Their step for ``config``'s sizes, with the parameter comparison: ``dict(step, params,
    params_by_part, differences)``."""
    net = build(modules, config.model).to(device)
    by_part = compared_parts(ours_parts, parts(net.named_parameters()))
    size = config.model.image_size
    images = torch.rand(batch_size, 3, size, size, device=device) * 2 - 1
    return dict(step=training_step(net, lambda: prototype_loss(net, images), config.train, device, dtype),
                params=sum(p.numel() for p in net.parameters()), params_by_part=by_part,
                differences=differences(by_part), head_difference=head_difference(config.model))


def head_difference(model: ml_collections.ConfigDict) -> int:
    """Our decoder's output layer's parameters minus theirs: ``3 p^2`` pixel values against
    ``CODE_LOGITS`` logits per cell, from our ``head_hidden`` (their ``2 x width``) inputs."""
    d = model.decoder
    ours = (d.get("head_hidden", 0) or d.width) + 1
    return ours * 3 * model.patch_size**2 - (2 * model.experts.width + 1) * CODE_LOGITS
