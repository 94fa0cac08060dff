"""A demo generator on the demo tokenizer's ids: trains on a 2-core CPU in about 4 minutes.

    python -m nativetok_jax.main --config configs/demo.py --workdir workdirs/demo
    python -m nativetok_jax.main --config configs/gen_demo.py --workdir workdirs/gen_demo
    python -m nativetok_jax.sample --workdir workdirs/gen_demo --out workdirs/gen_demo/samples

The argument picks the generator: ``ar`` (default; a small LlamaGen-style GPT) or ``maskgit``.
The tokenizer is read from ``workdirs/demo`` (``--config.generator.tokenizer=...`` to change).
The training set is 20,000 crops of the bundled photographs, cropped as the demo tokenizer
trained (encoded once into ``<workdir>/tokens``); held out: 64 crops of other photographs.
The photographs have no classes, so every sample is "class 0" (plus the null class that
classifier-free guidance uses).
"""

import os

from nativetok_jax.config import config_choice, generator_config, load_config_file


def get_config(kind: str | None = None):
    kind = config_choice("configs/gen_demo.py", kind, ("ar", "maskgit"), default="ar")  # the demo's
    demo = load_config_file(os.path.join(os.path.dirname(os.path.abspath(__file__)), "demo.py"))
    config = generator_config()
    config.data = demo.data
    g = config.generator
    g.kind = kind
    g.tokenizer = "workdirs/demo"
    g.width, g.depth, g.num_heads = 128, 3, 4
    g.num_train_examples = 20_000
    g.num_eval_examples = 64
    g.sample.update(num_samples=16, temperature=1.0, top_k=0, top_p=1.0, guidance_scale=1.0)
    t = config.train
    t.num_steps = 1000  # about 4 minutes here (extraction included)
    t.batch_size = 64
    t.learning_rate = 1e-3
    t.warmup_steps = 100
    t.weight_decay = 0.05
    t.log_every = 50
    t.eval_every = 500
    t.checkpoint_every = 500
    return config
