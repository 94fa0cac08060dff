"""The dynamic-grain experiment at demo scale (``python -m nativetok_jax.experiments.dynamic_grain``):
both VAEs from configs/grain_routing.py (the demo DVAE with its block-mean shortcut, cut to 400
steps each to keep this experiment's budget: the entropy-routed one and the single-grain one of
equal latent floats), both diffusion arms from configs/d2it_demo.py with a
shorter schedule (``d2it.train.num_steps``; ``--steps N`` changes it for both arms), and the
evaluation's sample counts and sampler (``evaluation``). Sized for 30 minutes on 2 unloaded cores:
docs/dvae_and_d2it.md gives the measured CPU time.
"""

import os

import ml_collections

from nativetok_jax.config import load_config_file

HERE = os.path.dirname(os.path.abspath(__file__))


def get_config():
    config = ml_collections.ConfigDict()
    config.dvae = load_config_file(os.path.join(HERE, "grain_routing.py"))
    v = config.dvae.train
    v.num_steps = 400
    v.warmup_steps = 40
    v.eval_every = v.checkpoint_every = 400
    d2it = load_config_file(os.path.join(HERE, "d2it_demo.py"))
    t = d2it.train
    t.num_steps = 600
    t.warmup_steps = 60
    t.eval_every = t.checkpoint_every = 600
    t.preview.num_samples = 11
    d2it.latents.num_train_examples = 2048
    config.d2it = d2it
    config.evaluation = ml_collections.ConfigDict(dict(
        num_samples=66,  # 6 per photograph-class
        sampler="ddim", num_steps=25, guidance_scale=1.0, seed=0,
        batch_size=64,
        bound_terms=50,  # KL terms evaluated of the 1000 (t = 0 always); None: all 1000
    ))
    return config
