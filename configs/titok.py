"""The order-free baseline, TiTok-L: a ViT-L encoder (1024 x 24, 16 heads) holding learned latent
tokens, with NativeTok's codebook (4096 x 12) and decoder (TiTok-L). The argument is the token
count; the default, 32, is TiTok-L-32.

    --config configs/titok.py        # TiTok-L-32
"""

from nativetok_jax.config import base_config, config_choice


def get_config(num_tokens: str | None = None):
    config = base_config()
    config.model.kind = "titok"
    config.model.num_tokens = int(config_choice("configs/titok.py", num_tokens, ("32", "64", "128"), default="32"))
    config.model.encoder.update(width=1024, depth=24, num_heads=16)
    return config
