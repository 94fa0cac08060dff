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

from nativetok_jax.config import D2IT_SIZES, d2it_latent_shape, validate_d2it_model
from nativetok_jax.diffusion.multi_grain import FINE, average_coarse, check_grains
from nativetok_jax.layers.partitioning import constrain, param
from nativetok_jax.layers.remat import remat_of
from nativetok_jax.layers.transformer import stacked
from nativetok_jax.models.dit.transformer import (EMBEDDING_INIT, ROW_AXES, DiT, DiTBlock, apply_blocks, parameter_count,
                                      sincos_2d_positions)

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
        rngs: nnx.Rngs,
    ):
        """
        Args:
          input_size: the fine latent's side ``h`` (32 for 256 px through the f8 Dynamic VAE); even.
          in_channels: latent channels ``C`` (4).
          width, num_heads, mlp_ratio: DiT's (:data:`nativetok_jax.config.D2IT_SIZES`).
          depth: trunk blocks (>= 1); refine_depth: RefineNet blocks (>= 0; 0: none).
          num_classes: labels ``0 .. num_classes-1``; ``num_classes`` is the null class.
          learn_sigma: also predict the variance (doubles the output channels).
          grain_embedding: add a learned embedding of each region's grain to its token.
          learnable_positions: positions are parameters initialised from 2-D sin-cos; False: DiT's
            fixed ones.
          dtype, remat, unroll: as :class:`DiT` (remat and unroll apply to both stacks).

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
                         learn_sigma=learn_sigma, dtype=dtype, remat=remat, unroll=unroll, rngs=rngs)
        self.refine_depth = refine_depth
        self.refine_blocks = (stacked(lambda r: DiTBlock(width, num_heads, mlp_ratio, rngs=r, dtype=dtype),
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
    """D²iT-``size`` (``size`` in :data:`nativetok_jax.config.D2IT_SIZES`: B 10+2, L 22+2, XL 26+2
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
    """The content transformer a config's ``model`` section (:func:`nativetok_jax.config.d2it_model_config`)
    describes, validated first (``ConfigError`` naming the field)."""
    validate_d2it_model(model)
    side, _, channels = d2it_latent_shape(model)
    return DynamicContentTransformer(
        input_size=side, in_channels=channels, width=model.width, depth=model.depth,
        refine_depth=model.refine_depth, num_heads=model.num_heads, num_classes=model.num_classes,
        mlp_ratio=model.mlp_ratio, learn_sigma=model.learn_sigma, grain_embedding=model.grain_embedding,
        learnable_positions=model.learnable_positions, dtype=jnp.dtype(model.dtype), remat=remat_of(model),
        unroll=model.unroll_scans, rngs=rngs)


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

