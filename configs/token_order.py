"""The token-order experiment: do native (causally ordered) tokens make generation easier?

    python -m nativetok_jax.experiments.token_order --config configs/token_order.py --workdir workdirs/token_order
    --config configs/token_order.py:imagenet   # the paper's scale: NativeTok-32 vs TiTok-L-32, LlamaGen-B

NativeTok and the order-free TiTok-style baseline are trained with the same data, budget
(steps x batch), codebook (4096 x 12) and token count (32); each tokenizer's training images are
encoded once, and the same AR generator (same size, steps, seed) is trained on each token set.
Reported: held-out NLL per token and by position, and both tokenizers' held-out PSNR. The demo
scale took 41 minutes on a slow day of a 2-core CPU machine (tokenizers 14.7 and 10 minutes,
generators about 8 each), about 30 on a day when the demo tokenizer takes its usual 9 minutes.
"""

import os

import ml_collections

from nativetok_jax.config import load_config_file

CONFIGS = os.path.dirname(os.path.abspath(__file__))


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
    config.native = native
    config.order_free = order_free
    config.generator = generator
    return config
