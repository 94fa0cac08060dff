"""A tiny D²iT Dynamic VAE for a 2-core CPU: 32 px crops, fine grain f4 (8 x 8 latent), coarse f8,
entropy regions of S = 8 px (16 per crop), half of them fine.

The network has docs/d2it.md's structure (dual-grain VQGAN-style encoder with a mid stack and a
mean/log-variance head per grain, neighbour copying, position embeddings, fine-grid decoder)
with widths for a laptop; the crops are those of configs/demo.py (5-20 % of a bundled
photograph's short side). The entropy thresholds for these crops ship beside this file
(``dvae_demo_thresholds.json``, made by ``python -m nativetok_jax.grain_thresholds --config
configs/dvae_demo.py --out configs/dvae_demo_thresholds.json``); rerun that after changing the
data, the image size or ``model.grain``'s entropy fields, since a file measured with other
settings is refused.
"""

import os

from nativetok_jax.config import dvae_config


def get_config():
    config = dvae_config()
    m = config.model
    m.image_size = 32
    m.filters = 32  # 16: 0.7 dB less at the same wall time (docs/models_that_learn.md)
    m.channel_multipliers = (1, 2, 2, 4)  # 4 levels: coarse f8, fine f4
    m.num_res_blocks = 1
    m.attention_resolutions = ()  # the two mid stacks still attend (4 x 4 and 8 x 8 positions)
    m.num_groups = 8
    m.latent_channels = 4
    # The block-mean shortcut [C] (models/d2it/dvae.py): the networks learn a residual over the
    # block-mean codec of the same routing; without it 10 minutes of 2 cores stay under that codec
    # (docs/models_that_learn.md).
    m.shortcut = "block_mean"
    m.grain.thresholds = os.path.join(os.path.dirname(os.path.abspath(__file__)), "dvae_demo_thresholds.json")

    d = config.data
    d.source = "photos"
    d.crop_min, d.crop_max = 0.05, 0.2
    # 256 crops of each of the 4 held-out photographs: 64 (16 a photograph) misjudged the tokenizer
    # demo against its codec by about 1 dB (docs/models_that_learn.md, "Smooth crops").
    d.num_eval_images = 1024

    t = config.train
    # Sized for 10 minutes of 2 idle cores, start-up, two evaluations and the latent scale included
    # (docs/models_that_learn.md has the measured run).
    t.num_steps = 900
    t.batch_size = 32
    t.learning_rate = 1e-3
    t.warmup_steps = 50
    t.weight_decay = 0.0
    t.ema_decay = 0.99
    t.latent_scale_batches = 32  # 1,024 training crops: the fine fraction to about +-0.01
    # No pretrained files in the demo: L1 + KL only (LPIPS and the patch GAN need converted weights).
    t.losses.pixel = "l1"
    t.losses.perceptual_weight = 0.0
    t.losses.adversarial_weight = 0.0
    t.losses.kl_weight = 1e-6
    t.log_every = 50
    t.eval_every = 450
    t.checkpoint_every = 450
    config.mesh.update(data=-1, fsdp=1, model=1)
    return config
