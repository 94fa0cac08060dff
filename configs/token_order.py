"""The token-order experiment: do native (causally ordered) tokens make generation easier?

    python -m nativetok_jax.experiments.token_order --config configs/token_order.py --workdir workdirs/token_order
    --config configs/token_order.py:imagenet   # the paper's scale: NativeTok-32 vs TiTok-L-32, LlamaGen-B

NativeTok and the order-free TiTok-style baseline are trained with the same data, budget
(steps x batch), codebook (4096 x 12) and token count (32); each tokenizer's training images are
encoded once, and the same AR generator (same size, steps, seed) is trained on each token set.
Reported: held-out NLL per token and by position, and both tokenizers' held-out PSNR.

The demo scale is sized to finish within 30 minutes on a 2-core CPU machine even on a slow day
(when a demo step takes 330 ms rather than 200): each tokenizer trains for 1,500 steps rather than the
demo's 2,300 (the schedule scaled with it), each generator for 500 steps rather than 1,000,
and the generators are judged on 256 held-out crops. Measured: 27.5 minutes on such a slow day
(tokenizers 10.5 and 7 minutes, generators with their token extraction about 5 each).
"""

import os

import ml_collections

from nativetok_jax.config import load_config_file

CONFIGS = os.path.dirname(os.path.abspath(__file__))
TOKENIZER_STEPS = 1500
GENERATOR_STEPS = 500


def shorten_schedule(train: ml_collections.ConfigDict, num_steps: int) -> None:
    """Runs ``num_steps`` with evaluations at the half and the end and a checkpoint every half."""
    train.num_steps = num_steps
    train.eval_every = num_steps // 2
    train.checkpoint_every = num_steps // 2


def get_config(scale: str = "demo"):
    config = ml_collections.ConfigDict()
    if scale == "imagenet":
        native = load_config_file(os.path.join(CONFIGS, "recipe.py:nativetok,32"))
        order_free = load_config_file(os.path.join(CONFIGS, "recipe.py:titok,32"))
        generator = load_config_file(os.path.join(CONFIGS, "gen_imagenet.py:ar,B"))
        for tokenizer in (native, order_free):
            tokenizer.data = generator.data
    else:
        native = load_config_file(os.path.join(CONFIGS, "demo.py"))
        order_free = load_config_file(os.path.join(CONFIGS, "demo.py"))
        order_free.model.kind = "titok"  # latent tokens in one bidirectional encoder of the MIT's size
        generator = load_config_file(os.path.join(CONFIGS, "gen_demo.py"))
        generator.data = native.data
        for tokenizer in (native, order_free):
            shorten_schedule(tokenizer.train, TOKENIZER_STEPS)
        shorten_schedule(generator.train, GENERATOR_STEPS)
        generator.generator.num_eval_examples = 256
    config.native = native
    config.order_free = order_free
    config.generator = generator
    return config
