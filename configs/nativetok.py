"""NativeTok at the paper's sizes, 256 px; the argument is the token count (32, 64 or 128), and it
is required (``configs/nativetok.py`` alone is a one-line error, not a 582 M model by default).

    --config configs/nativetok.py:64
    --config configs/nativetok.py:128,hnt

``64,hnt`` and ``128,hnt`` train with Hierarchical Native Training (paper Sec. 3.3): stages of 32,
then 64 (then 128) tokens, each restoring the last, adding experts for the new positions and
freezing the MIT, the earlier experts, the token head and the codebook; then a full fine-tune.
The paper gives no schedule: the stage step counts below are fields (``hnt.stages``), not its.

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


HNT_CHOICES = ("64,hnt", "128,hnt")
GROWTH_FROZEN = ("mit", "old_experts", "token_head", "quantizer")
HNT_STEPS = {32: 250_000, 64: 250_000, 128: 250_000, "finetune": 100_000}  # not the paper's (it gives none)


def hnt_stages(num_tokens: int) -> tuple[dict, ...]:
    """32 tokens, then doubling up to ``num_tokens`` with the earlier parts frozen, then a full
    fine-tune (see the module docstring)."""
    stages = [dict(name="tokens_32", num_tokens=32, num_steps=HNT_STEPS[32], frozen=())]
    tokens = 32
    while tokens < num_tokens:
        tokens *= 2
        stages.append(dict(name=f"grow_{tokens}", num_tokens=tokens, num_steps=HNT_STEPS[tokens], frozen=GROWTH_FROZEN))
    stages.append(dict(name="finetune", num_tokens=num_tokens, num_steps=HNT_STEPS["finetune"], frozen=()))
    return tuple(stages)


def get_config(num_tokens: str | None = None):
    # No default: without ':32' this would silently be the 582 M model at batch 256.
    config = base_config()
    choice = config_choice("configs/nativetok.py", num_tokens, TOKEN_COUNTS + HNT_CHOICES)
    config.model.num_tokens = int(choice.split(",")[0])
    if choice in HNT_CHOICES:
        config.hnt.stages = hnt_stages(config.model.num_tokens)
    config.model.dtype = "bfloat16"  # see the docstring
    config.model.attention_logits = "compute"  # bfloat16 scores and softmax: see the docstring
    for stack in (config.model.encoder, config.model.decoder):
        stack.update(remat=True, remat_policy="dots_with_no_batch_dims_saveable")  # see the docstring
    # 16 expert scans instead of 4: fewer masked slot rows computed; XLA's estimated step on v5p is
    # 8 % shorter for NativeTok-128 (32 scans: no shorter, a longer compile; docs/benchmarks_tpu.md).
    config.model.experts.chunks = 16
    return config
