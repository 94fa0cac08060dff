"""The routing experiment at demo scale (``python -m nativetok_jax.experiments.grain_routing``):
configs/dvae_demo.py's DVAE (block-mean shortcut included), data, optimiser and 900-step schedule
for each of the five arms, evaluated and checkpointed at the end; an arm takes about 8 minutes of
2 idle cores, the five about 40 (docs/dvae_and_d2it.md has the measured table). ``--steps N``
changes the schedule; any other field with ``--config.train.batch_size=...`` and the like, for
every arm.
"""

import os

from nativetok_jax.config import load_config_file


def get_config():
    config = load_config_file(os.path.join(os.path.dirname(os.path.abspath(__file__)), "dvae_demo.py"))
    t = config.train
    t.eval_every = t.checkpoint_every = t.num_steps
    return config
