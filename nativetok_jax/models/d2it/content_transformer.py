"""D²iT's Dynamic Content Transformer: DiT on a mixed-grain latent, given its grain map.

Source: D²iT (Jia et al., CVPR 2025, arXiv 2504.09454) section 3.2 names the parts: multi-grained
noise prediction ("rough prediction of noise" plus "detailed regions correction"), RefineNet
blocks, learnable position embeddings, the dynamic grain loss. No code is released; the design
below is ours where the paper is silent [C] (``docs/d2it.md``), built from DiT's pieces
(:mod:`nativetok_jax.models.dit.transformer`, facebookresearch/DiT ``models.py``):

- the latent ``x [B, h, w, C]`` lives on the Dynamic VAE's fine grid (coarse regions hold one code
  copied 2 x 2); the grain map ``grains [B, h/2, w/2]`` has one cell per region (1 fine, 0 coarse);
- one token per region: DiT's patch-2 embedding of the region's 2 x 2 cells, plus positions
  (learnable, initialised from DiT's 2-D sin-cos; or DiT's fixed ones) and a learned embedding of
  the region's grain (2 rows; switchable);
- a trunk of DiT's adaLN-Zero blocks (stacked parameters, one ``lax.scan``);
- ``refine_depth`` RefineNet blocks of the same kind with their own stacked parameters, whose
  updates apply to fine-region tokens only: coarse tokens are context (attended to, never
  changed), so the RefineNet corrects the detailed regions;
- DiT's final layer (learned sigma: ``2C`` outputs per cell), and the noise and variance outputs
  averaged over each coarse region's 2 x 2 copies
  (:func:`nativetok_jax.diffusion.multi_grain.average_coarse`), so coarse outputs are exact copies.

With an all-fine map, no RefineNet, no grain embedding and fixed positions it *is* DiT/2 (the same
parameters give the same output); with an all-coarse map it is DiT followed by 2 x 2 averaging.

Parameter counts (:func:`parameter_count`, DiT's convention; ``configs/d2it.py`` lists them beside
the paper's): the trunk plus RefineNet hold DiT's block count, so D²iT-``size`` has DiT-``size``/2's
parameters plus ``2 W`` for the grain embedding (the positions, fixed in DiT, are counted by DiT
too).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from nativetok_jax.schema import (
    DTYPES,
    ConfigError,
    boolean,
    check_attention_logits,
    positive_int,
    require,
    validate_transformer,
)
from nativetok_jax.diffusion.multi_grain import FINE, average_coarse, check_grains
from nativetok_jax.layers.partitioning import constrain, param
from nativetok_jax.layers.remat import remat_of
from nativetok_jax.layers.transformer import stacked
from nativetok_jax.models.dit.transformer import (
    DIT_SIZES,
    EMBEDDING_INIT,
    ROW_AXES,
    DiT,
    DiTBlock,
    apply_blocks,
    diffusion_transformer_fields,
    parameter_count,
    sincos_2d_positions,
    validate_diffusion_sampling,
)

__all__ = ["DynamicContentTransformer", "d2it", "d2it_from_config", "parameter_count"]

REGION_CELLS = 2  # fine cells per region side: the patch size, one token per region
NUM_GRAINS = 2  # coarse (0) and fine (1)


class DynamicContentTransformer(DiT):
    """``model(x [B, h, w, C], t [B], labels [B], grains [B, h/2, w/2]) -> float32 [B, h, w, 2C]``.

    Channels-last like :class:`DiT`: the noise prediction is ``[..., :C]``, the variance values
    ``[..., C:]`` (``C`` only without learned sigma); both are exact 2 x 2 constants in coarse
    regions. The parameters are DiT/2's (same names and logical axes) plus ``refine_blocks``,
    ``grain_embedding`` and ``positions`` when switched on.
    """

    def __init__(
        self,
        *,
        input_size: int,
        in_channels: int,
        width: int,
        depth: int,
        refine_depth: int,
        num_heads: int,
        num_classes: int,
        mlp_ratio: float = 4.0,
        learn_sigma: bool = True,
        grain_embedding: bool = True,
        learnable_positions: bool = True,
        dtype: jnp.dtype = jnp.float32,
        remat: bool = False,
        unroll: bool = False,
        attention_logits: str = "float32",
        rngs: nnx.Rngs,
    ):
        """
        Args:
          input_size: the fine latent's side ``h`` (32 for 256 px through the f8 Dynamic VAE); even.
          in_channels: latent channels ``C`` (4).
          width, num_heads, mlp_ratio: DiT's (:data:`D2IT_SIZES`).
          depth: trunk blocks (>= 1); refine_depth: RefineNet blocks (>= 0; 0: none).
          num_classes: labels ``0 .. num_classes-1``; ``num_classes`` is the null class.
          learn_sigma: also predict the variance (doubles the output channels).
          grain_embedding: add a learned embedding of each region's grain to its token.
          learnable_positions: positions are parameters initialised from 2-D sin-cos; False: DiT's
            fixed ones.
          dtype, remat, unroll, attention_logits: as :class:`DiT` (they apply to both stacks).

        Raises:
          ValueError: an odd ``input_size``, ``refine_depth < 0``, or what :class:`DiT` refuses.
        """
        if input_size % REGION_CELLS:
            raise ValueError(f"DynamicContentTransformer: input_size {input_size} is not a whole number of "
                             f"{REGION_CELLS} x {REGION_CELLS} regions")
        if refine_depth < 0:
            raise ValueError(f"DynamicContentTransformer: refine_depth must be >= 0, got {refine_depth}")
        super().__init__(input_size=input_size, in_channels=in_channels, patch_size=REGION_CELLS, width=width,
                         depth=depth, num_heads=num_heads, num_classes=num_classes, mlp_ratio=mlp_ratio,
                         learn_sigma=learn_sigma, dtype=dtype, remat=remat, unroll=unroll,
                         attention_logits=attention_logits, rngs=rngs)
        self.refine_depth = refine_depth
        self.refine_blocks = (stacked(lambda r: DiTBlock(width, num_heads, mlp_ratio, rngs=r, dtype=dtype,
                                                         attention_logits=attention_logits),
                                      refine_depth, "layers", rngs) if refine_depth else None)
        # The label table's initialisation (DiT: N(0, 0.02)) for the grain table [C].
        self.grain_embedding = (param(rngs, EMBEDDING_INIT, (NUM_GRAINS, width), ("grains", "embed"))
                                if grain_embedding else None)
        grid = self.grid_size

        def sincos(key: jax.Array, shape: tuple[int, ...], dtype: jnp.dtype = jnp.float32) -> jax.Array:
            del key  # deterministic: DiT's table
            return jnp.asarray(sincos_2d_positions(width, grid), dtype).reshape(shape)

        self.positions = (param(rngs, sincos, (grid * grid, width), ("position", "embed"))
                          if learnable_positions else None)

    @property
    def fixed_position_count(self) -> int:
        return 0 if self.positions is not None else super().fixed_position_count

    def position_table(self) -> jax.Array:
        """The learnable positions ``[T, W]`` when switched on, DiT's fixed 2-D sin-cos otherwise."""
        return super().position_table() if self.positions is None else self.positions[...]

    def embed_regions(self, x: jax.Array, grains: jax.Array) -> jax.Array:
        """Latent ``[B, h, w, C]`` and grains ``[B, h/2, w/2]`` -> one row per region ``[B, T, W]``
        (row-major over regions, the grain map's order)."""
        rows = self.embed(x)
        if self.grain_embedding is None:
            return rows
        table = self.grain_embedding[...].astype(rows.dtype)
        flat = (grains.reshape(grains.shape[0], -1) == FINE).astype(jnp.int32)
        return constrain(rows + jnp.take(table, flat, axis=0), ROW_AXES)

    def refine(self, rows: jax.Array, c: jax.Array, grains: jax.Array) -> jax.Array:
        """The RefineNet blocks: fine-region rows updated, coarse-region rows kept as context."""
        if self.refine_blocks is None:
            return rows
        fine = grains.reshape(grains.shape[0], -1) == FINE
        return apply_blocks(self.refine_blocks, rows, c, remat=self.remat, unroll=self.unroll, update=fine)

    def __call__(self, x: jax.Array, t: jax.Array, labels: jax.Array, grains: jax.Array) -> jax.Array:  # type: ignore[override]
        """Noised fine-grid latent ``x [B, h, w, C]``, steps ``t [B]`` (the original process's
        indices), int ``labels [B]``, int ``grains [B, h/2, w/2]`` (1 fine, 0 coarse) ->
        float32 ``[B, h, w, out_channels]``, coarse regions exact 2 x 2 copies.

        Raises:
          ValueError: ``x``, ``t``, ``labels`` or ``grains`` of the wrong shape (or a float grain map).
        """
        self.check_inputs(x, t, labels)
        check_grains(grains, x.shape)
        c = self.condition(t, labels)
        rows = self.refine(self.trunk(self.embed_regions(x.astype(self.dtype), grains), c), c, grains)
        return average_coarse(self.readout(rows, c), grains)


def d2it(size: str, *, input_size: int = 32, in_channels: int = 4, num_classes: int = 1000, rngs: nnx.Rngs,
         **kwargs) -> DynamicContentTransformer:
    """D²iT-``size`` (``size`` in :data:`D2IT_SIZES`: B 10+2, L 22+2, XL 26+2
    blocks at DiT's widths); defaults: ImageNet 256 px on the f8 Dynamic VAE's 32 x 32 x 4 latent.

    Raises:
      ValueError: an unknown size.
    """
    if size not in D2IT_SIZES:
        raise ValueError(f"unknown D²iT size {size!r}; choose one of {sorted(D2IT_SIZES)}")
    width, depth, refine_depth, heads = D2IT_SIZES[size]
    return DynamicContentTransformer(input_size=input_size, in_channels=in_channels, width=width, depth=depth,
                                     refine_depth=refine_depth, num_heads=heads, num_classes=num_classes, rngs=rngs,
                                     **kwargs)


def d2it_from_config(model: ml_collections.ConfigDict, rngs: nnx.Rngs) -> DynamicContentTransformer:
    """The content transformer a config's ``model`` section (:func:`d2it_model_config`)
    describes, validated first (``ConfigError`` naming the field)."""
    validate_d2it_model(model)
    side, _, channels = d2it_latent_shape(model)
    return DynamicContentTransformer(
        input_size=side, in_channels=channels, width=model.width, depth=model.depth,
        refine_depth=model.refine_depth, num_heads=model.num_heads, num_classes=model.num_classes,
        mlp_ratio=model.mlp_ratio, learn_sigma=model.learn_sigma, grain_embedding=model.grain_embedding,
        learnable_positions=model.learnable_positions, dtype=jnp.dtype(model.dtype), remat=remat_of(model),
        unroll=model.unroll_scans, attention_logits=model.get("attention_logits", "float32"), rngs=rngs)


def copy_dit_parameters(source: DiT, target: DynamicContentTransformer) -> None:
    """Copies every parameter ``target`` shares with a DiT/2 (same names and shapes) from ``source``:
    DiT weights as a starting point, and the equivalence D²iT reduces to. The RefineNet, grain
    embedding and learnable positions keep their values.

    Raises:
      ValueError: a shared parameter whose shape differs (another width, depth or channel count).
    """
    shared = dict(nnx.to_flat_state(nnx.state(source, nnx.Param)))
    updates = {}
    for path, variable in nnx.to_flat_state(nnx.state(target, nnx.Param)):
        if path in shared:
            value = shared[path][...]
            if value.shape != variable.shape:
                raise ValueError(f"copy_dit_parameters: {'/'.join(map(str, path))} is {value.shape} in the DiT "
                                 f"but {variable.shape} here")
            updates[path] = value
    state = nnx.state(target, nnx.Param)
    for path, variable in nnx.to_flat_state(state):
        if path in updates:
            variable[...] = updates[path]
    nnx.update(target, state)

# ----------------------------------------------------------------- config.model of D²iT's content transformer: defaults and checks

# D²iT-B/L/XL (paper Table 1 and the ablation "10 DiT + 2 RefineNet"): DiT's width and heads, its
# depth split into a trunk and two RefineNet blocks: size -> (width, trunk depth, refine depth, heads).
D2IT_REFINE_DEPTH = 2


D2IT_SIZES = {size: (width, depth - D2IT_REFINE_DEPTH, D2IT_REFINE_DEPTH, heads)
              for size, (width, depth, heads) in DIT_SIZES.items() if size != "S"}


def d2it_model_config(size: str = "B") -> ml_collections.ConfigDict:
    """The ``model`` section of D²iT's Dynamic Content Transformer (``nativetok_jax/models/d2it/content_transformer.py``)
    on the 256 px Dynamic VAE's fine f8 latent (32 x 32 x 4, grain map 16 x 16).

    Fields ([P] the paper, [A] DiT's or DQ-VAE's code, [C] our choice, see ``docs/d2it.md``):
      kind: "d2it".
      size: "B", "L" or "XL" (a label; ``width``/``depth``/``refine_depth``/``num_heads`` are built).
      image_size, fine_factor, latent_channels: the latent is ``image_size / fine_factor`` per side
        with ``latent_channels`` channels; they must match the Dynamic VAE's (its fine grain f8, 4
        channels [C]); the grain map has half the latent's side (coarse f16 [P]).
      patch_size: 2, fixed: one token per region of 2 x 2 fine cells [C] (256 tokens at 256 px,
        DiT/2's count).
      width, num_heads, mlp_ratio: DiT's at each size [P: D²iT-B/L/XL].
      depth, refine_depth: trunk blocks and RefineNet blocks, 10+2 / 22+2 / 26+2 [P: the ablation's
        best split of 12 is 10+2; L and XL keep DiT's total depth with 2 RefineNet blocks [C]].
      grain_embedding: add a learned embedding of each token's grain [C] (switch for ablations).
      learnable_positions: positions learned, initialised from DiT's 2-D sin-cos [P: "learnable
        position embeddings"; the initialisation is ours, C]; False: DiT's fixed ones.
      learn_sigma, num_classes, label_drop_probability, dtype, remat, unroll_scans: as DiT's.
      diffusion: DiT's process (linear, 1000 steps) [A] with multi-grained noise [P, C: drawn on the
        coarse grid, copied 2 x 2 in coarse regions]; ``grain_loss`` = (coarse, fine) per-cell loss
        weights, (0.25, 1.0) weighs each latent code once [A: DQ-VAE's codebook mask]; (1, 1) is the
        ablation without the dynamic grain loss.
      sample: as DiT's (DDPM-250, guidance 1.5 on every channel).
    """
    if size not in D2IT_SIZES:
        raise ConfigError(f"config.model.size: unknown D²iT size {size!r}; choose one of {sorted(D2IT_SIZES)}")
    width, depth, refine_depth, num_heads = D2IT_SIZES[size]
    # No autoencoder field: the latent space is the Dynamic VAE in config.dvae.workdir.
    model = diffusion_transformer_fields("d2it", size, width, depth, num_heads, REGION_CELLS)
    model.fine_factor = 8
    model.latent_channels = 4
    model.refine_depth = refine_depth
    model.grain_embedding = True
    model.learnable_positions = True
    model.diffusion.grain_loss = (0.25, 1.0)
    return model


def d2it_latent_shape(model: ml_collections.ConfigDict) -> tuple[int, int, int]:
    """``(side, side, channels)`` of the fine-grid latent the content transformer diffuses."""
    side = model.image_size // model.fine_factor
    return side, side, model.latent_channels


def validate_d2it_model(model: ml_collections.ConfigDict) -> None:
    """Raises ``ConfigError`` naming the first field of a D²iT ``model`` section that cannot work."""
    require(model.get("kind") == "d2it", "model.kind", f"must be 'd2it', got {model.get('kind')!r}")
    require(model.get("dtype") in DTYPES, "model.dtype", f"must be one of {DTYPES}, got {model.get('dtype')!r}")
    check_attention_logits(model, "model")
    for name in ("image_size", "fine_factor", "latent_channels", "num_classes"):
        positive_int(model.get(name), f"model.{name}")
    require(model.get("patch_size") == 2, "model.patch_size",
             f"must be 2 (one token per region of 2 x 2 fine cells), got {model.get('patch_size')!r}")
    require(model.image_size % (2 * model.fine_factor) == 0, "model.image_size",
             f"{model.image_size} px is not a whole number of {2 * model.fine_factor} px regions "
             f"(fine_factor {model.fine_factor}, regions of 2 x 2 fine cells)")
    validate_transformer(model, "model")
    require(model.width % 4 == 0, "model.width", f"2-D sin-cos positions need a multiple of 4, got {model.width}")
    refine = model.get("refine_depth")
    require(isinstance(refine, int) and not isinstance(refine, bool) and refine >= 0, "model.refine_depth",
             f"must be an integer >= 0, got {refine!r}")
    for name in ("learn_sigma", "unroll_scans", "grain_embedding", "learnable_positions"):
        boolean(model.get(name), f"model.{name}")
    p = model.get("label_drop_probability")
    require(isinstance(p, (int, float)) and 0 <= p < 1, "model.label_drop_probability", f"must lie in [0, 1), got {p!r}")
    weights = tuple(model.diffusion.get("grain_loss") or ())
    require(len(weights) == 2 and all(isinstance(w, (int, float)) and w >= 0 for w in weights) and sum(weights) > 0,
             "model.diffusion.grain_loss", f"must be (coarse, fine) weights >= 0, not both 0, got {weights!r}")
    validate_diffusion_sampling(model, model.latent_channels)
