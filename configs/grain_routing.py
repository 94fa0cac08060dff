"""The routing experiment at demo scale (``python -m nativetok_jax.experiments.grain_routing``):
configs/dvae_demo.py's DVAE, data and optimiser, with a short schedule for each of the five arms
(400 steps of 32 crops; evaluated and checkpointed at the end; at the demo's 32 filters an arm
takes about 3.5 minutes of 2 idle cores). ``--steps N`` changes it; any
other field with ``--config.train.batch_size=...`` and the like, for every arm.
"""

import os

from nativetok_jax.config import load_config_file


def get_config():
    config = load_config_file(os.path.join(os.path.dirname(os.path.abspath(__file__)), "dvae_demo.py"))
    t = config.train
    t.num_steps = 400
    t.warmup_steps = 40
    t.eval_every = t.checkpoint_every = 400
    t.log_every = 50
    return config
