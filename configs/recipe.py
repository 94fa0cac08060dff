"""The paper's training recipe at 256 px (TiTok's two stages, which NativeTok follows).

    --config configs/recipe.py:nativetok,32 \
    --config.pretrained.maskgit_vqgan=weights/maskgit_vqgan.npz \
    --config.pretrained.lpips=weights/lpips.npz \
    --config.data.source=tfds --config.data.tfds_name=imagenet2012 --config.data.tfds_data_dir=...

The argument is ``KIND,TOKENS`` (``nativetok`` or ``titok``; any positive token count, the paper's 32, 64 or 128), and it is required.

Stage 1, ``proxy_codes``: the decoder's proxy-code head learns, per 16x16 cell, the MaskGIT
VQGAN's code of each image (cross-entropy), with the quantiser's losses. Stage 2,
``decoder_finetune``: the encoder, experts, token head and codebook are frozen; the decoder's
soft codes go through the frozen VQGAN decoder to pixels, trained with L2 + LPIPS + the patch GAN
(adaptive weight, LeCam), the GAN switched on after a warm-up. The weight files come from
``python -m nativetok_jax.convert`` (see the README). Step counts are config fields: the paper
does not state them (docs/nativetok.md); TiTok's optimiser settings are the defaults.
"""

import os

from nativetok_jax.config import ConfigError, config_choice, load_config_file

# The model and how it computes (bfloat16, remat policies, expert scans) come from the model's
# paper config: in float32 keeping every activation, NativeTok-128's stage-1 step needs 136 GiB
# of temporaries per v5p chip at batch 256 (docs/benchmarks_tpu.md, "The recipe's stages").
MODEL_CONFIGS = {
    "nativetok": "nativetok.py:32",  # MIT 1024 x 18, experts 256 x 2, TiTok-L decoder
    "titok": "titok.py:32",  # TiTok-L encoder, the same decoder
}
FROZEN_IN_FINETUNE = {
    "nativetok": ("mit", "experts", "token_head", "quantizer"),
    "titok": ("encoder", "token_head", "quantizer"),
}


def get_config(arg: str | None = None):
    # No default: the argument picks the model the recipe trains (any token count).
    if not arg:
        config_choice("configs/recipe.py", arg, ("nativetok,32", "nativetok,64", "titok,32", "KIND,TOKENS"))
    kind, _, tokens = arg.partition(",")
    config_choice("configs/recipe.py", kind, tuple(MODEL_CONFIGS))
    if not tokens.isdigit() or int(tokens) < 1:
        raise ConfigError(f"configs/recipe.py:{arg}: expected KIND,TOKENS with TOKENS a positive integer, "
                          f"e.g. configs/recipe.py:{kind},32")
    config = load_config_file(os.path.join(os.path.dirname(os.path.abspath(__file__)), MODEL_CONFIGS[kind]))
    config.model.num_tokens = int(tokens)  # every other size is the same for any token count
    config.model.decoder.head = "proxy_codes"
    config.model.decoder.proxy_codebook_size = 1024
    config.train.losses.update(proxy="codes", proxy_weight=1.0)
    config.discriminator.update(width=64, depth=3, norm="batch", learning_rate=1e-4)
    config.hnt.stages = (
        dict(name="proxy_codes", num_tokens=config.model.num_tokens, num_steps=1_000_000),
        dict(
            name="decoder_finetune",
            num_tokens=config.model.num_tokens,
            num_steps=500_000,
            frozen=FROZEN_IN_FINETUNE.get(kind, ()),
            overrides=(
                ("model.decoder.proxy_decoding", "soft"),
                ("train.losses.proxy", "pixels"),
                ("train.losses.pixel", "l2"),
                ("train.losses.pixel_weight", 1.0),
                ("train.losses.perceptual_weight", 1.0),
                ("train.losses.adversarial_weight", 0.1),
                ("train.losses.adversarial_start_step", 20_000),
                ("train.losses.lecam_weight", 0.001),
                ("train.warmup_steps", 5_000),
            ),
        ),
    )
    return config
