"""NativeTok at the paper's sizes, 256 px; the argument is the token count (32, 64 or 128), and it
is required (``configs/nativetok.py`` alone is a one-line error, not a 582 M model by default).

    --config configs/nativetok.py:64

MIT: width 1024, 18 layers, 16 heads (the prototype used 4; see nativetok_jax/config.py).
Experts: one per token, width 256, 2 layers, 4 heads. Codebook 4096 x 12, l2-normalised.
Decoder: TiTok-L (width 1024, 24 layers, 16 heads) with the pixel head; set
--config.model.decoder.head=proxy_codes for the MaskGIT-VQGAN proxy-code head.

bfloat16 compute (parameters float32) and every stack rematerialised: compiled for v5p:2x2x1 at
the paper's batch of 256, NativeTok-128 in float32 with MIT and decoder kept needs 136 GiB of
temporaries per chip (XLA refuses it). The MIT and decoder keep their weight products
(``dots_with_no_batch_dims_saveable``: only layer norms, GELU and the attention are recomputed),
the experts keep nothing (``nothing_saveable``; keeping their products made XLA's estimated step
longer, not shorter) and run in 16 scans, and attention scores and softmax are bfloat16
(``attention_logits = "compute"``): XLA's estimated step is 20 % shorter than with float32 scores,
whole-layer recomputation and 4 expert scans, in 43 GiB per chip (docs/benchmarks_tpu.md,
"Attention scores in bfloat16 and weight-product remat").
"""

from nativetok_jax.config import base_config, config_choice

TOKEN_COUNTS = ("32", "64", "128")


def get_config(num_tokens: str | None = None):
    # No default: without ':32' this would silently be the 582 M model at batch 256.
    config = base_config()
    config.model.num_tokens = int(config_choice("configs/nativetok.py", num_tokens, TOKEN_COUNTS))
    config.model.dtype = "bfloat16"  # see the docstring
    config.model.attention_logits = "compute"  # bfloat16 scores and softmax: see the docstring
    for stack in (config.model.encoder, config.model.decoder):
        stack.update(remat=True, remat_policy="dots_with_no_batch_dims_saveable")  # see the docstring
    # 16 expert scans instead of 4: fewer masked slot rows computed; XLA's estimated step on v5p is
    # 8 % shorter for NativeTok-128 (32 scans: no shorter, a longer compile; docs/benchmarks_tpu.md).
    config.model.experts.chunks = 16
    return config
