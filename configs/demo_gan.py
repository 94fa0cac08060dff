"""The demo tokenizer trained with the full pixel objective: L2 + LPIPS + the patch GAN.

    python -m nativetok_jax.main --config configs/demo_gan.py --workdir /tmp/demo_gan \
        --config.pretrained.lpips=weights/lpips.npz
    --config configs/demo_gan.py:titok      # the order-free baseline, same sizes and recipe

The LPIPS weights file is converted once from the public files (docs/pretrained.md).
Like VQGAN, the GAN starts once the reconstructions are reasonable: here when the quantiser
starts (a quarter of the way), with VQGAN's adaptive weight and a small LeCam term; the discriminator is
scaled to 32 px crops (two stride-2 layers: 6x6 patch logits).
"""

import os

from nativetok_jax.config import config_choice, load_config_file


def get_config(kind: str | None = None):
    kind = config_choice("configs/demo_gan.py", kind, ("nativetok", "titok"), default="nativetok")  # the demo's
    config = load_config_file(os.path.join(os.path.dirname(os.path.abspath(__file__)), "demo.py"))
    config.model.kind = kind
    if kind == "titok":  # the same latent width as the demo's experts
        config.model.encoder.update(width=128, depth=3, num_heads=4)
    config.train.losses.update(
        perceptual_weight=0.1,
        adversarial_weight=0.1,
        # A fraction, not a step count: the start follows --config.train.num_steps as the warm-up does.
        adversarial_start_fraction=config.train.quantizer_warmup_fraction,
        adaptive_adversarial_weight=True,
        lecam_weight=0.001,
    )
    config.discriminator.update(width=32, depth=2, norm="group", learning_rate=1e-4)
    return config
