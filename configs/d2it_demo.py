"""A class-conditional D²iT that trains from a fresh clone on a 2-core CPU in about 10 minutes, on the
demo Dynamic VAE (configs/dvae_demo.py: 32 px crops of the photographs bundled with scikit-image,
fine latent 8 x 8 x 4, grain map 4 x 4 regions of 8 px, half of them fine).

    python -m nativetok_jax.main --config configs/dvae_demo.py --workdir workdirs/dvae_demo
    python -m nativetok_jax.main --config configs/d2it_demo.py --workdir workdirs/d2it_demo
    python -m nativetok_jax.sample --workdir workdirs/d2it_demo --sampler ddim --num_steps 50 --guidance_scale 4

``dvae.workdir`` is the first command's workdir (``--config.dvae.workdir=...`` for another). The
training crops (4,096, 5-20 % of a photograph's short side, as the DVAE's) and 128 held-out ones
are encoded once into the DVAE's grain latent stores (``workdirs/dvae_demo/grain_latents``), each
with its flip, labelled by photograph (11 classes).

Both transformers train in one state, one step summing their losses (see
:mod:`nativetok_jax.models.d2it.dynamic_diffusion_transformer` for why) [C]:

- the Dynamic Content Transformer at a laptop's size: width 128, 3 trunk blocks + 1 RefineNet
  block, 4 heads, one token per 8 px region (16 tokens), learned grain embedding, learnable
  positions, the dynamic grain loss (0.25, 1), DiT's diffusion (linear, 1000 steps, learned sigma,
  label dropout 0.1);
- the Dynamic Grain Transformer (MaskGIT over the 4 x 4 binary map): width 64, 2 blocks, 2 heads.

DiT's recipe otherwise (AdamW constant rate, no weight decay), with what a 10-minute run needs [C]
(as configs/dit_demo.py): learning rate 1e-3 with a 100-step warm-up, batch 32, EMA 0.995 (the
held-out numbers and the samples use the EMA weights).

Ablation rows of the paper's Table 4 as switches: ``--config.model.diffusion.grain_loss='(1.0, 1.0)'``
(no dynamic grain loss), ``--config.model.refine_depth=0 --config.model.learnable_positions=False``
(no RefineNet, fixed positions), ``--config.model.grain_embedding=False``; Table 5's grain-map
rows at sampling: ``python -m nativetok_jax.sample ... --grain_maps random|ground_truth|model``.

Sizing (measured on the shared 2-core machine, load 9 to 14, so from CPU time, not wall time): a
train step of 32 examples takes 0.15 CPU-seconds (both transformers: 1.28 M + 0.10 M parameters,
16 tokens), so 2,500 steps are about 380 CPU-seconds; with the encoding of 4,096 crops and their
flips by the DVAE, compiles and two evaluations (each: 3 x 128 held-out forwards, the grain NLL and
a DDIM-50 guided grid of 22 samples) the whole run used 507 CPU-seconds (407 user, 100 system;
19 min of wall time there), i.e. about 4.2 min of two unloaded cores, 8.5 at most with one.
"""

import os

from nativetok_jax.config import d2it_config, load_config_file

HERE = os.path.dirname(os.path.abspath(__file__))


def get_config():
    config = d2it_config("B")
    m = config.model
    m.size = "demo"
    m.image_size, m.fine_factor, m.latent_channels = 32, 4, 4  # the demo DVAE's fine latent: 8 x 8 x 4
    m.width, m.depth, m.refine_depth, m.num_heads = 128, 3, 1, 4
    m.num_classes = 11  # the training photographs
    m.sample.update(method="ddim", respacing="ddim50", guidance_scale=4.0)

    g = config.grain_transformer
    g.width, g.depth, g.num_heads = 64, 2, 2

    config.dvae.workdir = "workdirs/dvae_demo"
    # The DiT demo's data, store sizes, optimiser, preview and mesh (its docstring says why each).
    dit_demo = load_config_file(os.path.join(HERE, "dit_demo.py"))
    for section in ("data", "latents", "mesh"):
        config[section] = dit_demo[section]
    config.train.update(dit_demo.train.to_dict())  # keeps train.grain_loss_weight (1.0)
    t = config.train
    t.num_steps = 2500  # a step costs far less than the DiT demo's (16 tokens, not 64): see the docstring
    t.ema_decay = 0.995
    t.eval_every = 1250
    return config
