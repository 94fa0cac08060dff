"""DiT (Peebles & Xie 2023, "Scalable Diffusion Models with Transformers"): a transformer that
predicts the noise (and the variance) of a noised latent, conditioned on the step and the class.

Source: facebookresearch/DiT ``models.py``. The image ``[B, H, W, C]`` (a VAE latent: 32 x 32 x 4
at 256 px) is cut into ``p x p`` patches, linearly embedded, and given fixed 2-D sin-cos
positions. The conditioning vector is ``c = MLP(sinusoid_256(t)) + label_embedding(y)``; the label
table has a *null* row (index ``num_classes``) that label dropout swaps in, so one network is
both the conditional and the unconditional model that guidance mixes. Each block is adaLN-Zero:

    shift1, scale1, gate1, shift2, scale2, gate2 = Linear(SiLU(c))          (zero-initialised)
    x = x + gate1 * Attn(LN(x) * (1 + scale1) + shift1)
    x = x + gate2 * MLP(LN(x) * (1 + scale2) + shift2)

with LayerNorm without affine parameters (epsilon 1e-6), MLP ratio 4 with tanh-GELU. A final
adaLN layer (shift and scale only) and a zero-initialised linear map give ``p*p*2C`` values per
patch (noise then variance values, ``learn_sigma``), so the output is exactly zero at
initialisation. The blocks' parameters are stacked along ``layers`` and applied with ``lax.scan``.

Sizes (at 256 px, patch 2, i.e. 32 x 32 x 4 latents: 256 tokens); the parameter counts are
DiT's (:func:`parameter_count`), which include the fixed positions (a frozen ``nn.Parameter`` there,
a constant here, not part of the state):

| name | depth | width | heads | parameters (p=2) |
| --- | --- | --- | --- | --- |
| DiT-S | 12 | 384 | 6 | 32,963,360 |
| DiT-B | 12 | 768 | 12 | 130,512,416 |
| DiT-L | 24 | 1024 | 16 | 458,102,816 |
| DiT-XL | 28 | 1152 | 16 | 675,129,632 |

Initialisation follows DiT's ``initialize_weights``: Xavier-uniform linear layers (the attention
projections as one fused ``qkv`` map, as timm's), zero biases, N(0, 0.02) label table and timestep
MLP, zero modulation and output layers.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from nativetok_jax import storage
from nativetok_jax.diffusion.respacing import space_timesteps
from nativetok_jax.layers.attention import Attention
from nativetok_jax.layers.dense import Dense
from nativetok_jax.layers.mlp import Mlp
from nativetok_jax.layers.norm import LayerNorm
from nativetok_jax.layers.partitioning import constrain, param
from nativetok_jax.layers.patches import patchify, unpatchify
from nativetok_jax.layers.remat import remat_of, rematerialized
from nativetok_jax.layers.transformer import stacked
from nativetok_jax.schema import (
    DTYPES,
    ConfigError,
    boolean,
    check_attention_logits,
    number,
    positive_int,
    require,
    require_unconditional_model,
    validate_transformer,
)

FREQUENCY_DIM = 256
ROW_AXES = ("batch", "length", "embed")

XAVIER = nnx.initializers.xavier_uniform()
EMBEDDING_INIT = nnx.initializers.normal(stddev=0.02)
# timm's fused qkv Linear(W, 3W) under Xavier-uniform: limit sqrt(6 / (W + 3W)); per projection the
# fans are (W, W), so the variance scale is 0.5 of "fan_avg".
QKV_INIT = nnx.initializers.variance_scaling(0.5, "fan_avg", "uniform", in_axis=0, out_axis=(1, 2))
ATTENTION_OUT_INIT = nnx.initializers.variance_scaling(1.0, "fan_avg", "uniform", in_axis=(0, 1), out_axis=2)


def timestep_embedding(t: jax.Array, dim: int = FREQUENCY_DIM, max_period: float = 10_000.0) -> jax.Array:
    """``[cos(t f_k), sin(t f_k)]`` with ``f_k = max_period^(-k / (dim/2))``: float32 ``[B, dim]``."""
    half = dim // 2
    frequencies = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
    angles = t.astype(jnp.float32)[:, None] * frequencies[None]
    embedding = jnp.concatenate([jnp.cos(angles), jnp.sin(angles)], axis=-1)
    return jnp.pad(embedding, ((0, 0), (0, dim % 2)))


def _sincos_1d(dim: int, positions: np.ndarray) -> np.ndarray:
    omega = 1.0 / 10_000 ** (np.arange(dim // 2, dtype=np.float64) / (dim / 2.0))
    angles = positions.reshape(-1)[:, None] * omega[None]
    return np.concatenate([np.sin(angles), np.cos(angles)], axis=1)


@functools.lru_cache(maxsize=16)
def sincos_2d_positions(dim: int, grid: int) -> np.ndarray:
    """DiT's fixed positions, float32 ``[grid*grid, dim]`` in row-major patch order: the first half
    of the channels encodes the column, the second half the row (MAE's ``get_2d_sincos_pos_embed``).

    Raises:
      ValueError: ``dim`` not a multiple of 4.
    """
    if dim % 4:
        raise ValueError(f"2-D sin-cos positions need a width divisible by 4, got {dim}")
    rows, columns = np.meshgrid(np.arange(grid, dtype=np.float64), np.arange(grid, dtype=np.float64), indexing="ij")
    return np.concatenate([_sincos_1d(dim // 2, columns), _sincos_1d(dim // 2, rows)], axis=1).astype(np.float32)


def modulate(x: jax.Array, shift: jax.Array, scale: jax.Array) -> jax.Array:
    """``x * (1 + scale) + shift`` with per-sample ``shift``/``scale`` ``[B, W]`` over rows ``[B, T, W]``."""
    return x * (1 + scale[:, None]) + shift[:, None]


class TimestepEmbedder(nnx.Module):
    """Step ``t [B]`` -> ``Linear(SiLU(Linear(sinusoid_256(t))))`` ``[B, W]``."""

    def __init__(self, width: int, *, rngs: nnx.Rngs, dtype: jnp.dtype = jnp.float32):
        self.fc1 = Dense(FREQUENCY_DIM, width, axes=("frequency", "embed"), rngs=rngs, dtype=dtype,
                         kernel_init=EMBEDDING_INIT)
        self.fc2 = Dense(width, width, axes=("mlp", "embed"), rngs=rngs, dtype=dtype, kernel_init=EMBEDDING_INIT)

    def __call__(self, t: jax.Array) -> jax.Array:
        return self.fc2(nnx.silu(self.fc1(timestep_embedding(t))))


class DiTBlock(nnx.Module):
    """An adaLN-Zero transformer block (see the module docstring)."""

    def __init__(self, width: int, num_heads: int, mlp_ratio: float, *, rngs: nnx.Rngs,
                 dtype: jnp.dtype = jnp.float32, attention_logits: str = "float32"):
        self.attention_norm = LayerNorm(width, rngs=rngs, affine=False)
        self.attention = Attention(width, num_heads, rngs=rngs, dtype=dtype, logits=attention_logits)
        head_dim = width // num_heads
        in_axes = ("embed", "heads", "head_dim")
        for name in ("query", "key", "value"):
            setattr(self.attention, name, param(rngs, QKV_INIT, (width, num_heads, head_dim), in_axes))
        self.attention.out = param(rngs, ATTENTION_OUT_INIT, (num_heads, head_dim, width),
                                   ("heads", "head_dim", "embed"))
        self.mlp_norm = LayerNorm(width, rngs=rngs, affine=False)
        self.mlp = Mlp(width, int(width * mlp_ratio), rngs=rngs, dtype=dtype, approximate_gelu=True,
                       kernel_init=XAVIER)
        self.modulation = Dense(width, 6 * width, axes=("embed", "mlp"), rngs=rngs, dtype=dtype,
                                kernel_init=nnx.initializers.zeros)

    def __call__(self, x: jax.Array, c: jax.Array) -> jax.Array:
        """Rows ``x [B, T, W]``, conditioning ``c [B, W]`` -> ``[B, T, W]``."""
        shift1, scale1, gate1, shift2, scale2, gate2 = jnp.split(self.modulation(nnx.silu(c)), 6, axis=-1)
        x = x + gate1[:, None] * self.attention(modulate(self.attention_norm(x), shift1, scale1))
        x = x + gate2[:, None] * self.mlp(modulate(self.mlp_norm(x), shift2, scale2))
        return constrain(x, ROW_AXES)


class FinalLayer(nnx.Module):
    """adaLN (shift, scale) then a zero-initialised linear map to ``p*p*out_channels`` per row."""

    def __init__(self, width: int, patch_size: int, out_channels: int, *, rngs: nnx.Rngs,
                 dtype: jnp.dtype = jnp.float32):
        self.norm = LayerNorm(width, rngs=rngs, affine=False)
        self.modulation = Dense(width, 2 * width, axes=("embed", "mlp"), rngs=rngs, dtype=dtype,
                                kernel_init=nnx.initializers.zeros)
        self.linear = Dense(width, patch_size * patch_size * out_channels, axes=("embed", "patch"), rngs=rngs,
                            dtype=dtype, kernel_init=nnx.initializers.zeros)

    def __call__(self, x: jax.Array, c: jax.Array) -> jax.Array:
        shift, scale = jnp.split(self.modulation(nnx.silu(c)), 2, axis=-1)
        return self.linear(modulate(self.norm(x), shift, scale))


def apply_blocks(blocks: nnx.Module, rows: jax.Array, c: jax.Array, *, remat: bool = False, unroll: bool = False,
                 update: jax.Array | None = None) -> jax.Array:
    """Applies a stack of :class:`DiTBlock` (stacked parameters, ``layers`` axis) with ``lax.scan``.

    Args:
      blocks: the stacked blocks (:func:`nativetok_jax.layers.transformer.stacked`).
      rows: ``[B, T, W]``; c: the conditioning ``[B, W]``.
      remat: recompute each block's activations in the backward pass.
      unroll: unroll the scan (XLA's cost analysis counts a loop body once).
      update: optional bool ``[B, T]``: rows where it is False keep their values through every block
        while still being attended to (D²iT's RefineNet updates fine-region tokens only).
    """
    graphdef, state = nnx.split(blocks)

    def layer(h, layer_state):
        out = nnx.merge(graphdef, layer_state)(h, c)
        return (out if update is None else jnp.where(update[..., None], out, h)), None

    layer = rematerialized(layer, remat)
    rows, _ = jax.lax.scan(layer, rows, state, unroll=unroll)
    return rows


class DiT(nnx.Module):
    """``model(x [B, H, W, C], t [B], labels [B]) -> float32 [B, H, W, 2C]`` (``C`` without learned sigma).

    Channels-last: the noise prediction is ``[..., :C]``, the variance values ``[..., C:]``, the
    layout :class:`nativetok_jax.diffusion.gaussian.GaussianDiffusion` reads.
    """

    def __init__(
        self,
        *,
        input_size: int,
        in_channels: int,
        patch_size: int,
        width: int,
        depth: int,
        num_heads: int,
        num_classes: int,
        mlp_ratio: float = 4.0,
        learn_sigma: bool = True,
        dtype: jnp.dtype = jnp.float32,
        remat: bool = False,
        unroll: bool = False,
        attention_logits: str = "float32",
        rngs: nnx.Rngs,
    ):
        """
        Args:
          input_size: the latent's side (32 for 256 px images through an f8 VAE).
          in_channels: latent channels (4 for SD-VAE; 3 for pixel-space diffusion).
          patch_size: 2, 4 or 8 in DiT's tables; must divide ``input_size``.
          width, depth, num_heads: the transformer (:data:`DIT_SIZES`).
          num_classes: labels ``0 .. num_classes-1``; ``num_classes`` is the null class.
          learn_sigma: also predict the variance (doubles the output channels).
          dtype: compute dtype (parameters float32; norms and the output float32; the attention
            softmax float32 unless ``attention_logits`` is "compute").
          remat: recompute each block's activations in the backward pass.
          unroll: unroll the block scan (XLA's cost analysis counts a loop body once).
          attention_logits: the attention scores' and softmax's precision (layers/attention.py).

        Raises:
          ValueError: a patch size that does not divide the input, a width not divisible by the
            heads or by 4, depth < 1.
        """
        if input_size % patch_size:
            raise ValueError(f"DiT: patch_size {patch_size} does not divide input_size {input_size}")
        if depth < 1:
            raise ValueError(f"DiT: depth must be >= 1, got {depth}")
        if width % num_heads or width % 4:
            raise ValueError(f"DiT: width {width} must be divisible by num_heads {num_heads} and by 4")
        self.input_size = input_size
        self.in_channels = in_channels
        self.out_channels = 2 * in_channels if learn_sigma else in_channels
        self.patch_size = patch_size
        self.width = width
        self.depth = depth
        self.num_classes = num_classes
        self.learn_sigma = learn_sigma
        self.dtype = dtype
        self.remat = remat
        self.unroll = unroll
        self.patch_embedding = Dense(patch_size * patch_size * in_channels, width, axes=("patch", "embed"),
                                     rngs=rngs, dtype=dtype, kernel_init=XAVIER)
        self.timestep_embedder = TimestepEmbedder(width, rngs=rngs, dtype=dtype)
        self.label_embedding = param(rngs, EMBEDDING_INIT, (num_classes + 1, width), ("classes", "embed"))
        self.attention_logits = attention_logits
        self.blocks = stacked(lambda r: DiTBlock(width, num_heads, mlp_ratio, rngs=r, dtype=dtype,
                                                 attention_logits=attention_logits), depth, "layers", rngs)
        self.final_layer = FinalLayer(width, patch_size, self.out_channels, rngs=rngs, dtype=dtype)

    @property
    def null_class(self) -> int:
        """The label of the unconditional model (classifier-free guidance)."""
        return self.num_classes

    @property
    def grid_size(self) -> int:
        return self.input_size // self.patch_size

    def drop_labels(self, labels: jax.Array, key: jax.Array, probability: float = 0.1) -> jax.Array:
        """Replaces each label by the null class with ``probability`` (DiT trains with 0.1)."""
        return jnp.where(jax.random.bernoulli(key, probability, labels.shape), self.null_class, labels)

    @property
    def fixed_position_count(self) -> int:
        """Values of the fixed (non-trainable) position table, which DiT's parameter counts include."""
        return self.grid_size**2 * self.width

    def position_table(self) -> jax.Array:
        """The positions added to the rows, float32 ``[T, W]``: DiT's fixed 2-D sin-cos."""
        return jnp.asarray(sincos_2d_positions(self.width, self.grid_size))

    def embed(self, x: jax.Array) -> jax.Array:
        """Image ``[B, H, W, C]`` -> rows ``[B, T, W]`` with the positions added."""
        rows = self.patch_embedding(patchify(x, self.patch_size))
        return constrain(rows + self.position_table().astype(rows.dtype), ROW_AXES)

    def condition(self, t: jax.Array, labels: jax.Array) -> jax.Array:
        """``c = timestep embedding + label embedding`` ``[B, W]``."""
        labels = jnp.take(self.label_embedding[...], labels, axis=0, mode="clip").astype(self.dtype)
        return self.timestep_embedder(t) + labels

    def trunk(self, rows: jax.Array, c: jax.Array) -> jax.Array:
        """The scanned adaLN-Zero blocks."""
        return apply_blocks(self.blocks, rows, c, remat=self.remat, unroll=self.unroll)

    def readout(self, rows: jax.Array, c: jax.Array) -> jax.Array:
        """Final layer and un-patching: float32 ``[B, H, W, out_channels]``."""
        patches = self.final_layer(rows, c).astype(jnp.float32)
        return unpatchify(patches, self.patch_size, self.grid_size, self.out_channels)

    def check_inputs(self, x: jax.Array, t: jax.Array, labels: jax.Array) -> None:
        """Raises ``ValueError`` for ``x`` of the wrong shape, or ``t``/``labels`` not ``[B]``."""
        name = type(self).__name__
        expected = (self.input_size, self.input_size, self.in_channels)
        if x.ndim != 4 or x.shape[1:] != expected:
            raise ValueError(f"{name}: x must be [B, {', '.join(map(str, expected))}], got {x.shape}")
        if t.shape != x.shape[:1] or labels.shape != x.shape[:1]:
            raise ValueError(f"{name}: t and labels must be [{x.shape[0]}], got {t.shape} and {labels.shape}")

    def __call__(self, x: jax.Array, t: jax.Array, labels: jax.Array) -> jax.Array:
        """Noised input ``x [B, H, W, C]``, steps ``t [B]`` (the original process's indices),
        int ``labels [B]`` -> float32 ``[B, H, W, out_channels]``.

        Raises:
          ValueError: ``x`` of the wrong shape, or ``t``/``labels`` not ``[B]``.
        """
        self.check_inputs(x, t, labels)
        c = self.condition(t, labels)
        return self.readout(self.trunk(self.embed(x.astype(self.dtype)), c), c)


def dit(size: str, *, patch_size: int = 2, input_size: int = 32, in_channels: int = 4, num_classes: int = 1000,
        rngs: nnx.Rngs, **kwargs) -> DiT:
    """DiT-``size``/``patch_size`` (``size`` in :data:`DIT_SIZES`); defaults: ImageNet 256 px on SD-VAE latents."""
    if size not in DIT_SIZES:
        raise ValueError(f"unknown DiT size {size!r}; choose one of {sorted(DIT_SIZES)}")
    width, depth, heads = DIT_SIZES[size]
    return DiT(input_size=input_size, in_channels=in_channels, patch_size=patch_size, width=width, depth=depth,
               num_heads=heads, num_classes=num_classes, rngs=rngs, **kwargs)


def dit_from_config(model: ml_collections.ConfigDict, rngs: nnx.Rngs) -> DiT:
    """The DiT a config's ``model`` section (:func:`dit_model_config`) describes;
    the section is validated first (ConfigError naming the field; the SD-VAE file, which the network
    does not need, is the trainer's and the sampler's to check)."""
    validate_dit_model(model, check_files=False)
    side, _, channels = dit_latent_shape(model)
    return DiT(input_size=side, in_channels=channels, patch_size=model.patch_size, width=model.width,
               depth=model.depth, num_heads=model.num_heads, num_classes=model.num_classes,
               mlp_ratio=model.mlp_ratio, learn_sigma=model.learn_sigma, dtype=jnp.dtype(model.dtype),
               remat=remat_of(model), unroll=model.unroll_scans,
               attention_logits=model.get("attention_logits", "float32"), rngs=rngs)


def parameter_count(model: DiT) -> int:
    """Parameters as DiT reports them: the trainable ones plus the ``T x W`` fixed positions (a
    model whose positions are learned, D²iT's, has them among the trainable ones)."""
    trainable = sum(int(np.prod(v.shape)) for v in jax.tree.leaves(nnx.state(model, nnx.Param)))
    return trainable + model.fixed_position_count

# ----------------------------------------------------------------- config.model of a DiT: defaults and checks

DIT_SIZES = {"S": (384, 12, 6), "B": (768, 12, 12), "L": (1024, 24, 16), "XL": (1152, 28, 16)}
AUTOENCODERS = ("sd_vae", "pixels")
NOISE_SCHEDULES = ("linear", "cosine")
DIFFUSION_SAMPLERS = ("ddpm", "ddim")


def dit_model_config(size: str = "B", patch_size: int = 2) -> ml_collections.ConfigDict:
    """The ``model`` section of a DiT: DiT-``size``/``patch_size`` on SD-VAE latents at 256 px.

    Fields (facebookresearch/DiT's defaults unless marked [C], our choice):
      kind: "dit".
      size: "S", "B", "L" or "XL" (a label; ``width``/``depth``/``num_heads`` are what is built).
      image_size: pixels per side; the latent side is ``image_size / autoencoder downsampling``.
      patch_size: latent cells per patch side (2, 4 or 8 in DiT's tables).
      mlp_ratio, learn_sigma, num_classes (1000; ``num_classes`` itself is the null class).
      label_drop_probability: 0.1, labels dropped to the null class while training (guidance).
      dtype: compute dtype; diffusion arithmetic stays float32 whatever it is.
      remat, unroll_scans: as for the other transformers.
      autoencoder.kind: "sd_vae" (LDM KL-f8, 4 channels, ``scale_factor`` 0.18215, weights from
        ``python -m nativetok_jax.convert sd-vae``) or "pixels" (identity, 3 channels in [-1, 1]:
        the demo's pixel-space diffusion [C]).
      autoencoder.weights: the converted SD-VAE file ("" only for "pixels").
      diffusion: the training process: ``schedule`` "linear" (1e-4 .. 0.02) or "cosine",
        ``num_steps`` 1000.
      sample: ``method`` "ddpm" (DiT's FID protocol) or "ddim", ``respacing`` "250" (or "ddim50",
        "100", ...), ``eta`` (DDIM only), ``guidance_scale`` (1.5 for FID, 4.0 for pictures; 1 = off),
        ``guided_channels`` (0 = all [C]; 3 = DiT's exact FID run), ``clip_denoised`` (pixels only).
    """
    if size not in DIT_SIZES:
        raise ConfigError(f"config.model.size: unknown DiT size {size!r}; choose one of {sorted(DIT_SIZES)}")
    width, depth, num_heads = DIT_SIZES[size]
    model = diffusion_transformer_fields("dit", size, width, depth, num_heads, patch_size)
    model.autoencoder = ml_collections.ConfigDict(dict(kind="sd_vae", weights="", scale_factor=0.18215))
    return model


def diffusion_transformer_fields(kind: str, size: str, width: int, depth: int, num_heads: int,
                                 patch_size: int) -> ml_collections.ConfigDict:
    """The ``model`` fields DiT and D²iT's content transformer share, at DiT's defaults (see
    :func:`dit_model_config`): the transformer, the class conditioning, the diffusion process and
    the sampler."""
    model = ml_collections.ConfigDict()
    model.kind = kind
    model.size = size
    model.image_size = 256
    model.patch_size = patch_size
    model.width, model.depth, model.num_heads = width, depth, num_heads
    model.mlp_ratio = 4.0
    model.learn_sigma = True
    model.num_classes = 1000
    model.label_drop_probability = 0.1
    model.dtype = "float32"
    model.attention_logits = "float32"  # or "compute": layers/attention.py
    model.remat = False
    model.remat_policy = "nothing_saveable"  # layers/remat.py
    model.unroll_scans = False
    model.diffusion = ml_collections.ConfigDict(dict(schedule="linear", num_steps=1000))
    model.sample = ml_collections.ConfigDict(dict(method="ddpm", respacing="250", eta=0.0, guidance_scale=1.5,
                                                  guided_channels=0, clip_denoised=False))
    return model


def dit_latent_shape(model: ml_collections.ConfigDict) -> tuple[int, int, int]:
    """``(side, side, channels)`` of what the DiT diffuses: SD-VAE latents (f8, 4) or pixels (3)."""
    if model.autoencoder.kind == "pixels":
        return model.image_size, model.image_size, 3
    return model.image_size // 8, model.image_size // 8, 4


def validate_dit_model(model: ml_collections.ConfigDict, check_files: bool = True) -> None:
    """Raises ``ConfigError`` naming the first field of a DiT ``model`` section that cannot work
    (files are checked for existence here, not read; ``check_files=False`` leaves the SD-VAE file
    out, for what builds the network alone)."""
    require(model.get("kind") == "dit", "model.kind", f"must be 'dit', got {model.get('kind')!r}")
    require(model.get("dtype") in DTYPES, "model.dtype", f"must be one of {DTYPES}, got {model.get('dtype')!r}")
    check_attention_logits(model, "model")
    for name in ("image_size", "patch_size", "num_classes"):
        positive_int(model.get(name), f"model.{name}")
    validate_transformer(model, "model")
    require(model.width % 4 == 0, "model.width", f"2-D sin-cos positions need a multiple of 4, got {model.width}")
    for name in ("learn_sigma", "unroll_scans"):
        boolean(model.get(name), f"model.{name}")
    p = model.get("label_drop_probability")
    require(isinstance(p, (int, float)) and 0 <= p < 1, "model.label_drop_probability", f"must lie in [0, 1), got {p!r}")
    ae = model.autoencoder
    require(ae.get("kind") in AUTOENCODERS, "model.autoencoder.kind",
             f"must be one of {AUTOENCODERS}, got {ae.get('kind')!r}")
    if ae.kind == "sd_vae":
        require(model.image_size % 8 == 0, "model.image_size", f"the SD-VAE needs a multiple of 8, got {model.image_size}")
        number(ae.get("scale_factor"), "model.autoencoder.scale_factor")
        require(ae.scale_factor > 0, "model.autoencoder.scale_factor", f"must be > 0, got {ae.scale_factor!r}")
        if check_files:
            require(bool(ae.get("weights")), "model.autoencoder.weights",
                     "names no file: convert the public sd-vae-ft-ema / sd-vae-ft-mse weights with "
                     "`python -m nativetok_jax.convert sd-vae diffusion_pytorch_model.safetensors --out FILE.npz`")
            require(storage.path(ae.weights).is_file(), "model.autoencoder.weights", f"file not found: {ae.weights}")
    side = dit_latent_shape(model)[0]
    require(side % model.patch_size == 0, "model.patch_size",
             f"{model.patch_size} does not divide the {side} x {side} latent of {model.image_size} px images")
    validate_diffusion_sampling(model, dit_latent_shape(model)[2])


def validate_diffusion_sampling(model: ml_collections.ConfigDict, channels: int) -> None:
    """``model.diffusion`` (schedule, steps) and ``model.sample`` of a diffusion model whose latent has
    ``channels`` channels (DiT's and D²iT's)."""
    d = model.diffusion
    require(d.get("schedule") in NOISE_SCHEDULES, "model.diffusion.schedule",
             f"must be one of {NOISE_SCHEDULES}, got {d.get('schedule')!r}")
    positive_int(d.get("num_steps"), "model.diffusion.num_steps")
    s = model.sample
    require(s.get("method") in DIFFUSION_SAMPLERS, "model.sample.method",
             f"must be one of {DIFFUSION_SAMPLERS}, got {s.get('method')!r}")

    try:
        space_timesteps(d.num_steps, s.get("respacing"))
    except (ValueError, TypeError) as error:
        raise ConfigError(f"config.model.sample.respacing: {error}") from None
    number(s.get("eta"), "model.sample.eta")
    number(s.get("guidance_scale"), "model.sample.guidance_scale")
    require_unconditional_model(s.guidance_scale, model.get("label_drop_probability"), "config.model.sample.guidance_scale",
                                "model.label_drop_probability")
    g = s.get("guided_channels")
    require(isinstance(g, int) and 0 <= g <= channels, "model.sample.guided_channels",
             f"must be an integer in [0, {channels}] (0: all channels), got {g!r}")
    boolean(s.get("clip_denoised"), "model.sample.clip_denoised")
