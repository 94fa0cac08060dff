"""TensorFlow is optional: TensorBoard events and TFDS reading work in a process where
``import tensorflow`` fails, and the events are what TensorBoard's own reader reads."""

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from tensorboard.backend.event_processing import event_accumulator

import conftest
from nativetok_jax.training import tensorboard

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Run first in a child process: swaps site-packages for a copy made of links to everything but
# TensorFlow itself, so that the process sees an install without the [tensorflow] extra
# (`import tensorflow` fails, importlib.util.find_spec("tensorflow") is None).
WITHOUT_TENSORFLOW = textwrap.dedent("""
    import os, site, sys

    def _is_tensorflow(name):
        return name == "tensorflow" or name.startswith(("tensorflow-", "tensorflow_cpu-"))

    _farm = os.environ["SITE_WITHOUT_TENSORFLOW"]
    for _site in [p for p in sys.path if p.endswith("site-packages")]:
        sys.path.remove(_site)
        for _name in os.listdir(_site):
            if not _is_tensorflow(_name) and not os.path.exists(os.path.join(_farm, _name)):
                os.symlink(os.path.join(_site, _name), os.path.join(_farm, _name))
    site.addsitedir(_farm)
    import importlib.util
    assert importlib.util.find_spec("tensorflow") is None
""")


def run_without_tensorflow(code: str, tmp_path) -> subprocess.CompletedProcess:
    site = tmp_path / "site-without-tensorflow"
    site.mkdir()
    env = dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS="cpu", SITE_WITHOUT_TENSORFLOW=str(site))
    return subprocess.run([sys.executable, "-c", WITHOUT_TENSORFLOW + textwrap.dedent(code)],
                          capture_output=True, text=True, env=env, timeout=300, cwd=REPO)


def read_events(logdir: str) -> event_accumulator.EventAccumulator:
    accumulator = event_accumulator.EventAccumulator(logdir, size_guidance={"scalars": 0, "images": 0})
    accumulator.Reload()
    return accumulator


@pytest.mark.slow
def test_without_tensorflow_the_writer_writes_events_tensorboard_reads(tmp_path):
    logdir = str(tmp_path / "run")
    result = run_without_tensorflow(f"""
        import numpy as np
        from absl import logging
        from nativetok_jax.training import tensorboard
        logging.set_verbosity(logging.INFO)
        try:
            import clu.metric_writers
        except ImportError:
            pass
        else:
            raise SystemExit("clu.metric_writers imported although TensorFlow is blocked")
        writer = tensorboard.create_writer({logdir!r})
        writer.write_hparams({{"learning_rate": 1e-3, "model": "demo", "mesh": (1, 8)}})
        for step in (1, 2, 3):
            writer.write_scalars(step, {{"loss": np.float32(1.0 / step), "psnr": 10.0 * step}})
        grid = np.zeros((1, 8, 12, 3), np.uint8)
        grid[0, :, :6] = 255
        writer.write_images(3, {{"reconstructions": grid}})
        writer.write_texts(3, {{"note": "hello"}})
        writer.write_histograms(3, {{"codes": np.arange(100)}})
        writer.flush()
        writer.close()
        print(type(writer).__name__)
    """, tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["EventFileWriter"]
    assert "[3] loss=0.333333, psnr=30" in result.stderr  # the log lines clu's LoggingWriter would write
    assert os.listdir(logdir) and all(name.startswith("events.out.tfevents.") for name in os.listdir(logdir))
    events = read_events(logdir)
    loss = events.Scalars("loss")
    assert [(e.step, round(e.value, 6)) for e in loss] == [(1, 1.0), (2, 0.5), (3, 0.333333)]
    assert [e.value for e in events.Scalars("psnr")] == [10.0, 20.0, 30.0]
    (image,) = events.Images("reconstructions/0") if "reconstructions/0" in events.Tags()["images"] else events.Images("reconstructions")
    assert (image.step, image.width, image.height) == (3, 12, 8)
    assert "codes" in events.Tags()["histograms"]
    assert any("hparams" in tag or "note" in tag for tag in events.Tags()["tensors"])


@pytest.mark.slow
def test_without_tensorflow_training_writes_its_events_and_checkpoints(tmp_path):
    """The README's install has no TensorFlow: the trainer imports nothing that needs it."""
    config_file = conftest.write_config_file(tmp_path, "test_training.train_config", num_steps=2, log_every=1,
                                             checkpoint_every=2)
    workdir = str(tmp_path / "run")
    result = run_without_tensorflow(f"""
        import runpy
        sys.argv = ["main", "--config", {config_file!r}, "--workdir", {workdir!r}]
        try:
            runpy.run_module("nativetok_jax.main", run_name="__main__")
        except SystemExit as exit:
            assert not exit.code, exit.code
        print("tensorflow" in sys.modules)
    """, tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().splitlines()[-1] == "False"
    events = read_events(workdir)
    assert [e.step for e in events.Scalars("l2_loss")] == [1, 2]
    assert [e.step for e in events.Scalars("steps_per_sec")] == [2]
    assert os.path.exists(os.path.join(workdir, "eval.json"))


def test_just_logging_writes_no_event_files(tmp_path, caplog):
    writer = tensorboard.EventFileWriter(None)
    with caplog.at_level("INFO"):
        writer.write_scalars(7, {"loss": np.float64(0.25)})
    writer.write_images(7, {"grid": np.zeros((4, 4, 3), np.uint8)})
    writer.flush()
    writer.close()
    assert "[7] loss=0.25" in caplog.text
    assert not os.listdir(tmp_path)


def test_images_of_the_wrong_rank_are_one_line_errors(tmp_path):
    writer = tensorboard.EventFileWriter(str(tmp_path))
    with pytest.raises(ValueError, match=r"'grid' must be \[N, H, W, C\] or \[H, W, C\], got \(4, 4\)"):
        writer.write_images(0, {"grid": np.zeros((4, 4))})
    writer.close()


def test_with_tensorflow_clu_writes_the_events(tmp_path):
    pytest.importorskip("tensorflow")
    writer = tensorboard.create_writer(str(tmp_path))
    writer.write_scalars(5, {"loss": 2.0})
    writer.flush()
    writer.close()
    assert type(writer).__module__.startswith("clu.")
    events = read_events(str(tmp_path))
    assert 5 in [e.step for e in events.Tensors("loss")]


@pytest.mark.slow
def test_prepared_tfds_dataset_is_read_without_tensorflow(tmp_path):
    """Preparing needs TensorFlow (the [tensorflow] extra); reading the prepared files does not."""
    tfds = pytest.importorskip("tensorflow_datasets")
    pytest.importorskip("tensorflow")

    class NativetokTfdsReading(tfds.core.GeneratorBasedBuilder):
        VERSION = tfds.core.Version("1.0.0")

        def _info(self):
            features = tfds.features.FeaturesDict(
                {"image": tfds.features.Image(shape=(None, None, 3)), "label": tfds.features.ClassLabel(num_classes=2)})
            return tfds.core.DatasetInfo(builder=self, features=features)

        def _split_generators(self, dl_manager):
            return {"train": self._generate_examples()}

        def _generate_examples(self):
            for i in range(3):
                yield i, {"image": np.full((6, 5, 3), 40 * i, np.uint8), "label": i % 2}

    NativetokTfdsReading(data_dir=str(tmp_path), file_format="array_record").download_and_prepare()
    result = run_without_tensorflow(f"""
        import json
        from nativetok_jax.config import base_config
        from nativetok_jax.data.decoding import decode_rgb
        from nativetok_jax.data.sources import open_sources
        data = base_config().data
        data.source, data.tfds_name, data.tfds_data_dir = "tfds", "nativetok_tfds_reading", {str(tmp_path)!r}
        data.eval_split = "train"
        train, _ = open_sources(data, 1)
        examples = [train[i] for i in range(len(train))]  # encoded bytes, decoded as the pipeline does
        images = [decode_rgb(e["image"], e["name"]) for e in examples]
        print(json.dumps(sorted((int(x[0, 0, 0]), list(x.shape), int(e["label"])) for x, e in zip(images, examples))))
        print("tensorflow" in sys.modules)
    """, tmp_path)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    assert json.loads(lines[-2]) == [[0, [6, 5, 3], 0], [40, [6, 5, 3], 1], [80, [6, 5, 3], 0]]
    assert lines[-1] == "False"


def test_progress_reports_rate_and_eta_every_few_steps_and_at_the_end(monkeypatch, caplog):
    from nativetok_jax.training import progress as progress_module

    clock = iter([100.0, 101.0, 102.0, 103.0, 104.0, 104.5, 106.0, 106.5, 108.0, 110.0])
    monkeypatch.setattr(progress_module.time, "monotonic", lambda: next(clock))

    class Recorder:
        def __init__(self):
            self.scalars = []

        def write_scalars(self, step, scalars):
            self.scalars.append((step, scalars))

    writer = Recorder()
    report = progress_module.ReportProgress(num_train_steps=5, writer=writer, every_steps=2)  # t=100 start
    with caplog.at_level("INFO"):
        report(1)  # t=101: the reference point (compilation is behind it)
        report(2)  # t=102: 1 step in 1 s
        with report.timed("eval"):  # 103 -> 104
            pass
        report(3)  # t=104.5: not a multiple of 2
        report(4)  # t=106: 2 steps in 4 s
        report(5)  # t=106.5: the last step, 1 step in 0.5 s
    assert [(step, round(s["steps_per_sec"], 3), s["uptime"]) for step, s in writer.scalars] == [
        (2, 1.0, 2.0), (4, 0.5, 6.0), (5, 2.0, 6.5)]
    assert "step 2/5 (40.0%), 1 steps/s, ETA 3s" in caplog.text
    assert "step 4/5 (80.0%), 0.5 steps/s, ETA 2s (6s: 16.7% eval)" in caplog.text
    assert progress_module.format_seconds(4321) == "1h12m" and progress_module.format_seconds(429) == "7m09s"
