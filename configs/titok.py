"""The order-free baseline, TiTok (Yu et al. 2024), in two forms.

A token count (default 32) is the baseline we train beside NativeTok: a ViT-L encoder (1024 x 24,
16 heads) holding learned latent tokens, with NativeTok's codebook (4096 x 12) and decoder
(TiTok-L). A release name (``L-32``, ``B-64``, ``S-128``) is the exact architecture of TiTok's
released tokenizer of that name (``config.titok_release_config``), for the weights that
``python -m nativetok_jax.convert titok`` converts (it writes this config beside them).

    --config configs/titok.py          # the TiTok-L-32 baseline (our decoder, pixel head)
    --config configs/titok.py:64       # the same with 64 tokens
    --config configs/titok.py:B-64     # TiTok-B-64's released architecture

bfloat16 compute (parameters float32), encoder and decoder rematerialised: compiled for v5p:2x2x1
at batch 256 it needs 18 GiB per chip; in float32 keeping every activation, 135 GiB of
temporaries, which XLA refuses (docs/benchmarks_tpu.md).
"""

from nativetok_jax.config import TITOK_RELEASES, base_config, config_choice, titok_release_config


def get_config(arg: str | None = None):
    if arg and "-" in arg:
        return titok_release_config(arg)
    config = base_config()
    config.model.kind = "titok"
    config.model.num_tokens = int(config_choice("configs/titok.py", arg, ("32", "64", "128", *TITOK_RELEASES),
                                                default="32"))
    config.model.encoder.update(width=1024, depth=24, num_heads=16)
    config.model.dtype = "bfloat16"  # see the docstring
    config.model.encoder.remat = config.model.decoder.remat = True
    return config
