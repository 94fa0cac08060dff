"""A tiny NativeTok for a 2-core CPU: 32 px images, 4 px patches, 32 tokens.

Same structure as the paper's model (MIT -> 32 causal experts -> 4096 x 12 codebook -> ViT
decoder with a pixel head), small widths so that a round trip, a benchmark or a short training
run fits on a laptop.
"""

from nativetok_jax.config import base_config


def get_config():
    config = base_config()
    m = config.model
    m.image_size = 32
    m.patch_size = 4
    m.num_tokens = 32
    m.encoder.update(width=128, depth=2, num_heads=4)
    m.experts.update(width=64, depth=2, num_heads=2)
    m.decoder.update(width=128, depth=2, num_heads=4)
    return config
