"""Hierarchical Native Training at demo size: a 32-id code grown to 64 ids, then a short full fine-tune.

The demo's code is its mean colour's 2 ids and 30 learned tokens (``model.shortcut``). Stage 1
trains the demo tokenizer. Stage 2 restores it, adds 32 experts (and decoder positions) for
tokens 31..62, freezes the MIT, the first 30 experts, the token head and the codebook (so the
first 32 ids of every image stay exactly those of stage 1), and trains the rest. Stage 3
fine-tunes everything. Each stage lives in its own sub-directory of the workdir.
"""

import os

from nativetok_jax.config import load_config_file


def get_config():
    config = load_config_file(os.path.join(os.path.dirname(os.path.abspath(__file__)), "demo.py"))
    config.hnt.stages = (
        dict(name="stage1_32ids", num_tokens=30, num_steps=800, frozen=(), quantizer_warmup_steps=400),
        dict(name="stage2_64ids", num_tokens=62, num_steps=400,
             frozen=("mit", "old_experts", "token_head", "quantizer")),
        dict(name="stage3_finetune", num_tokens=62, num_steps=200, frozen=()),
    )
    return config
