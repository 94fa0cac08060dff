"""The order-free baseline, TiTok-L: a ViT-L encoder (1024 x 24, 16 heads) holding learned latent
tokens, with NativeTok's codebook (4096 x 12) and decoder (TiTok-L). The argument is the token
count; the default, 32, is TiTok-L-32.

    --config configs/titok.py        # TiTok-L-32

bfloat16 compute (parameters float32), encoder and decoder rematerialised: compiled for v5p:2x2x1
at batch 256 it needs 18 GiB per chip; in float32 keeping every activation, 135 GiB of
temporaries, which XLA refuses (docs/benchmarks_tpu.md).
"""

from nativetok_jax.config import base_config


def get_config(num_tokens: str | None = None):
    config = base_config()
    config.model.kind = "titok"
    config.model.num_tokens = int(num_tokens or 32)
    config.model.encoder.update(width=1024, depth=24, num_heads=16)
    config.model.dtype = "bfloat16"  # see the docstring
    config.model.encoder.remat = config.model.decoder.remat = True
    return config
