"""``python -m nativetok_jax.evaluate --workdir DIR --data SOURCE --out FILE.json``: judge a tokenizer
(or a Dynamic VAE: a ``task="dvae"`` workdir also gets PSNR over fine- and coarse-routed regions,
the realised fine fraction and the block means of its own routing at the same codes, and no token
prefixes).

Reconstructs every image of SOURCE (an image folder, ``tfds:NAME:SPLIT``, or ``photos``: the
held-out photographs bundled with scikit-image) with the newest checkpoint in DIR, from all tokens
and from the first 1, 2, 4, ... tokens, and writes PSNR, SSIM, codebook usage and perplexity
(LPIPS with ``--lpips``, rFID and Inception Score with ``--inception``) and the exact protocol to
FILE.json, and a plot of every metric against the number of tokens to FILE.png beside it. The
prefixes also give the tokenizer's rate-distortion curve (``rate_distortion`` in FILE.json, plotted
to FILE_rate_distortion.png): bits = tokens x log2(codebook size), beside the same-bits thumbnail
and the mean colour (docs/evaluation_codec.md).
``--reference_stats FILE.npz`` keeps the original images' Inception statistics for reuse: read
when the file exists, written when it does not.

``--samples DIR`` (instead of ``--workdir``) judges a generator: the images in DIR (e.g. written
by ``python -m nativetok_jax.sample``) get gFID against ``--reference_stats`` (computed from
``--data`` when the file does not exist yet) and the Inception Score; ``--inception`` is needed.
``--reference_features FILE.npz`` adds improved precision and recall (k = 3, ADM's evaluator):
the real images' Inception features, read if the file exists, else computed and written.
``--reference_batch VIRTUAL_imagenet256_labeled.npz`` (ADM's reference batch) supplies the real
images (``arr_0``) and, converted into ``--reference_stats``, ADM's ``mu`` and ``sigma``.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Iterator
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # TFDS may import TensorFlow.
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")  # else TF prints a notice on import; it computes nothing here

import numpy as np  # noqa: E402
from absl import app, flags, logging  # noqa: E402
from etils import epath  # noqa: E402

from nativetok_jax import checkpoints, storage, tasks  # noqa: E402
from nativetok_jax.command import boundary, own_flags_parser  # noqa: E402
from nativetok_jax.config import unfitted_codebook  # noqa: E402
from nativetok_jax.errors import UserError  # noqa: E402
from nativetok_jax.data.images import center_crop  # noqa: E402
from nativetok_jax.data.pipeline import SkippedImages, decode, eval_crop_range, eval_images  # noqa: E402
from nativetok_jax.data.sources import (  # noqa: E402
    SAMPLE_IDS_FILE,
    DataError,
    FolderSource,
    PhotoSource,
    TfdsSource,
)
from nativetok_jax.dvae import DVAE  # noqa: E402
from nativetok_jax.evaluation import fid  # noqa: E402
from nativetok_jax.evaluation.dvae_metrics import dvae_protocol, evaluate_dvae  # noqa: E402
from nativetok_jax.evaluation.plots import plot_prefix_curves, plot_rate_distortion  # noqa: E402
from nativetok_jax.evaluation.precision_recall import (  # noqa: E402
    load_features,
    precision_recall,
    read_adm_reference_batch,
    save_features,
)
from nativetok_jax.evaluation.rate_distortion import PROTOCOL as RATE_DISTORTION_PROTOCOL  # noqa: E402
from nativetok_jax.evaluation.ssim import K1, K2, SIGMA, WIN_SIZE  # noqa: E402
from nativetok_jax.evaluation.tokenizer_metrics import (  # noqa: E402
    TooFewImagesError,
    evaluate_tokenizer,
    inception_score_splits,
    inception_statistics,
)
from nativetok_jax.pretrained import files  # noqa: E402
from nativetok_jax.pretrained.inception import KIND as INCEPTION_KIND  # noqa: E402
from nativetok_jax.pretrained.inception import load_inception  # noqa: E402
from nativetok_jax.pretrained.lpips import KIND as LPIPS_KIND  # noqa: E402
from nativetok_jax.pretrained.lpips import load_lpips  # noqa: E402
from nativetok_jax.workdir import check_loadable, require_task  # noqa: E402

# This command's flags live in their own registry, not absl's global one: other entry points
# (training, sampling) also define --workdir and --out, and importing two of them into one process
# (a test session, a notebook) would otherwise fail with a duplicate-flag error.
FLAGS = flags.FlagValues()
flags.DEFINE_string("workdir", None, "Training workdir (or one stage's directory) holding the checkpoints.",
                    flag_values=FLAGS)
flags.DEFINE_string("samples", None, "Instead of --workdir: a folder of generated images, for gFID and IS.",
                    flag_values=FLAGS)
flags.DEFINE_string("data", None, "Images: a folder (searched recursively), tfds:NAME:SPLIT, or 'photos' "
                    "(the held-out photographs bundled with scikit-image).", flag_values=FLAGS)
flags.DEFINE_string("out", None, "The JSON file to write; the plot goes beside it as .png.", flag_values=FLAGS)
flags.DEFINE_string("tfds_data_dir", None, "TFDS data_dir for --data=tfds:NAME:SPLIT.", flag_values=FLAGS)
flags.DEFINE_integer("num_images", None, "Evaluate the first N readable images (default: all).",
                     flag_values=FLAGS)
flags.DEFINE_integer("batch_size", 64, "Images per batch.", flag_values=FLAGS)
flags.DEFINE_string("lpips", None, "LPIPS weights file (python -m nativetok_jax.convert); adds lpips.",
                    flag_values=FLAGS)
flags.DEFINE_string("inception", None, "FID InceptionV3 weights file (python -m nativetok_jax.convert); "
                    "adds rfid and inception_score.", flag_values=FLAGS)
flags.DEFINE_string("reference_stats", None, "An .npz of the originals' Inception mu and sigma: read if it "
                    "exists, else computed and written there. Needs --inception.", flag_values=FLAGS)
flags.DEFINE_string("reference_features", None, "With --samples: an .npz of the real images' Inception "
                    "features for precision and recall: read if it exists, else computed (from "
                    "--reference_batch or --data) and written.", flag_values=FLAGS)
flags.DEFINE_string("reference_batch", None, "With --samples: ADM's reference batch .npz (arr_0 images, mu, "
                    "sigma): its statistics become --reference_stats, its images the real features.",
                    flag_values=FLAGS)
flags.DEFINE_bool("use_ema", True, "Use the EMA weights when the run kept them.", flag_values=FLAGS)
flags.DEFINE_bool("prefix", True, "Also evaluate prefix decoding (first 1, 2, 4, ... tokens) and plot it, "
                  "with the rate-distortion curve beside the same-bits thumbnail.",
                  flag_values=FLAGS)
flags.mark_flags_as_required(["out"], flag_values=FLAGS)

PHOTOS = "photos"
TFDS_PREFIX = "tfds:"
INCEPTION_INPUTS = {  # InceptionV3.input_convention -> the protocol's description
    "pytorch_fid": "uint8 / 255, resized to 299 x 299 bilinearly without antialias (half-pixel centres), "
                   "then 2 x - 1 (as pytorch-fid)",
    "tensorflow": "uint8 values resized to 299 x 299 as TensorFlow 1's ResizeBilinear (no half-pixel centres), "
                  "then (x - 128) / 128: the TF FID graph's own input, as ADM's evaluator ran it for the "
                  "reference statistics",
}
INCEPTION_SCORE = "logits without bias over 1008 classes; mean and std over splits"
HELD_OUT_PREPROCESSING = ("the run's own held-out set (data.pipeline.eval_images, as its trainer's evaluations): "
                          "crops of {low}-{high} of the short side of the held-out bundled photographs, drawn with "
                          "seed {seed} like the training crops, unflipped, resized to {size} px (PIL bicubic), uint8")
PREPROCESSING = ("decoded as viewers show them (EXIF orientation applied, 16-bit and float depths scaled, "
                 "palette/CMYK converted, alpha composited on white; nativetok_jax.data.decoding), short side "
                 "resized to {size} px with PIL bicubic resampling (antialiased), the central {size} x {size} "
                 "square kept, uint8")


# Below this many images the 2048-d pool3 covariance is rank-deficient and FID is strongly
# biased upward (Chong & Forsyth 2020); published FIDs use 10,000 to 50,000 images.
FID_MIN_IMAGES = 2048


class EvaluationError(UserError, ValueError):
    """A flag or input the evaluation cannot use; the message names it."""


def inception_caveats(num_images: int, protocol: dict[str, Any]) -> None:
    """Records the Inception Score's splits (how many, images in each) in ``protocol``; warns (log
    and ``protocol["warnings"]``) when ``num_images`` is below :data:`FID_MIN_IMAGES`."""
    splits = inception_score_splits(num_images)
    protocol.update(inception_score_splits=splits, inception_score_split_size=num_images // splits)
    if num_images < FID_MIN_IMAGES:
        warning = (f"FID on {num_images} images (fewer than {FID_MIN_IMAGES:,}, the pool3 feature size) is biased "
                   f"upward and not comparable to published values, which use 10,000-50,000 images")
        protocol.setdefault("warnings", []).append(warning)
        logging.warning("%s", warning)


def open_source(spec: str, tfds_data_dir: str | None) -> Any:
    """The image source ``--data`` names (``len()`` and ``source[i]["image"]``), checked non-empty."""
    if spec == PHOTOS:
        return PhotoSource("heldout")
    if spec.startswith(TFDS_PREFIX):
        parts = spec[len(TFDS_PREFIX):].split(":", 1)  # a split may hold colons: "train[:10%]"
        if len(parts) != 2 or not all(parts):
            raise EvaluationError(f"--data: expected tfds:NAME:SPLIT, got {spec!r}")
        factory = lambda: TfdsSource(parts[0], parts[1], tfds_data_dir)  # noqa: E731
    else:
        if not storage.path(spec).is_dir():
            raise EvaluationError(f"--data: {spec!r} is not an image folder, tfds:NAME:SPLIT or {PHOTOS!r}")
        factory = lambda: FolderSource.scan(spec, "--data")  # noqa: E731
    try:
        return factory()
    except DataError as error:  # its message names a config field; here the flag is the cause
        raise EvaluationError(f"--data: {str(error).split(': ', 1)[-1]}") from error


def image_batches(source: Any, image_size: int, batch_size: int, num_images: int | None,
                  skipped: Any, exact_size: str | None = None) -> Iterator[np.ndarray]:
    """uint8 ``[B, image_size, image_size, 3]`` batches of the source's first ``num_images`` readable
    images, centre-cropped; unreadable ones are skipped and counted in ``skipped``. With
    ``exact_size`` (the flag to blame) an image of another size is an ``EvaluationError``, not
    resized: generated samples all have the model's size."""
    wanted = len(source) if num_images is None else num_images
    batch: list[np.ndarray] = []
    taken = 0
    for index in range(len(source)):
        if taken == wanted:
            break
        element = source[index]
        image = decode(element["image"], skipped, element.get("name", f"element {index}"))
        if image is None:
            continue
        if exact_size and image.shape[:2] != (image_size, image_size):
            raise EvaluationError(f"{exact_size}: {element['image']} is {image.shape[1]} x {image.shape[0]} px, "
                                  f"expected {image_size} x {image_size} px")
        batch.append(center_crop(image, image_size))
        taken += 1
        if len(batch) == batch_size:
            yield np.stack(batch)
            batch = []
    if batch:
        yield np.stack(batch)


def weights_record(path: str, kind: str) -> dict[str, Any]:
    """Where a pretrained network's weights came from: the file and its recorded header."""
    _, meta = files.load_weights(path, kind=kind)
    return {"file": str(storage.path(path)), **{k: v for k, v in meta.items() if k != "format_version"}}


def read_reference_stats(path: str, image_size: int) -> tuple[np.ndarray, np.ndarray]:
    """The ``(mu, sigma)`` saved in ``--reference_stats``; a broken file, or statistics of images
    of another size than ``image_size``, is a flag error."""
    try:
        return fid.load_statistics(path, image_size=image_size)
    except ValueError as error:
        raise EvaluationError(f"--reference_stats: {error}") from error


def samples_image_size(samples: str, generated: FolderSource, reference_stats: str | None) -> tuple[int, str]:
    """The side every sample must have and where it comes from: the generator's tokenizer (as
    ``sample`` records it in ids.npz), else the reference statistics' record, else the first sample."""
    ids = epath.Path(samples) / SAMPLE_IDS_FILE
    if ids.is_file():
        with ids.open("rb") as f, np.load(f) as recorded:
            if "image_size" in recorded.files:
                return int(recorded["image_size"]), f"the generator's tokenizer (recorded in {ids})"
    if reference_stats and epath.Path(reference_stats).is_file():
        try:
            recorded_size = fid.recorded_image_size(reference_stats)
        except ValueError as error:
            raise EvaluationError(f"--reference_stats: {error}") from error
        if recorded_size is not None:
            return recorded_size, f"the reference statistics {reference_stats}"
    first = decode(generated[0]["image"], SkippedImages())
    if first is None:
        raise EvaluationError(f"--samples: cannot read {generated[0]['image']}")
    return first.shape[0], f"the first sample {generated[0]['image']}"


def _checkpoint_record(workdir: str, use_ema: bool) -> dict[str, Any]:
    stage = checkpoints.final_stage_directory(workdir)
    steps = [int(p.name) for p in checkpoints.checkpoint_directory(stage).iterdir() if p.name.isdigit()]
    return {"workdir": str(storage.path(workdir)), "stage_directory": str(stage),
            "step": max(steps, default=None), "use_ema": use_ema}


def _require_fitted_codebook(record: dict[str, Any]) -> None:
    """Raises ``EvaluationError`` when the newest checkpoint (``record``: ``_checkpoint_record``'s)
    was saved before the end of its stage's quantiser warm-up (``config.unfitted_codebook``; the
    trainer's own evaluations give ``psnr_continuous`` then; docs/training.md)."""
    stage = epath.Path(record["stage_directory"])
    if not (stage / "config.json").exists():
        return
    reason = unfitted_codebook(checkpoints.read_config(stage).get("train"), record["step"])
    if reason:
        raise EvaluationError(f"--workdir: {reason}")


def run_evaluation(
    workdir: str,
    data: str,
    out: str,
    *,
    tfds_data_dir: str | None = None,
    num_images: int | None = None,
    batch_size: int = 64,
    lpips_path: str | None = None,
    inception_path: str | None = None,
    reference_stats: str | None = None,
    use_ema: bool = True,
    prefix: bool = True,
) -> dict[str, Any]:
    """Everything the command does; returns the JSON it wrote to ``out``."""
    _check_counts(batch_size, num_images)
    if reference_stats and not inception_path:
        raise EvaluationError("--reference_stats: rFID statistics need --inception")
    if not out.endswith(".json"):
        raise EvaluationError(f"--out: expected a .json file name, got {out!r}")
    for flag, path in (("--lpips", lpips_path), ("--inception", inception_path)):
        if path and not storage.path(path).is_file():
            raise EvaluationError(f"{flag}: weights file not found: {path}")

    source = open_source(data, tfds_data_dir)
    config = require_task(workdir, "evaluate --workdir", tasks.with_part("evaluate"),
                          advice="judge a generator's images with sample, then evaluate --samples")
    check_loadable(workdir)
    checkpoint = _checkpoint_record(workdir, use_ema)
    _require_fitted_codebook(checkpoint)  # before anything loads or compiles
    # The files the flags name, read before the checkpoint is restored: a file of another kind, or
    # statistics of another image size, is one line at once.
    lpips = load_lpips(lpips_path) if lpips_path else None
    inception = load_inception(inception_path) if inception_path else None
    reference = None
    if inception is not None and reference_stats and storage.path(reference_stats).is_file():
        reference = read_reference_stats(reference_stats, config.model.image_size)
        inception.input_convention = _input_convention(reference_stats)
    tokenizer = tasks.of(config).load("evaluate").from_checkpoint(workdir, use_ema=use_ema)
    # A Dynamic VAE workdir is judged the same way, plus PSNR per routed grain (no token prefixes).
    is_dvae = isinstance(tokenizer, DVAE)
    prefix = prefix and not is_dvae
    skipped = SkippedImages()
    held_out = None
    if data == PHOTOS and config.data.get("source") == "photos":
        # A run trained on the bundled photographs is judged on its trainer's held-out set: crops at
        # its training scale (the full photographs, centre-cropped, are another task: a DVAE's
        # routing thresholds, measured at that scale, would route most of them fine).
        held_out = eval_images(config.data, source, image_size=tokenizer.image_size,
                               num_images=num_images or config.data.num_eval_images, seed=config.train.seed,
                               skipped=skipped)
        expected_images = len(held_out)
    else:
        expected_images = len(source) if num_images is None else min(num_images, len(source))
    if inception_path and expected_images < 2:
        raise EvaluationError(f"--inception: rFID needs at least 2 images, --data has {expected_images}")
    size = tokenizer.image_size
    low, high = eval_crop_range(config.data)  # the held-out crops' scale, where held_out is set
    if size < WIN_SIZE:
        raise EvaluationError(f"--workdir: the tokenizer works at {size} x {size} px; SSIM needs at least "
                              f"{WIN_SIZE} x {WIN_SIZE}")
    protocol: dict[str, Any] = {
        "data": data,
        "tfds_data_dir": tfds_data_dir,
        "image_size": size,
        "batch_size": batch_size,
        "preprocessing": (PREPROCESSING.format(size=size) if held_out is None else HELD_OUT_PREPROCESSING.format(
            size=size, low=low, high=high, seed=config.train.seed)),
        "checkpoint": checkpoint,
        **(dvae_protocol(tokenizer) if is_dvae else {
            "reconstruction": "the tokenizer's decode output (uint8), from the first k tokens of encode",
            "num_tokens": tokenizer.num_tokens, "codebook_size": tokenizer.codebook_size,
            **({"rate_distortion": RATE_DISTORTION_PROTOCOL} if prefix else {}),
            "codebook": "usage: distinct codes over all images' tokens / codebook size; perplexity: exp(entropy) "
                        "of that code histogram"}),
        "psnr": "per image (MSE over pixels and channels, peak 255), averaged over images",
        "ssim": (f"per image on uint8 RGB, Wang et al. 2004: Gaussian window {WIN_SIZE} x {WIN_SIZE} "
                 f"(sigma {SIGMA}), population covariance, K1 {K1}, K2 {K2}, data range 255, border of "
                 f"{(WIN_SIZE - 1) // 2} px excluded, mean over channels (skimage structural_similarity); "
                 f"averaged over images"),
    }

    write_reference = False
    if lpips_path:
        protocol["lpips"] = {"weights": weights_record(lpips_path, LPIPS_KIND),
                             "input": "uint8 / 127.5 - 1, at the tokenizer's image size; per image, averaged"}
    if inception is not None:
        protocol["inception"] = {
            "weights": weights_record(inception_path, INCEPTION_KIND),
            "rfid": "Frechet distance of pool3 features (2048-d), reconstructions vs. reference statistics",
            "inception_score": INCEPTION_SCORE,
        }
        if reference is not None:
            logging.info("rFID reference: reading statistics from %s", reference_stats)
            protocol["inception"]["reference_stats"] = {"file": str(storage.path(reference_stats)), "action": "read"}
        else:
            write_reference = bool(reference_stats)
            logging.info("rFID reference: computing the statistics of the evaluated originals%s",
                         f" and writing them to {reference_stats}" if reference_stats else "")
            protocol["inception"]["reference_stats"] = (
                {"file": str(storage.path(reference_stats)), "action": "written"} if reference_stats
                else "computed from the evaluated originals")
        protocol["inception"]["input"] = INCEPTION_INPUTS[inception.input_convention]

    if held_out is None:
        batches = image_batches(source, size, batch_size, num_images, skipped)
    else:
        batches = (held_out[i:i + batch_size] for i in range(0, len(held_out), batch_size))
    start = time.time()
    logging.info("evaluating %d images of %s in batches of %d", expected_images, data, batch_size)
    try:
        if is_dvae:
            metrics, reference = evaluate_dvae(tokenizer, batches, lpips=lpips, inception=inception, reference=reference,
                                               seed=config.train.seed)  # random routing: the trainer's draw
        else:
            metrics, reference = evaluate_tokenizer(tokenizer, batches, lpips=lpips, inception=inception,
                                                    reference=reference, prefix=prefix)
    except TooFewImagesError as error:  # no readable image, or too few for rFID: the data's fault
        raise EvaluationError(f"--data {data}: {error} ({skipped.count} unreadable)") from error
    if inception_path:
        inception_caveats(metrics["num_images"], protocol["inception"])
    if write_reference:
        fid.save_statistics(reference_stats, *reference, image_size=size, input_convention=inception.input_convention)
        logging.info("wrote the reference statistics to %s", reference_stats)
    protocol.update(num_images=metrics["num_images"], skipped_images=skipped.count,
                    skipped_examples=skipped.examples, skipped_files=skipped.names,
                    seconds=round(time.time() - start, 1))
    report = {**metrics, "protocol": protocol}

    storage.write_json(out, report)
    if prefix:
        plot_path = out.removesuffix(".json") + ".png"
        plot_prefix_curves(metrics["prefix"], plot_path)
        rate_distortion_path = out.removesuffix(".json") + "_rate_distortion.png"
        plot_rate_distortion(metrics["rate_distortion"], rate_distortion_path)
        logging.info("wrote %s and the plots %s, %s", out, plot_path, rate_distortion_path)
    else:
        logging.info("wrote %s (no prefix curves, so no plot)", out)
    return report


def _check_counts(batch_size: int, num_images: int | None) -> None:
    """``--batch_size`` and ``--num_images`` (None: every image) must be positive: a batch size
    of 0 never closed a batch, and every image went through Inception as one."""
    if batch_size < 1:
        raise EvaluationError(f"--batch_size: must be positive, got {batch_size}")
    if num_images is not None and num_images < 1:
        raise EvaluationError(f"--num_images: must be positive, got {num_images}")


def run_sample_evaluation(
    samples: str,
    out: str,
    *,
    inception_path: str | None,
    reference_stats: str | None,
    data: str | None = None,
    tfds_data_dir: str | None = None,
    num_images: int | None = None,
    batch_size: int = 64,
    reference_features: str | None = None,
    reference_batch: str | None = None,
) -> dict[str, Any]:
    """gFID and Inception Score (precision and recall with ``reference_features``) of the images in
    ``samples``; returns the JSON written to ``out``."""
    _check_counts(batch_size, num_images)
    if not inception_path or not storage.path(inception_path).is_file():
        raise EvaluationError(f"--inception: gFID and IS need the FID Inception weights file, got {inception_path!r}")
    if not reference_stats:
        raise EvaluationError("--reference_stats: gFID needs the real images' statistics (an .npz to read, "
                              "or to write from --data)")
    if not out.endswith(".json"):
        raise EvaluationError(f"--out: expected a .json file name, got {out!r}")
    if not storage.path(samples).is_dir():
        raise EvaluationError(f"--samples: {samples!r} is not a folder of images")
    try:
        generated = FolderSource.samples(samples, "--samples")
    except DataError as error:
        raise EvaluationError(f"--samples: {str(error).split(': ', 1)[-1]}") from error
    size, size_source = samples_image_size(samples, generated, reference_stats)
    logging.info("--samples: %d images of %d x %d px (the size of %s)", len(generated), size, size, size_source)
    inception = load_inception(inception_path)
    protocol: dict[str, Any] = {
        "samples": str(storage.path(samples)), "batch_size": batch_size, "image_size": size,
        "image_size_from": size_source,
        "inception": {"weights": weights_record(inception_path, INCEPTION_KIND),
                      "gfid": "Frechet distance of pool3 features (2048-d), samples vs. reference statistics",
                      "inception_score": INCEPTION_SCORE},
    }
    adm_images = _convert_adm_reference_batch(reference_batch, reference_stats, protocol)
    if storage.path(reference_stats).is_file():
        reference = read_reference_stats(reference_stats, size)
        inception.input_convention = _input_convention(reference_stats)
        protocol.setdefault("reference_stats", {"file": str(storage.path(reference_stats)), "action": "read"})
    else:
        if not data:
            raise EvaluationError(f"--reference_stats: {reference_stats} does not exist; give --data to compute it")
        skipped = SkippedImages()
        reference, _, count = inception_statistics(
            image_batches(open_source(data, tfds_data_dir), size, batch_size, num_images, skipped), inception)
        fid.save_statistics(reference_stats, *reference, image_size=size, input_convention=inception.input_convention)
        logging.info("wrote the reference statistics of %d images of %s (at %d px) to %s", count, data, size,
                     reference_stats)
        protocol["reference_stats"] = {"file": str(storage.path(reference_stats)), "action": "written", "data": data,
                                       "num_images": count, "preprocessing": PREPROCESSING.format(size=size)}
    # Samples (and the real features of precision and recall) enter Inception as the reference did.
    protocol["inception"]["input"] = INCEPTION_INPUTS[inception.input_convention]
    real_features = _reference_features(reference_features, reference_batch, adm_images, data, tfds_data_dir,
                                        num_images, size, batch_size, inception, protocol)
    skipped = SkippedImages()
    sample_features: list[np.ndarray] = []
    statistics, logits, count = inception_statistics(
        image_batches(generated, size, batch_size, None, skipped, exact_size="--samples"), inception,
        features_out=sample_features)
    inception_caveats(count, protocol)
    score, score_std = fid.inception_score(logits, splits=protocol["inception_score_splits"])
    protocol.update(num_samples=count, skipped_images=skipped.count, skipped_files=skipped.names)
    report = {"gfid": fid.frechet_distance(*statistics, *reference), "inception_score": score,
              "inception_score_std": score_std, "num_samples": count, "protocol": protocol}
    if real_features is not None:
        report["precision"], report["recall"] = precision_recall(real_features, np.concatenate(sample_features))
    storage.write_json(out, report)
    return report


def _input_convention(reference_stats: str) -> str:
    """How images must enter Inception to be compared with the statistics in ``reference_stats``:
    the convention the file records; files that record none (pytorch-fid's, ours before
    2026-12-07) are taken as pytorch-fid's, and the log says so."""
    recorded = fid.recorded_input_convention(reference_stats)
    if recorded is None:
        logging.warning("%s records no Inception input convention: taken as pytorch-fid's; statistics converted "
                        "from an ADM reference batch before 2026-12-07 need converting again", reference_stats)
        return "pytorch_fid"
    if recorded not in INCEPTION_INPUTS:
        raise EvaluationError(f"--reference_stats: {reference_stats} records an unknown Inception input {recorded!r}")
    return recorded


def _convert_adm_reference_batch(path: str | None, reference_stats: str, protocol: dict[str, Any]) -> np.ndarray | None:
    """ADM's reference batch's images (None without one); its ``mu``/``sigma`` are written to
    ``reference_stats`` when that file does not exist yet."""
    if not path:
        return None
    try:
        images, statistics = read_adm_reference_batch(path)
    except ValueError as error:
        raise EvaluationError(f"--reference_batch: {error}") from error
    if statistics is not None and not storage.path(reference_stats).is_file():
        fid.save_statistics(reference_stats, *statistics, image_size=None if images is None else images.shape[1],
                            input_convention="tensorflow")  # ADM's evaluator ran the TF graph
        protocol["reference_stats"] = {"file": str(storage.path(reference_stats)), "action": "converted",
                                       "reference_batch": str(storage.path(path))}
    return images


def _reference_features(path: str | None, reference_batch: str | None, adm_images: np.ndarray | None, data: str | None,
                        tfds_data_dir: str | None, num_images: int | None, size: int, batch_size: int,
                        inception: Any, protocol: dict[str, Any]) -> np.ndarray | None:
    """The real images' pool3 features for precision and recall: read from ``path``, or computed from
    ADM's images (else ``--data``) and written there; None without ``path``."""
    if not path:
        return None
    if storage.path(path).is_file():
        protocol["reference_features"] = {"file": str(storage.path(path)), "action": "read"}
        try:
            return load_features(path)
        except ValueError as error:
            raise EvaluationError(f"--reference_features: {error}") from error
    if adm_images is not None:
        images = adm_images[:num_images]
        batches = (np.stack([center_crop(image, size) for image in images[i:i + batch_size]])
                   for i in range(0, len(images), batch_size))
        origin = str(storage.path(reference_batch))
    elif data:
        batches = image_batches(open_source(data, tfds_data_dir), size, batch_size, num_images, SkippedImages())
        origin = data
    else:
        raise EvaluationError(f"--reference_features: {path} does not exist; give --reference_batch or --data "
                              "to compute it")
    kept: list[np.ndarray] = []
    inception_statistics(batches, inception, features_out=kept)
    features = np.concatenate(kept)
    save_features(path, features)
    logging.info("wrote the Inception features of %d real images to %s", len(features), path)
    protocol["reference_features"] = {"file": str(storage.path(path)), "action": "written", "data": origin,
                                      "num_images": len(features)}
    return features


# This command's flags, then absl's own (``--verbosity``, ...); a bad or missing flag is one line.
parse_flags = own_flags_parser(FLAGS, __name__)


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    with boundary():  # the project's errors are one line, a bug keeps its traceback; a preempted run one line
        _evaluate_and_report()


def _evaluate_and_report() -> None:
    if bool(FLAGS.workdir) == bool(FLAGS.samples):
        sys.exit("error: give either --workdir (a tokenizer to judge) or --samples (generated images)")
    storage.check_writable(FLAGS.out, "--out")  # in seconds, not after the evaluation
    if FLAGS.samples:
        report = run_sample_evaluation(
            FLAGS.samples, FLAGS.out, inception_path=FLAGS.inception, reference_stats=FLAGS.reference_stats,
            data=FLAGS.data, tfds_data_dir=FLAGS.tfds_data_dir, num_images=FLAGS.num_images,
            batch_size=FLAGS.batch_size, reference_features=FLAGS.reference_features,
            reference_batch=FLAGS.reference_batch)
        protocol = report["protocol"]
        extras = "".join(f", {name} {report[name]:.4f}" for name in ("precision", "recall") if name in report)
        print(f"{report['num_samples']} samples: gFID {report['gfid']:.3f}, Inception Score "
              f"{report['inception_score']:.3f} +- {report['inception_score_std']:.3f} over "
              f"{protocol['inception_score_splits']} splits of {protocol['inception_score_split_size']}{extras}; "
              f"wrote {FLAGS.out}")
        return
    if not FLAGS.data:
        sys.exit("error: --data: which images to reconstruct (a folder, tfds:NAME:SPLIT or 'photos')")
    report = run_evaluation(
        FLAGS.workdir, FLAGS.data, FLAGS.out, tfds_data_dir=FLAGS.tfds_data_dir,
        num_images=FLAGS.num_images, batch_size=FLAGS.batch_size, lpips_path=FLAGS.lpips,
        inception_path=FLAGS.inception, reference_stats=FLAGS.reference_stats,
        use_ema=FLAGS.use_ema, prefix=FLAGS.prefix,
    )
    extras = "".join(f", {name} {report[name]:.4g}" for name in ("lpips", "rfid", "inception_score")
                     if name in report)
    if "inception_score" in report:
        inception = report["protocol"]["inception"]
        extras += f" ({inception['inception_score_splits']} splits of {inception['inception_score_split_size']})"
    if "fine_fraction" in report:  # a Dynamic VAE
        grains = ", ".join(f"{g} regions {report[f'psnr_{g}']:.2f} dB" for g in ("fine", "coarse")
                           if report[f"psnr_{g}"] is not None)
        print(f"{report['num_images']} images: PSNR {report['psnr']:.2f} dB ({grains}; block means of its routing "
              f"{report['block_mean_psnr']:.2f} dB at {report['codes_per_image']:.1f} codes per image), "
              f"SSIM {report['ssim']:.4f}{extras}, fine fraction {report['fine_fraction']:.3f}; wrote {FLAGS.out}")
        return
    versus = ""
    if "rate_distortion" in report:  # the no-model codecs at all tokens' bits
        whole = report["rate_distortion"][-1]
        low, high = whole["psnr_margin_ci95"]
        versus = (f" (at the same {whole['bits']:g} bits {whole['same_bits_codec']} {whole['thumbnail_psnr']:.2f} dB, "
                  f"{whole['psnr_margin']:+.2f} dB from it, 95 % interval {low:+.2f} to {high:+.2f}, above it on "
                  f"{100 * whole['psnr_win_rate']:.0f} % of the images; mean colour "
                  f"{whole['mean_colour_psnr']:.2f} dB)")
    print(f"{report['num_images']} images: PSNR {report['psnr']:.2f} dB{versus}, SSIM {report['ssim']:.4f}{extras}, "
          f"codebook usage {report['codebook_usage']:.3f}, perplexity {report['perplexity']:.1f}; "
          f"wrote {FLAGS.out}")


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)
