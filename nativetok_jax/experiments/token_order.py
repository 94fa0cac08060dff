"""``python -m nativetok_jax.experiments.token_order --config configs/token_order.py --workdir DIR``.

NativeTok's claim (NATIVETOK.md, "Second stage") is that tokens produced in a causal order are
easier for an autoregressive generator to model than order-free ones. This trains both
tokenizers (``DIR/native/tokenizer``, ``DIR/order_free/tokenizer``) with the same budget,
codebook and token count, then the same AR generator on each one's tokens
(``DIR/<name>/generator``), and reports the generators' held-out negative log-likelihood (nats
per token, overall and by position) beside each tokenizer's held-out PSNR. Every stage resumes
(rerun the command); finished stages are not redone. Writes ``DIR/token_order.json`` (keys
``native`` and ``order_free``, each with ``nll_per_token``, ``nll_by_position``, ``psnr`` and
``num_tokens``; also ``nll_unigram``, the no-context baseline of per-position code frequencies, and
``codebook_usage``) and ``DIR/nll_by_position.png``.
"""

from __future__ import annotations

import os
import sys
import time
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import ml_collections  # noqa: E402
from absl import app, flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

FLAGS = flags.FLAGS


def define_flags() -> None:
    """Command-line flags, defined only when run as a program (the functions stay importable)."""
    config_flags.DEFINE_config_file("config", "configs/token_order.py", "Experiment config (configs/token_order.py[:imagenet]).")
    flags.DEFINE_string("workdir", None, "Directory for both tokenizers, both generators and the report.")
    flags.mark_flags_as_required(["workdir"])


ARMS = ("native", "order_free")


def run(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
    """Trains and measures both arms; returns (and writes) the report."""
    from nativetok_jax import storage
    from nativetok_jax.training.generator_trainer import train_generator
    from nativetok_jax.training.trainer import train_and_evaluate

    tokenizers = [config[arm] for arm in ARMS]
    for field in ("num_tokens", "image_size"):
        values = {t.model[field] for t in tokenizers}
        if len(values) > 1:
            raise ValueError(f"both tokenizers need the same model.{field}, got {sorted(values)}")
    if len({(t.model.quantizer.codebook_size, t.train.num_steps, t.train.batch_size) for t in tokenizers}) > 1:
        raise ValueError("both tokenizers need the same codebook size, steps and batch size (the same budget)")
    report: dict[str, Any] = {}
    root = storage.path(workdir)
    for arm, tokenizer_config in zip(ARMS, tokenizers):
        start = time.time()
        tokenizer_dir = root / arm / "tokenizer"
        tokenizer = train_and_evaluate(tokenizer_config, os.fspath(tokenizer_dir))
        generator_config = ml_collections.ConfigDict(config.generator.to_dict())
        generator_config.generator.tokenizer = os.fspath(tokenizer_dir)
        generator = train_generator(generator_config, os.fspath(root / arm / "generator"))
        report[arm] = dict(
            nll_per_token=generator["nll_per_token"],
            nll_by_position=generator["nll_by_position"],
            psnr=tokenizer["psnr"],
            num_tokens=tokenizer_config.model.num_tokens,
            tokenizer_kind=tokenizer_config.model.kind,
            codebook_usage=tokenizer.get("codebook_usage"),
            nll_unigram=unigram_nll(root / arm / "generator" / "tokens"),
            seconds=round(time.time() - start, 1),
        )
        logging.info("%s: held-out NLL %.4f nats/token, tokenizer PSNR %.2f dB", arm,
                     report[arm]["nll_per_token"], report[arm]["psnr"])
    storage.write_json(root / "token_order.json", report)
    plot_nll_by_position(report, root / "nll_by_position.png")
    return report


def unigram_nll(tokens_dir: str | os.PathLike) -> float:
    """Held-out NLL under the training set's code frequencies at each position (add-one smoothed):
    the no-context baseline, since a tokenizer that uses fewer codes is easier to model anyway."""
    import numpy as np

    from nativetok_jax.data.token_store import TokenSource

    from nativetok_jax import storage

    train, held_out = (TokenSource(storage.path(tokens_dir) / split) for split in ("train", "eval"))
    train_ids, _ = train.arrays()
    eval_ids, _ = held_out.arrays()
    total = 0.0
    for position in range(train_ids.shape[1]):
        counts = np.bincount(train_ids[:, position], minlength=train.codebook_size) + 1.0
        total += -np.log(counts[eval_ids[:, position]] / counts.sum()).mean()
    return float(total / train_ids.shape[1])


def plot_nll_by_position(report: dict[str, Any], path: str | os.PathLike) -> None:
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from nativetok_jax import storage

    figure, axis = plt.subplots(figsize=(6, 3.5), dpi=120)
    for arm, label in (("native", "NativeTok (causal order)"), ("order_free", "TiTok-style (order-free)")):
        values = report[arm]["nll_by_position"]
        axis.plot(range(1, len(values) + 1), values, marker=".", label=f"{label}: {report[arm]['nll_per_token']:.3f}")
    axis.set_xlabel("token position")
    axis.set_ylabel("held-out NLL (nats)")
    axis.set_title("AR generator: negative log-likelihood by position")
    axis.grid(alpha=0.3)
    axis.legend()
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    plt.close(figure)
    storage.write_bytes(path, buffer.getvalue())


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    from nativetok_jax.config import ConfigError
    from nativetok_jax.data.sources import DataError

    from nativetok_jax.training.guards import ends_preempted_runs

    start = time.time()
    try:
        with ends_preempted_runs():
            report = run(FLAGS.config, FLAGS.workdir)
    except (ConfigError, DataError, ValueError) as error:
        sys.exit(f"error: {str(error).splitlines()[0]}")
    print(f"done in {time.time() - start:.0f} s ({FLAGS.workdir}/token_order.json):")
    print(f"{'tokens':12s} {'NLL/token':>10s} {'unigram':>8s} {'PSNR dB':>8s}")
    for arm in ARMS:
        r = report[arm]
        print(f"{arm:12s} {r['nll_per_token']:10.4f} {r['nll_unigram']:8.4f} {r['psnr']:8.2f}")


if __name__ == "__main__":
    define_flags()
    app.run(main)
