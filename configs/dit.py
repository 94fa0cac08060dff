"""DiT (Peebles & Xie 2023) on SD-VAE latents: ImageNet 256 px, DiT's recipe.

    --config configs/dit.py:B         # DiT-B/2: 12 x 768, 12 heads, 130.5 M parameters
    --config configs/dit.py:XL/2      # DiT-XL/2: 28 x 1152, 16 heads, 675.1 M (FID 2.27 with guidance 1.5)
    --config configs/dit.py:S/8       # the smallest; sizes S, B, L, XL and patches 2, 4, 8

The argument is required (SIZE alone means SIZE/2).
    --config.model.autoencoder.weights=sd_vae_ft_ema.npz

    python -m nativetok_jax.main --config configs/dit.py:B --workdir gs://bucket/dit_b2 \
        --config.model.autoencoder.weights=gs://bucket/sd_vae_ft_ema.npz --config.data.tfds_data_dir=gs://bucket/tfds

The SD-VAE weights are the public ``stabilityai/sd-vae-ft-ema`` (DiT's) converted once with
``python -m nativetok_jax.convert sd-vae diffusion_pytorch_model.safetensors --out sd_vae_ft_ema.npz``.
The training images (ImageNet's train split from TFDS, centre crops at 256 px) are encoded once,
with their flips, into ``<workdir>/latents`` (or ``--config.latents.directory``, to share it between
runs); each step trains on a random flip and a fresh draw from the VAE posterior.
Recipe (``config.dit_config``, facebookresearch/DiT ``train.py``): AdamW lr 1e-4 constant, betas
(0.9, 0.999), no weight decay, batch 256, EMA 0.9999, label dropout 0.1, 400K steps (DiT-B/2's
FID is reported there), bfloat16 compute with float32 diffusion arithmetic. The held-out
epsilon-MSE at t = 100, 500, 900 and a DDIM-50 grid (guidance 4.0) are written every 10K steps.
Sampling (``python -m nativetok_jax.sample``) defaults to DiT's FID protocol: DDPM with 250
respaced steps, guidance 1.5 on every channel (``model.sample.guided_channels=3`` reproduces DiT's
first-three-channels run exactly).
Memory and speed: each block is rematerialised keeping its weight products
(``remat_policy="dots_with_no_batch_dims_saveable"``: layer norms, GELU and the attention are
recomputed, the attention scores are never stored), and the attention's scores and softmax are
bfloat16 (``attention_logits="compute"``). Compiled for v5p:2x2x1 at batch 256, DiT-XL/2 needs 28
GiB per chip instead of 68 with nothing rematerialised, and XLA's estimated step is 6 % shorter
than with float32 scores and ``dots_saveable`` (docs/benchmarks_tpu.md);
``--config.model.remat=False`` keeps everything.
"""

from nativetok_jax.config import config_choice, dit_config

CHOICES = ("S", "B", "L", "XL") + tuple(f"{s}/{p}" for s in ("S", "B", "L", "XL") for p in (2, 4, 8))


def get_config(arg: str | None = None):
    # No default: the argument picks the model's size (SIZE alone is SIZE/2).
    size, _, patch = config_choice("configs/dit.py", arg, CHOICES).partition("/")
    config = dit_config(size, int(patch or 2))
    config.model.dtype = "bfloat16"
    config.model.attention_logits = "compute"  # see the docstring
    config.model.update(remat=True, remat_policy="dots_with_no_batch_dims_saveable")  # see the docstring
    return config
