"""NativeTok at base size, 256 px: a ViT-B-sized MIT (768 x 12, 12 heads), one 256 x 2-layer
expert per token (32 by default; the argument sets the count), the 4096 x 12 codebook and a
TiTok-B decoder (768 x 12). Half the paper-scale model; the train benchmark's second row.
"""

from nativetok_jax.config import base_config, config_choice


def get_config(num_tokens: str | None = None):
    config = base_config()
    config.model.num_tokens = int(config_choice("configs/nativetok_base.py", num_tokens, ("32", "64", "128"), default="32"))
    config.model.encoder.update(width=768, depth=12, num_heads=12)
    config.model.decoder.update(width=768, depth=12, num_heads=12)
    return config
