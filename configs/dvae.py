"""D²iT's Dynamic VAE at 256 px on ImageNet (docs/d2it.md "Stage 1").

Tags: [P] the paper says it; [A] an ancestor's code does it (DQ-VAE, LDM, VQGAN); [C] our choice.

- Two grains, fine f8 (32 x 32 latent) and coarse f16 (16 x 16) [P]: ``channel_multipliers``
  of 5 levels, coarse = 2^4, fine taken one level before [A: DQ-VAE's dual-grain encoder].
- Regions of S = 16 px, the coarsest factor: 256 per image [P].
- Entropy: gray 0.2989 R + 0.5870 G + 0.1140 B, Gaussian kernel density with sigma 0.01 [P], on
  S*S = 256 bins over [0, 1] [C] (DQ-VAE's 32 bins on [-1, 1] rank a flat region between two
  bins like a black/white edge), natural log.
- Fine iff entropy > the ``100 (1 - r)``-th percentile of training-set region entropies, r = 0.5
  [A]; thresholds from ``python -m nativetok_jax.grain_thresholds --config configs/dvae.py --out
  T.json`` [A: DQ-VAE's tool], named in ``model.grain.thresholds``.
- Neighbour copying of coarse codes onto the fine grid [P]; continuous KL-regularised latents [P].
- Encoder: 128 channels, multipliers 1, 1, 2, 2, 4, two residual blocks per level, attention at
  feature sides 32 and 16, one mid stack and one mean/log-variance head per grain [A: DQ-VAE].
- Latent channels 4 [C]; KL weight 1e-6, L1 + LPIPS 1.0 + patch GAN 0.5 [C: LDM's KL-f8 recipe];
  the KL counts a coarse code once [A: DQ-VAE's codebook mask].
- Decoder: maskgit's VQGAN decoder on the fine grid (no attention) with learned row + column
  position embeddings added to the latent [A: DQ-VAE's DecoderPositional, "learned"] [C: the
  attention-free decoder].
- No block-mean shortcut (``model.shortcut = "none"``) [P: the paper's DVAE has none]; the CPU
  demo (configs/dvae_demo.py) turns it on [C].
- One global latent scale = 1 / std of routed training latents [C, as SD-VAE's 0.18215].
- Optimiser: the project's AdamW at lr 1e-4 with warm-up and cosine decay, batch 256 [C: the
  paper gives no DVAE recipe].

Arguments: ``configs/dvae.py:ffhq`` reads a prepared TFDS ``ffhq`` (unconditional) instead of
``imagenet2012``. Before training, measure the thresholds and name the LPIPS weights:

    python -m nativetok_jax.grain_thresholds --config configs/dvae.py \
        --config.data.tfds_data_dir=DIR --out thresholds/dvae_imagenet256_s16.json
    python -m nativetok_jax.main --config configs/dvae.py --config.data.tfds_data_dir=DIR \
        --config.pretrained.lpips=weights/lpips.npz --workdir gs://...
"""

from nativetok_jax.config import config_choice, dvae_config


def get_config(arg: str | None = None):
    arg = config_choice("configs/dvae.py", arg, ("imagenet", "ffhq"), default="imagenet")  # documented default
    config = dvae_config()
    d = config.data
    d.source = "tfds"
    d.tfds_name = {"imagenet": "imagenet2012", "ffhq": "ffhq"}[arg]
    d.crop_min, d.crop_max = 1.0, 1.0
    d.num_eval_images = 50_000 if arg == "imagenet" else 10_000
    d.worker_count = 8
    config.model.grain.thresholds = f"thresholds/dvae_{arg}256_s16.json"

    t = config.train
    t.batch_size = 256
    t.num_steps = 500_000
    t.learning_rate = 1e-4
    t.warmup_steps = 5_000
    t.losses.pixel = "l1"
    t.losses.perceptual_weight = 1.0
    t.losses.adversarial_weight = 0.5
    t.losses.adversarial_start_step = 50_000
    t.losses.kl_weight = 1e-6
    return config
