"""``python -m nativetok_jax.main --config configs/<x>.py --workdir DIR``: train what a config's
``task`` names (``tasks.TASKS``): a tokenizer (the default), ``"generator"`` (on a trained
tokenizer's ids), ``"diffusion"`` (DiT), ``"dvae"`` (D²iT's Dynamic VAE), ``"d2it"`` (D²iT's
transformers on a trained DVAE).

Writes into DIR the resolved config, orbax checkpoints, TensorBoard events, a progress line with
step rate and ETA, PNG grids of held-out inputs and their reconstructions (from all tokens and
from the first 1, 4, 16, ... tokens), and ``eval.json``. Running the same command again resumes
from the newest checkpoint. Several processes (TPU pod workers, multi-node GPU) start with
``--multihost`` (or the explicit coordinator flags).
"""

from __future__ import annotations

import os
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # TensorFlow only writes TensorBoard events here.
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")  # else TF prints a notice on import; it computes nothing here

import jax  # noqa: E402
from absl import app, flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

config_flags.DEFINE_config_file("config", None, "Config file, e.g. configs/demo.py[:arg].", lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs, images; rerun to resume.")
flags.DEFINE_bool("multihost", False, "Call jax.distributed.initialize() (TPU pods, SLURM, ...).")
flags.DEFINE_string("coordinator_address", None, "host:port of process 0, for an explicit multi-process start.")
flags.DEFINE_integer("num_processes", None, "Number of processes, with --coordinator_address.")
flags.DEFINE_integer("process_id", None, "This process's index, with --coordinator_address.")
flags.mark_flags_as_required(["config", "workdir"])
FLAGS = flags.FLAGS


def initialize_distributed() -> None:
    """Joins the other processes before JAX touches a device, when asked to."""
    if not (FLAGS.multihost or FLAGS.coordinator_address):
        return
    if os.environ.get("JAX_PLATFORMS", "") == "cpu":
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(
        coordinator_address=FLAGS.coordinator_address,
        num_processes=FLAGS.num_processes,
        process_id=FLAGS.process_id,
    )


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    initialize_distributed()
    # Imported after jax.distributed.initialize(), which must run before anything touches a
    # backend: the package's modules may build arrays when they are imported.
    from nativetok_jax import tasks
    from nativetok_jax.command import boundary
    from nativetok_jax.workdir import check_resume

    if jax.process_index() > 0:
        logging.set_verbosity(logging.WARNING)
    start = time.time()
    with boundary():  # the project's errors (config, data, weights, runs) are one line; a bug keeps its traceback
        task = tasks.of(FLAGS.config)
        check_resume(FLAGS.config, FLAGS.workdir)  # before anything is written to the workdir
        summary = task.load("train")(FLAGS.config, FLAGS.workdir)
    print(f"done in {time.time() - start:.0f} s: {task.summary_line(summary, FLAGS.workdir)}")


if __name__ == "__main__":
    from nativetok_jax.command import config_flags_parser

    app.run(main, flags_parser=config_flags_parser)
