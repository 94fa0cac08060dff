"""D²iT (Jia et al., CVPR 2025): the Dynamic Content Transformer on the 256 px Dynamic VAE's latent.

    python -m nativetok_jax.main --config configs/d2it.py:B --workdir gs://bucket/d2it_b \
        --config.dvae.workdir=gs://bucket/dvae

``task="d2it"``. The latent space is a trained Dynamic VAE (``dvae.workdir``: its config, weights,
latent scale, and the grain latent store it writes: each image's fine-grid latent 32 x 32 x 4, coarse
codes neighbour-copied 2 x 2, and its 16 x 16 grain map). Sizes (``D2IT_SIZES``): D²iT-B 10+2,
L 22+2, XL 26+2 blocks (trunk + RefineNet) at DiT's widths and heads (768/12, 1024/16, 1152/16),
patch 2: one token per 16 px region, 256 tokens. The ``grain_transformer`` section (the Dynamic
Grain Transformer that generates the grain maps) is the d2it trainer's.

Choices ([P] the paper, [A] DiT's / DQ-VAE's code, [C] ours; ``docs/d2it.md``):
- [P] two grains, fine f8 and coarse f16; the content transformer predicts multi-grained noise;
  RefineNet blocks, learnable positions and a dynamic grain loss are its named parts.
- [C] multi-grained noise: drawn on the coarse grid and copied 2 x 2 in coarse regions, independent
  per cell in fine regions (unit variance everywhere, so DiT's linear 1000-step schedule is unchanged).
- [C] one token per region (2 x 2 fine cells, DiT's patch-2 embedding); a learned grain embedding
  (``model.grain_embedding``); positions learned from a 2-D sin-cos start (``model.learnable_positions``).
- [C] RefineNet = the last ``model.refine_depth`` = 2 adaLN-Zero blocks, with their own parameters,
  updating fine-region tokens only (coarse tokens are context) [P: 10+2 is the ablation's best split
  of D²iT-B's 12 blocks; L and XL keep DiT's total depth, C].
- [C] the noise and variance outputs are averaged over each coarse region's copies, so the samplers
  keep coarse regions exact copies at every step.
- [A: DQ-VAE's codebook mask] the dynamic grain loss weighs each latent code once:
  ``model.diffusion.grain_loss = (0.25, 1.0)`` (coarse copies, fine cells); ``(1, 1)`` is the
  ablation without it.
- [C] grain-embedding initialisation N(0, 0.02), as DiT's label table.
- [A: DiT] everything else: learned sigma, label dropout 0.1 (null class 1000), AdamW 1e-4 constant,
  betas (0.9, 0.999), no weight decay, batch 256, EMA 0.9999, 400K steps, DDPM-250 sampling with
  guidance 1.5 for FID; bfloat16 compute with float32 diffusion arithmetic.

Parameter counts (``nnx.eval_shape``, no allocation; DiT's convention, which counts the positions;
``python configs/d2it.py``):

| size | ours | DiT/2 (same width) | paper |
| --- | --- | --- | --- |
| D²iT-B | 130,513,952 | 130,512,416 | - |
| D²iT-L | 458,104,864 | 458,102,816 | 467 M |
| D²iT-XL | 675,131,936 | 675,129,632 | 687 M |

Ours is DiT/2 plus the 2 x W grain embedding: the RefineNet blocks are two of DiT's blocks, not
extra ones, and the learnable positions replace DiT's fixed ones (which DiT's count includes). The
paper's models are larger by about 9 W^2 (L: 8.9 M = 8.5 W^2 at W = 1024; XL: 11.9 M = 8.9 W^2 at
W = 1152), half an adaLN-Zero block (18 W^2): the paper's RefineNet holds parameters of its own
beyond a share of DiT's depth, which its text does not describe (a wider or extra block, or a
separate embedding and output head for the fine regions would each fit). We keep DiT's block
budget so that D²iT and DiT compare at equal size; add blocks with ``model.refine_depth``.
"""

from nativetok_jax.config import config_choice, d2it_config


def get_config(arg: str | None = None):
    # No default: the argument picks the model's size.
    config = d2it_config(config_choice("configs/d2it.py", arg, ("B", "L", "XL")))
    config.model.dtype = "bfloat16"
    # Compiled for v5p:2x2x1 at batch 256 (docs/benchmarks_tpu.md): blocks rematerialised keeping
    # their weight products (layer norms, GELU and the attention recomputed, no attention scores
    # stored), attention scores and softmax in bfloat16, and the grain transformer, which trains in
    # the same step, computing in bfloat16 too (its parameters and logits stay float32): D²iT-XL
    # needs 27 GiB per chip (67.5 with nothing rematerialised) and XLA's estimated MFU is 0.505
    # (0.40 with nothing rematerialised, 0.47 keeping every product with float32 scores).
    config.model.attention_logits = "compute"
    config.model.update(remat=True, remat_policy="dots_with_no_batch_dims_saveable")
    config.grain_transformer.dtype = "bfloat16"
    return config


def print_parameter_counts() -> None:
    """Prints the table above, computed without allocating the weights."""
    from flax import nnx

    from nativetok_jax.models.d2it.content_transformer import d2it, parameter_count
    from nativetok_jax.models.dit.transformer import dit

    for size in ("B", "L", "XL"):
        ours = parameter_count(nnx.eval_shape(lambda: d2it(size, rngs=nnx.Rngs(0))))
        base = parameter_count(nnx.eval_shape(lambda: dit(size, rngs=nnx.Rngs(0))))
        print(f"D²iT-{size}: {ours:,} (DiT-{size}/2 {base:,}, +{ours - base:,})")


if __name__ == "__main__":
    print_parameter_counts()
