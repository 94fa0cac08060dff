"""The full tokenizers: an encoder that makes L continuous tokens, the token head, the quantiser
and the decoder.

``NativeTok`` encodes with the Meta Image Transformer and the causal experts; ``TiTok`` with one
bidirectional encoder (the order-free baseline). Both share the token head (LayerNorm, then a
linear map to ``token_dim``), the quantiser and the decoder, so they compare on equal terms.
Images inside the models are float ``[B, H, W, 3]`` in [-1, 1].
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from nativetok_jax.schema import (
    DTYPES,
    boolean,
    check_attention_logits,
    positive_int,
    require,
    transformer_section,
    validate_transformer,
)
from nativetok_jax.layers.dense import Dense
from nativetok_jax.layers.norm import LayerNorm
from nativetok_jax.layers.remat import remat_of
from nativetok_jax.models.nativetok.decoder import TokenDecoder
from nativetok_jax.models.nativetok.experts import CausalExperts
from nativetok_jax.models.nativetok import mean_colour
from nativetok_jax.models.nativetok.mit import MetaImageTransformer
from nativetok_jax.models.nativetok.quantizer import ESTIMATORS, Quantized, Quantizer
from nativetok_jax.models.nativetok.titok import TiTokEncoder


class TokenHead(nnx.Module):
    """LayerNorm, then ``width -> token_dim``: the continuous token before quantisation.

    ``legacy_layout``: TiTok's released tokenizers (``is_legacy``, modeling/modules/blocks.py) reshape
    the normalised ``[B, L, width]`` rows to ``[B, width, L]`` without transposing before their 1x1
    convolution, so token ``l`` is projected from the values at flat positions ``w * L + l``; this
    reproduces that, so their weights give their tokens.
    """

    def __init__(self, width: int, token_dim: int, *, rngs: nnx.Rngs, dtype: jnp.dtype, norm_epsilon: float = 1e-6,
                 legacy_layout: bool = False):
        self.norm = LayerNorm(width, rngs=rngs, epsilon=norm_epsilon)
        self.projection = Dense(width, token_dim, axes=("embed", "token_dim"), rngs=rngs, dtype=dtype)
        self.legacy_layout = legacy_layout

    def __call__(self, x: jax.Array) -> jax.Array:
        x = self.norm(x)
        if self.legacy_layout:
            x = x.reshape(x.shape[0], x.shape[2], x.shape[1]).swapaxes(1, 2)
        return self.projection(x).astype(jnp.float32)


class Autoencoder(nnx.Module):
    """What both tokenizers share; subclasses define ``encoder_features``."""

    num_tokens: int  # learned tokens; the code has ``colour_ids`` more in front with the mean-colour shortcut
    colour_ids: int  # 0 without the mean-colour shortcut (models/nativetok/mean_colour.py)
    codebook_size: int
    token_head: TokenHead
    quantizer: Quantizer
    decoder: TokenDecoder

    def _build_shared(self, model: ml_collections.ConfigDict, encoder_width: int, rngs: nnx.Rngs, dtype) -> None:
        self.num_tokens = model.num_tokens
        q = model.quantizer
        self.codebook_size = q.codebook_size
        self.colour_ids = colour_id_count(model)
        epsilon = model.get("norm_epsilon", 1e-6)
        self.token_head = TokenHead(encoder_width, q.token_dim, rngs=rngs, dtype=dtype, norm_epsilon=epsilon,
                                    legacy_layout=model.get("legacy_token_layout", False))
        self.quantizer = Quantizer(q.codebook_size, q.token_dim, commitment_weight=q.commitment_weight,
                                   estimator=q.get("estimator", "straight_through"), rngs=rngs)
        d = model.decoder
        self.decoder = TokenDecoder(
            num_tokens=model.num_tokens,
            token_dim=q.token_dim,
            image_size=model.image_size,
            patch_size=model.patch_size,
            width=d.width,
            depth=d.depth,
            num_heads=d.num_heads,
            mlp_ratio=d.mlp_ratio,
            head=d.head,
            proxy_codebook_size=d.proxy_codebook_size,
            rngs=rngs,
            dtype=dtype,
            remat=remat_of(d),
            unroll=model.unroll_scans,
            head_hidden=d.get("head_hidden", 0),
            norm_epsilon=epsilon,
            attention_logits=model.get("attention_logits", "float32"),
        )

    def encoder_features(self, images: jax.Array, *, frozen_experts: int = 0) -> jax.Array:
        """``[B, H, W, 3]`` -> ``[B, L, encoder_width]``.

        ``frozen_experts``: the first experts' parameters get no gradient, and their scan is split
        from the trainable ones' so that XLA computes no weight gradient for them. (Other frozen
        parameters are put under ``stop_gradient`` by the train step, one parameter at a time:
        ``optimizer.stop_frozen_gradients``; gradients still flow through them.)
        """
        raise NotImplementedError

    def shortcut_colour(self, images: jax.Array) -> jax.Array | None:
        """The mean-colour shortcut's colours ``[B, 3]`` of images in [-1, 1] (each image's mean at
        8 bits per channel; models/nativetok/mean_colour.py), or None without the shortcut."""
        return mean_colour.quantized_mean(images) if self.colour_ids else None

    def encode(self, images: jax.Array, **freeze) -> Quantized:
        """The learned tokens of images ``[B, H, W, 3]`` in [-1, 1]; with the mean-colour shortcut
        the encoder sees each image minus its (quantised) mean colour."""
        colour = self.shortcut_colour(images)
        if colour is not None:
            images = images - colour[:, None, None, :]
        return self.quantizer(self.token_head(self.encoder_features(images, **freeze)))

    def encode_ids(self, images: jax.Array) -> jax.Array:
        """The code of images ``[B, H, W, 3]`` in [-1, 1]: int32 ids ``[B, colour_ids + num_tokens]``
        (the mean colour's ids first, with the shortcut)."""
        ids = self.encode(images).ids
        colour = self.shortcut_colour(images)
        if colour is None:
            return ids
        return jnp.concatenate([mean_colour.colour_to_ids(colour, self.codebook_size), ids], axis=1)

    def decode_ids(self, ids: jax.Array, num_visible: int | jax.Array | None = None) -> jax.Array:
        """Decoder output for a code ``[B, colour_ids + num_tokens]`` (:meth:`encode_ids`; positions
        ``>= num_visible`` are hidden, an int or ``[B]`` ints, None: none). With the shortcut, a
        prefix of the colour's ids alone decodes to that colour, flat."""
        if not self.colour_ids:
            return self.decoder(self.quantizer.lookup(ids), num_visible)
        count = self.colour_ids
        colour = mean_colour.ids_to_colour(ids[:, :count], self.codebook_size, num_visible)[:, None, None, :]
        learned = None if num_visible is None else jnp.maximum(jnp.asarray(num_visible) - count, 0)
        out = self.decoder(self.quantizer.lookup(ids[:, count:]), learned)
        if learned is not None:  # a prefix of colour ids only is the colour: training never decodes from none
            out = jnp.where(jnp.reshape(learned, (-1, 1, 1, 1)) > 0, out, 0.0)
        return out + colour

    def shortcut_image(self, images: jax.Array) -> jax.Array | float:
        """What the decoder's readout is added to: each image's quantised mean colour ``[B, 1, 1, 3]``
        with the mean-colour shortcut, else 0.0."""
        colour = self.shortcut_colour(images)
        return 0.0 if colour is None else colour[:, None, None, :]

    def __call__(
        self,
        images: jax.Array,
        num_visible: int | jax.Array | None = None,
        *,
        quantize: bool | jax.Array = True,
        **freeze,
    ) -> tuple[jax.Array, Quantized]:
        """Reconstruction (pixels or proxy logits) and the quantiser's output, for training.

        ``quantize=False`` decodes the continuous (l2-normalised) tokens instead of their codes:
        a warm-up that lets the autoencoder find its tokens before the codebook is fitted to them.
        ``num_visible`` counts learned tokens: the shortcut's colour is always given.
        """
        features, quantized = self.features(images, num_visible, quantize=quantize, **freeze)
        return self.decoder.readout(features) + self.shortcut_image(images), quantized

    def features(
        self,
        images: jax.Array,
        num_visible: int | jax.Array | None = None,
        *,
        quantize: bool | jax.Array = True,
        **freeze,
    ) -> tuple[jax.Array, Quantized]:
        """Like ``__call__`` but stops before the decoder's head (see ``TokenDecoder.readout``) and
        before the shortcut's colour is added (:meth:`shortcut_image`)."""
        quantized = self.encode(images, **freeze)
        tokens = jnp.where(quantize, quantized.tokens, quantized.continuous)
        return self.decoder.features(tokens, num_visible), quantized


class NativeTok(Autoencoder):
    """Meta Image Transformer -> causal experts -> token head -> quantiser -> decoder."""

    def __init__(self, model: ml_collections.ConfigDict, *, rngs: nnx.Rngs):
        dtype = jnp.dtype(model.dtype)
        e, x = model.encoder, model.experts
        self.mit = MetaImageTransformer(
            image_size=model.image_size,
            patch_size=model.patch_size,
            width=e.width,
            depth=e.depth,
            num_heads=e.num_heads,
            mlp_ratio=e.mlp_ratio,
            out_width=x.width,
            rngs=rngs,
            dtype=dtype,
            remat=remat_of(e),
            unroll=model.unroll_scans,
            attention_logits=model.get("attention_logits", "float32"),
        )
        self.experts = CausalExperts(
            model.num_tokens,
            x.width,
            x.depth,
            x.num_heads,
            x.mlp_ratio,
            rngs=rngs,
            dtype=dtype,
            remat=remat_of(x),
            scan=x.scan,
            unroll=model.unroll_scans,
            chunks=x.chunks,
            attention_logits=model.get("attention_logits", "float32"),
        )
        self._build_shared(model, x.width, rngs, dtype)

    def encoder_features(self, images: jax.Array, *, frozen_experts: int = 0) -> jax.Array:
        x = self.mit(images)
        if not frozen_experts:
            return self.experts(x)[0]
        frozen, slots = self.experts(x, stop=frozen_experts, frozen=True)
        if frozen_experts == self.num_tokens:
            return frozen
        trained, _ = self.experts(x, start=frozen_experts, slots=slots)
        return jnp.concatenate([frozen, trained], axis=1)


class TiTok(Autoencoder):
    """One bidirectional encoder with learned latent tokens -> token head -> quantiser -> decoder."""

    def __init__(self, model: ml_collections.ConfigDict, *, rngs: nnx.Rngs):
        dtype = jnp.dtype(model.dtype)
        e = model.encoder
        self.encoder = TiTokEncoder(
            image_size=model.image_size,
            patch_size=model.patch_size,
            num_tokens=model.num_tokens,
            width=e.width,
            depth=e.depth,
            num_heads=e.num_heads,
            mlp_ratio=e.mlp_ratio,
            rngs=rngs,
            dtype=dtype,
            remat=remat_of(e),
            unroll=model.unroll_scans,
            latent_causal_mask=model.get("latent_causal_mask", False),
            norm_epsilon=model.get("norm_epsilon", 1e-6),
            attention_logits=model.get("attention_logits", "float32"),
        )
        self._build_shared(model, e.width, rngs, dtype)

    def encoder_features(self, images: jax.Array, *, frozen_experts: int = 0) -> jax.Array:
        if frozen_experts:
            raise ValueError("the TiTok baseline has no experts to freeze")
        return self.encoder(images)


def colour_id_count(model: ml_collections.ConfigDict) -> int:
    """How many of a tokenizer's first ids carry the mean colour: ``mean_colour.colour_id_count``
    with ``model.shortcut = "mean_colour"``, else 0."""
    if model.get("shortcut", "none") != "mean_colour":
        return 0
    return mean_colour.colour_id_count(model.quantizer.codebook_size)


def id_count(model: ml_collections.ConfigDict) -> int:
    """The length of a tokenizer's code: ``model.num_tokens`` learned ids after the mean colour's
    (:func:`colour_id_count`)."""
    return model.num_tokens + colour_id_count(model)


def build_model(model: ml_collections.ConfigDict, rngs: nnx.Rngs) -> Autoencoder:
    """The tokenizer ``config.model`` describes (validated first, with one-line errors)."""
    validate_model(model)
    return {"nativetok": NativeTok, "titok": TiTok}[model.kind](model, rngs=rngs)

# ----------------------------------------------------------------- config.model of a tokenizer: defaults and checks

def tokenizer_model_config() -> ml_collections.ConfigDict:
    """``config.model`` of a tokenizer: NativeTok with 32 tokens at 256 px, the paper's sizes
    (docs/nativetok.md); ``kind="titok"`` builds the order-free baseline from the same fields."""
    model = ml_collections.ConfigDict()
    model.kind = "nativetok"  # or "titok": the order-free baseline.
    model.image_size = 256
    model.patch_size = 16
    model.num_tokens = 32
    model.dtype = "float32"  # Compute dtype; parameters are always float32.
    # Precision of every attention's scores and softmax (layers/attention.py): "float32" whatever
    # the compute dtype, or "compute" (in the compute dtype).
    model.attention_logits = "float32"
    # Unroll the layer and expert scans in the compiled program: compile time grows with depth
    # and num_tokens; XLA's FLOP count becomes exact (the model benchmark uses it for that).
    model.unroll_scans = False
    # kind="titok" only: latent token i attends to the image and the latent tokens <= i (the
    # paper's plain-causal-mask ablation; models/nativetok/titok.py). Same parameters as without it.
    model.latent_causal_mask = False
    # The LayerNorms' epsilon in the encoder, token head and decoder; TiTok's released tokenizers
    # (``titok_release_config``) were trained with PyTorch's 1e-5.
    model.norm_epsilon = 1e-6
    # kind="titok" only: the token head reads the rows as TiTok's released tokenizers do (their
    # ``is_legacy`` reshape; models/nativetok/autoencoder.py TokenHead). Same parameters as without it.
    model.legacy_token_layout = False
    # Meta Image Transformer (for kind="titok": the bidirectional encoder with latent tokens).
    # The prototype used 4 heads at width 1024; 16 (head dim 64) is the ViT-L choice we default to.
    model.encoder = transformer_section(width=1024, depth=18, num_heads=16)
    # One light transformer per token position.
    # remat: each expert is recomputed in the backward pass instead of the expert scan stacking its
    # residuals: faster on XLA:CPU although it adds 3-15 % FLOPs (XLA:CPU zero-fills and copies the
    # stacked residual buffers; docs/tokenizer.md has the measurement).
    model.experts = transformer_section(width=256, depth=2, num_heads=4, remat=True)
    # scan=False runs the prototype's unrolled Python loop instead of the scanned stack: same
    # numbers, compile time growing with num_tokens. For tests and benchmarks only.
    model.experts.scan = True
    # The experts run in this many scans, each with a slot buffer of only the slots its experts
    # can see (models/nativetok/experts.py): fewer masked rows computed, compile time growing with chunks.
    # 4: the expert stack's forward FLOPs at the prototype's sizes fall 13 % (L = 32) and 27 %
    # (L = 128) against 1 chunk; 8 saves only 2 % and 5 % more for twice the compiled scans.
    model.experts.chunks = 4
    model.quantizer = ml_collections.ConfigDict(
        # estimator: how the decoder's gradient passes the choice of code (models/nativetok/quantizer.py).
        dict(codebook_size=4096, token_dim=12, commitment_weight=0.25, estimator="straight_through")
    )
    # TiTok-L decoder.
    model.decoder = transformer_section(width=1024, depth=24, num_heads=16)
    model.decoder.head = "pixel"  # or "proxy_codes" (logits over a VQGAN codebook).
    model.decoder.proxy_codebook_size = 1024
    # > 0: a Linear of this width and tanh before the head (TiTok's released decoders: 2 x width).
    model.decoder.head_hidden = 0
    # How proxy-code logits become pixels (through the VQGAN's decoder): "argmax" (the most
    # likely code per cell) or "soft" (softmax-weighted codebook rows; what train.losses.proxy
    # = "pixels" trains, so use it for models from that stage).
    model.decoder.proxy_decoding = "argmax"
    # "mean_colour": the code's first ids carry each image's mean colour at 8 bits per channel
    # (24 bits: 2 ids of a 4,096-code book), the encoder sees the image minus it and the decoder
    # adds it back (models/nativetok/mean_colour.py). Not in the paper; the demo tokenizer uses it.
    model.shortcut = "none"
    return model


MODEL_KINDS = ("nativetok", "titok")
DECODER_HEADS = ("pixel", "proxy_codes")
PROXY_DECODINGS = ("argmax", "soft")


def validate_model(model: ml_collections.ConfigDict) -> None:
    """Raises ``ConfigError`` naming the first field of ``config.model`` that cannot work."""
    require(model.get("kind") in MODEL_KINDS, "model.kind", f"must be one of {MODEL_KINDS}, got {model.get('kind')!r}")
    require(model.get("dtype") in DTYPES, "model.dtype", f"must be one of {DTYPES}, got {model.get('dtype')!r}")
    check_attention_logits(model, "model")
    for name in ("image_size", "patch_size", "num_tokens"):
        positive_int(model.get(name), f"model.{name}")
    require(model.image_size % model.patch_size == 0, "model.image_size",
             f"{model.image_size} is not a multiple of patch_size={model.patch_size}")
    validate_transformer(model.encoder, "model.encoder")
    validate_transformer(model.decoder, "model.decoder")
    boolean(model.get("unroll_scans"), "model.unroll_scans")
    boolean(model.get("latent_causal_mask", False), "model.latent_causal_mask")
    require(not model.get("latent_causal_mask", False) or model.kind == "titok", "model.latent_causal_mask",
             f"only the titok encoder has latent tokens to mask; model.kind is {model.kind!r}")
    if model.kind == "nativetok":
        validate_transformer(model.experts, "model.experts")
        boolean(model.experts.get("scan"), "model.experts.scan")
        positive_int(model.experts.get("chunks"), "model.experts.chunks")
    positive_int(model.quantizer.get("codebook_size"), "model.quantizer.codebook_size")
    positive_int(model.quantizer.get("token_dim"), "model.quantizer.token_dim")
    require(model.quantizer.get("estimator", "straight_through") in ESTIMATORS, "model.quantizer.estimator",
            f"must be one of {ESTIMATORS}, got {model.quantizer.get('estimator')!r}")
    weight = model.quantizer.get("commitment_weight")
    require(isinstance(weight, (int, float)) and weight >= 0, "model.quantizer.commitment_weight",
             f"must be a number >= 0, got {weight!r}")
    require(model.decoder.get("head") in DECODER_HEADS, "model.decoder.head",
             f"must be one of {DECODER_HEADS}, got {model.decoder.get('head')!r}")
    positive_int(model.decoder.get("proxy_codebook_size"), "model.decoder.proxy_codebook_size")
    require(model.decoder.get("proxy_decoding") in PROXY_DECODINGS, "model.decoder.proxy_decoding",
             f"must be one of {PROXY_DECODINGS}, got {model.decoder.get('proxy_decoding')!r}")
    hidden = model.decoder.get("head_hidden", 0)
    require(isinstance(hidden, int) and not isinstance(hidden, bool) and hidden >= 0, "model.decoder.head_hidden",
             f"must be an integer >= 0, got {hidden!r}")
    epsilon = model.get("norm_epsilon", 1e-6)
    require(isinstance(epsilon, (int, float)) and not isinstance(epsilon, bool) and 0 < epsilon < 1,
             "model.norm_epsilon", f"must lie in (0, 1), got {epsilon!r}")
    boolean(model.get("legacy_token_layout", False), "model.legacy_token_layout")
    shortcut = model.get("shortcut", "none")
    require(shortcut in mean_colour.SHORTCUTS, "model.shortcut", f"must be one of {mean_colour.SHORTCUTS}, got {shortcut!r}")
    if shortcut == "mean_colour":
        require(model.decoder.head == "pixel", "model.shortcut",
                f"the mean-colour shortcut adds a colour to pixels; model.decoder.head is {model.decoder.head!r}")
        size = model.quantizer.codebook_size
        require(size >= 2 and not size & (size - 1), "model.shortcut",
                f"the mean colour is sent as ids of the codebook, whose size must be a power of two; "
                f"model.quantizer.codebook_size is {size}")
    require(not model.get("legacy_token_layout", False) or model.kind == "titok", "model.legacy_token_layout",
             f"only TiTok's released tokenizers use it; model.kind is {model.kind!r}")
