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

Sizing. The default (native, order_free, causal_mask, one seed, AR and MaskGIT generators) must
finish in 30 minutes on 2 cores at the machine's usual speed (XLA:CPU running a 2048 x 2048 float32
product at about 200 GFLOP/s). The previous two-arm default (1,500 tokenizer steps, 500 generator
steps on 20,000 extracted crops) took 27.5 min on a slow day (a demo step at 330 ms, not 200):
NativeTok's tokenizer 10.5 min, the order-free one 7, each generator with its extraction about 5;
scaled by 200/330, about 6.4, 4.2 and 3 min on a usual day. Measured on 30 Nov 2026 with the
machine shared by six other jobs (2048^2 product at 38 GFLOP/s wall-clock), 200 tokenizer steps
(start-up, compilation and two evaluations included) cost 245 CPU-seconds for NativeTok and 168
for the order-free encoder, about 120 and 85 s on 2 idle cores: the fixed cost is about a
minute. Hence, estimated per arm on a usual day: NativeTok's tokenizer at TOKENIZER_STEPS = 1,000 about
4.6 min and each order-free one about 3.1 (10.8 for the three); each AR generator at
GENERATOR_STEPS = 400 on NUM_TRAIN_EXAMPLES = 12,800 crops (extraction included) about 2.2 (6.6);
each MaskGIT generator on the same store (no second extraction) plus its masked-token scoring
about 1.5 (4.5); the matched-PSNR passes under a minute: about 23 minutes in all, 37 on a slow
day. The arms share work: one generator size, NativeTok's tokenizer and token store serve
native_permuted / native_reversed too (no re-encoding; they train only their AR generator, about
1.2 min each), the MaskGIT generators read the AR generators' stores. NUM_EVAL_EXAMPLES = 256
held-out crops are kept (fewer would save seconds, not minutes): the paired bootstrap's
interval shrinks as 1/sqrt(crops). Checked so far (the same day, load average about 11 on the 2
cores): the default run's first two tokenizers, causal_mask and native (1,000 steps in 842 and
1,020 s of wall time; held-out PSNR 21.41 and 21.56 dB, codebook usage 23.6 and 24.6 %), took
24.8 CPU-minutes together with their matched-PSNR passes, which would be 12.4 minutes on 2 idle
cores if CPU time under contention carried over (it is inflated by it). By that measure the
whole default would need about 34 minutes (the generators sized from the 312 CPU-seconds that
200 AR steps with a 20,000-crop extraction took), against the 23 estimated from the previous
version's times: the end-to-end time on an idle machine is still to be measured, and
GENERATOR_STEPS is the first thing to shorten if it runs over.
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
MASKGIT = True


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
    # Also train the MaskGIT generator (same size and steps) on each own-order arm's tokens and
    # split its masked-token NLL at the cosine schedule's mask rates (the paper's best generator).
    config.maskgit = MASKGIT
    return config
