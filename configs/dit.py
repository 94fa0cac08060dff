"""DiT (Peebles & Xie 2023) on SD-VAE latents: ImageNet 256 px, DiT's recipe.

    --config configs/dit.py:B         # DiT-B/2: 12 x 768, 12 heads, 130.5 M parameters
    --config configs/dit.py:XL/2      # DiT-XL/2: 28 x 1152, 16 heads, 675.1 M (FID 2.27 with guidance 1.5)
    --config configs/dit.py:S/8       # the smallest; sizes S, B, L, XL and patches 2, 4, 8
    --config.model.autoencoder.weights=sd_vae_ft_ema.npz

The SD-VAE weights are the public ``stabilityai/sd-vae-ft-ema`` (DiT's) converted once with
``python -m nativetok_jax.convert sd-vae diffusion_pytorch_model.safetensors --out sd_vae_ft_ema.npz``.
Sampling defaults to DiT's FID protocol: DDPM with 250 respaced steps, guidance 1.5 on every
channel (``model.sample.guided_channels=3`` reproduces DiT's first-three-channels run exactly).
Recipe (to come with the diffusion trainer): AdamW lr 1e-4 constant, betas (0.9, 0.999), no weight
decay, batch 256, EMA 0.9999, random flips, latents re-sampled from the VAE posterior each step.
"""

import ml_collections

from nativetok_jax.config import dit_model_config


def get_config(arg: str = "B"):
    size, _, patch = arg.partition("/")
    config = ml_collections.ConfigDict()
    config.task = "diffusion"
    config.model = dit_model_config(size or "B", int(patch or 2))
    config.model.dtype = "bfloat16"
    return config
