"""Second-stage generators at the paper's scale, on ImageNet-1K 256 px tokens.

    --config configs/gen_imagenet.py:ar,B      # LlamaGen-B: 12 layers, width 768, 12 heads (the paper's)
    --config configs/gen_imagenet.py:ar,L      # LlamaGen-L: 24 layers, width 1024, 16 heads
    --config configs/gen_imagenet.py:maskgit   # MaskGIT: 24 layers, width 768, 16 heads, 8 steps
    --config.generator.tokenizer=workdirs/nativetok --config.data.tfds_data_dir=...

LlamaGen's recipe: AdamW lr 1e-4, betas (0.9, 0.95), weight decay 0.05, batch 256, 300 epochs,
class-label dropout 0.1, sampling with guidance; MaskGIT decodes in 8 steps with choice
temperature 4.5. The training images are encoded once (centre crops with random flips).
"""

from nativetok_jax.config import config_choice, generator_config

SIZES = {"B": (768, 12, 12), "L": (1024, 24, 16)}


def get_config(arg: str | None = None):
    # No default: the argument picks the generator's kind and size.
    kind, _, size = config_choice("configs/gen_imagenet.py", arg, ("ar,B", "ar,L", "maskgit")).partition(",")
    config = generator_config()
    g = config.generator
    g.kind = kind
    if kind == "ar":
        g.width, g.depth, g.num_heads = SIZES[size]
        g.sample.update(temperature=1.0, top_k=0, top_p=1.0, guidance_scale=2.0)
    else:
        g.width, g.depth, g.num_heads = 768, 24, 16
        g.sample.update(num_steps=8, choice_temperature=4.5, guidance_scale=2.0)
    config.data.update(source="tfds", tfds_name="imagenet2012", train_split="train", eval_split="validation",
                       crop_min=1.0, crop_max=1.0, flip=True, num_eval_images=10_000)
    g.num_eval_examples = 10_000
    config.train.update(batch_size=256, num_steps=1_500_000, learning_rate=1e-4, warmup_steps=5_000)
    config.generator.dtype = "bfloat16"
    return config
