"""The token-order experiment: do native (causally ordered) tokens make generation easier, and why?

    python -m nativetok_jax.experiments.token_order --config configs/token_order.py --workdir workdirs/token_order
    --config configs/token_order.py:table   # the issue-15 table: four arms, three seeds
    --config configs/token_order.py:imagenet   # the paper's scale: NativeTok-32 vs TiTok-L-32, LlamaGen-B

Arms (``arms``, comma-separated; ``nativetok_jax/experiments/token_order.py`` says what each is):
``native`` (NativeTok), ``order_free`` (TiTok-style, one bidirectional encoder), ``causal_mask``
(the same encoder, latent token i seeing the image and latents <= i: the paper's plain-causal-mask
ablation), ``native_permuted`` / ``native_reversed`` (NativeTok's own ids and token store, read by
the generator in a fixed random / reversed order). Every tokenizer gets the same data, budget
(steps x batch), schedule, codebook (4096 x 12) and code: the demo's 32 ids, whose first 2 are the
crop's mean colour (``model.shortcut``, the same ids in every arm) and the other 30 the arm's
learned tokens; every generator the same size, steps and seed. ``seeds`` = N trains every arm N times (tokenizer and generator seed i).
``match_parameters`` ("depth" or "width") grows the order-free encoders until they have as many
parameters as NativeTok's MIT + experts (at the demo's sizes they have 5x fewer; the report says so).

Sizing. The default (native, order_free, causal_mask, one seed, AR and MaskGIT generators) must
finish in 30 minutes on 2 cores at the machine's usual speed (XLA:CPU running a 2048 x 2048 float32
product at about 200 GFLOP/s; 120-140 on slow days). Timed end to end on 30 Nov 2026 on the idle
2-core machine at 138 GFLOP/s, with 1,000 tokenizer and 400 generator steps: 34.3 minutes.
Tokenizers (1,000 steps of 32 crops, two evaluations; 3.5-3.8 steps/s): causal_mask 4.8 min,
native 5.9, order_free 4.7, their matched-PSNR passes 2-5 s each; per arm, the AR generator with
its token extraction (12,800 + 256 crops, 0.75 min) 3.6-3.9 min and the MaskGIT generator
2.4-2.6 min. Generators are the cheapest cut: at GENERATOR_STEPS = 250 the six of the default
save about 5.5 minutes, about 29 minutes in all on that day, about 20 at 200 GFLOP/s. The
tokenizers keep their 1,000 steps: their PSNR (21.6-22.2 dB) is the matched quantity, and it is
still below a 4 x 4 thumbnail's (26.2 dB) at this scale.
The arms share work: one generator size, NativeTok's tokenizer and token store serve
native_permuted / native_reversed too (no re-encoding; they train only their AR generator), the
MaskGIT generators read the AR generators' stores. NUM_EVAL_EXAMPLES = 256 held-out crops are
kept (fewer would save seconds, not minutes): the paired bootstrap's interval shrinks as
1/sqrt(crops).

``configs/token_order.py:table`` is the three-seed table of issue 15 (about 110 minutes on 2
idle cores): native, order_free, causal_mask and native_permuted, seeds 0-2, generators at 400 steps.

``configs/token_order.py:full`` is that table on the demo's best tokenizers: every tokenizer trains
the demo's own 12,800 steps (configs/demo.py; NativeTok's codes then beat the same-bits
thumbnail by 0.9 dB on 1,024 held-out crops, on 67 % of them) and the order-free encoders are grown in depth to NativeTok's MIT + experts'
parameter count (``match_parameters="depth"``). About 40 minutes per tokenizer on 2 idle cores, so
about 7 hours for the three seeds; ``--seeds 1 --arms native,order_free`` is the two-hour look.
"""

import os

import ml_collections

from nativetok_jax.config import config_choice, load_config_file

CONFIGS = os.path.dirname(os.path.abspath(__file__))
TOKENIZER_STEPS = 1000
GENERATOR_STEPS = 250
TABLE_GENERATOR_STEPS = 400
TABLE_ARMS = "native,order_free,causal_mask,native_permuted"
TABLE_SEEDS = 3
NUM_TRAIN_EXAMPLES = 12_800
NUM_EVAL_EXAMPLES = 256
DEFAULT_ARMS = "native,order_free,causal_mask"
MASKGIT = True


def shorten_schedule(train: ml_collections.ConfigDict, num_steps: int) -> None:
    """Runs ``num_steps`` with evaluations at the half and the end and a checkpoint every half."""
    train.num_steps = num_steps
    train.eval_every = num_steps // 2
    train.checkpoint_every = num_steps // 2


def get_config(scale: str = "demo"):
    """``demo`` (the default), ``table`` (the demo's sizes, four arms, three seeds), ``full`` (``table``
    with the demo tokenizer's whole budget and parameter-matched order-free encoders) or ``imagenet``."""
    scale = config_choice("configs/token_order.py", scale, ("demo", "table", "full", "imagenet"), default="demo")
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
            if scale == "full":  # the demo's whole schedule; evaluations only at the half and the end
                tokenizer.train.eval_every = tokenizer.train.num_steps // 2
            else:
                shorten_schedule(tokenizer.train, TOKENIZER_STEPS)
        shorten_schedule(generator.train, GENERATOR_STEPS if scale == "demo" else TABLE_GENERATOR_STEPS)
        generator.generator.num_train_examples = NUM_TRAIN_EXAMPLES
        generator.generator.num_eval_examples = NUM_EVAL_EXAMPLES
    causal_mask = ml_collections.ConfigDict(order_free.to_dict())
    causal_mask.model.latent_causal_mask = True  # the only difference: same parameters, same budget
    config.native = native
    config.order_free = order_free
    config.causal_mask = causal_mask
    config.generator = generator
    table = scale in ("table", "full")
    config.arms = TABLE_ARMS if table else DEFAULT_ARMS
    config.seeds = TABLE_SEEDS if table else 1  # every arm trained with tokenizer and generator seeds 0..seeds-1
    # "", "depth" or "width": grow order_free / causal_mask's encoder
    config.match_parameters = "depth" if scale == "full" else ""
    config.permutation_seed = 0  # native_permuted reads the ids in order "random:<permutation_seed>"
    config.bootstrap_samples = 2000  # paired bootstrap resamples of the held-out crops
    # Also train the MaskGIT generator (same size and steps) on each own-order arm's tokens and
    # split its masked-token NLL at the cosine schedule's mask rates (the paper's best generator).
    config.maskgit = MASKGIT
    return config
