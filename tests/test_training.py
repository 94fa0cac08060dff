"""The training system: the step learns, runs resume exactly after SIGKILL and SIGTERM, HNT freezes
bit-exactly, bad input stops with one line, and the trainer leaves everything in its workdir."""

import json
import os
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import conftest
from conftest import assert_same_checkpoint, flat, tiny_config
from nativetok_jax import Tokenizer, checkpoints, sharding
from nativetok_jax.data.pipeline import train_iterator
from nativetok_jax.data.sources import open_sources
from nativetok_jax.models.nativetok import build_model
from nativetok_jax.training.hnt import RestoreError, grow_params
from nativetok_jax.training.state import build_state
from nativetok_jax.training.tokenizer_objective import tokenizer_train_step
from nativetok_jax.training.guards import NonFiniteLossError
from nativetok_jax.training import trainer as trainer_module
from nativetok_jax.training.trainer import train_and_evaluate

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir)


def train_config(num_steps: int = 8, **train):
    config = tiny_config()
    config.data.update(crop_min=0.2, crop_max=0.6, num_eval_images=8, num_threads=1)
    defaults = dict(batch_size=8, learning_rate=2e-3, warmup_steps=2, log_every=2, eval_every=1000,
                    checkpoint_every=4, keep_checkpoints=5, ema_decay=0.9)
    config.train.update(num_steps=num_steps, **{**defaults, **train})
    return config


def write_config_file(directory, **train) -> str:
    """A config file for subprocess runs: the tiny model with ``train`` overrides."""
    return conftest.write_config_file(directory, "test_training.train_config", **train)


def start_main(config_file: str, workdir: str, *flags: str, env=None) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "nativetok_jax.main", "--config", config_file, "--workdir", workdir, *flags],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
    )


def finish(process: subprocess.Popen, timeout: float = 300) -> tuple[int, str]:
    _, stderr = process.communicate(timeout=timeout)
    return process.returncode, stderr




@pytest.mark.slow
def test_train_step_lowers_the_loss_on_a_fixed_batch():
    config = train_config(num_steps=25)
    mesh = sharding.make_mesh(config.mesh)
    built = build_state(lambda r: build_model(config.model, r), train=config.train, mesh=mesh,
                        rules=sharding.rules_of(config))
    state = built.state
    source, _ = open_sources(config.data, 8)
    batch = next(train_iterator(config.data, source, image_size=16, batch_size=8, seed=0))
    step = tokenizer_train_step(built, config, 8)
    losses = []
    for _ in range(25):
        state, metrics = step(state, batch)
        losses.append(float(metrics["l2_loss"]))
    assert int(state["step"]) == 25
    assert np.mean(losses[-5:]) < 0.5 * np.mean(losses[:5])


@pytest.mark.slow
def test_trainer_writes_its_outputs_and_the_tokenizer_loads_them(tmp_path):
    workdir = str(tmp_path / "run")
    config = train_config(num_steps=6, eval_every=3, quantizer_warmup_steps=3)
    summary = train_and_evaluate(config, workdir)
    assert summary["step"] == 6 and np.isfinite(summary["psnr"])
    assert {"baseline_psnr_mean_colour", "baseline_psnr_thumbnail_1x1", "psnr_first_1", "psnr_first_2",
            "psnr_first_8"} <= set(summary)
    files = set(os.listdir(workdir))
    assert {"config.json", "eval.json", "checkpoints", "images"} <= files
    assert json.loads(open(os.path.join(workdir, "eval.json")).read())["data"]["source"] == "photos"
    assert any(name.startswith("events.out.tfevents") for name in files)
    assert sorted(os.listdir(os.path.join(workdir, "images"))) == [
        "rate_distortion_0000003.png", "rate_distortion_0000006.png",
        "reconstructions_0000003.png", "reconstructions_0000006.png"]
    with open(os.path.join(workdir, "eval.json")) as f:
        codec = json.load(f)["rate_distortion"]  # 8 tokens of 64 codes: 6 bits each
    assert [(row["tokens"], row["bits"]) for row in codec] == [(1, 6.0), (2, 12.0), (4, 24.0), (8, 48.0)]
    assert [row["psnr"] for row in codec] == [summary[f"psnr_first_{k}"] for k in (1, 2, 4, 8)]
    assert codec[-1]["thumbnail_psnr"] == summary["baseline_psnr_thumbnail_1x1"]
    assert codec[-1]["mean_colour_psnr"] == summary["baseline_psnr_mean_colour"]
    assert sorted(int(s) for s in os.listdir(os.path.join(workdir, "checkpoints")) if s.isdigit()) == [4, 6]

    tokenizer = Tokenizer.from_checkpoint(workdir)
    ema, _ = checkpoints.load_params(workdir, use_ema=True)
    for name, value in flat(ema).items():
        np.testing.assert_array_equal(flat(jax.device_get(tokenizer.params))[name], value)
    images = np.zeros((2, 16, 16, 3), np.uint8)
    assert tokenizer.decode(tokenizer.encode(images)[:, :2]).shape == (2, 16, 16, 3)


@pytest.mark.slow
def test_sigkill_and_sigterm_then_resume_equal_an_uninterrupted_run(tmp_path):
    config_file = write_config_file(str(tmp_path), checkpoint_every=2)
    runs = {name: str(tmp_path / name) for name in ("straight", "killed", "terminated")}

    def wait_for_first_checkpoint(*names):
        deadline = time.time() + 240
        while time.time() < deadline and not all(
                os.path.isdir(os.path.join(runs[name], "checkpoints", "2")) for name in names):
            time.sleep(0.05)

    # The other runs start once the first has compiled, so they load its programs from the cache.
    processes = {"straight": start_main(config_file, runs["straight"], "--config.train.num_steps=12")}
    wait_for_first_checkpoint("straight")
    for name in ("killed", "terminated"):
        processes[name] = start_main(config_file, runs[name], "--config.train.num_steps=12")
    wait_for_first_checkpoint("killed", "terminated")
    processes["killed"].send_signal(signal.SIGKILL)
    processes["terminated"].send_signal(signal.SIGTERM)
    code, stderr = finish(processes["straight"])
    assert code == 0, stderr[-3000:]
    assert finish(processes["killed"])[0] == -signal.SIGKILL
    code, stderr = finish(processes["terminated"])
    assert "run the same command to resume" in stderr, stderr[-3000:]

    resumed_runs = {}
    for name in ("killed", "terminated"):
        saved = sorted(int(s) for s in os.listdir(os.path.join(runs[name], "checkpoints")) if s.isdigit())
        assert saved and saved[-1] < 12  # interrupted before the end
        resumed_runs[name] = start_main(config_file, runs[name], "--config.train.num_steps=12")
    for name, process in resumed_runs.items():
        code, stderr = finish(process)
        assert code == 0, stderr[-3000:]
        assert_same_checkpoint(runs["straight"], runs[name], 12, label=name)


@pytest.mark.slow
def test_hierarchical_stages_freeze_bit_exactly_and_grow_new_experts(tmp_path, monkeypatch):
    workdir = str(tmp_path / "hnt")
    config = train_config()
    config.hnt.stages = (
        dict(num_tokens=4, num_steps=6, frozen=()),
        dict(num_tokens=8, num_steps=6, frozen=("mit", "old_experts", "token_head", "quantizer")),
    )
    first_batches = []

    def recording_iterator(*args, **kwargs):  # the stage's first batch, from a twin of its iterator
        first_batches.append(next(train_iterator(*args, **kwargs))["image"])
        return train_iterator(*args, **kwargs)

    monkeypatch.setattr(trainer_module, "train_iterator", recording_iterator)
    summary = train_and_evaluate(config, workdir)
    # Each stage draws its own stream: the second stage's step 0 is not the first stage's batch
    # (both count steps from 0); the first stage keeps train.seed.
    assert len(first_batches) == 2 and not np.array_equal(first_batches[0], first_batches[1])
    np.testing.assert_array_equal(first_batches[0], next(train_iterator(
        config.data, open_sources(config.data, config.data.num_eval_images)[0], image_size=config.model.image_size,
        batch_size=config.train.batch_size, seed=config.train.seed))["image"])
    assert [s["num_tokens"] for s in summary["stages"]] == [4, 8]
    first = flat(checkpoints.load_params(os.path.join(workdir, "stage0_4tokens"), use_ema=False)[0])
    second = flat(checkpoints.load_params(os.path.join(workdir, "stage1_8tokens"), use_ema=False)[0])
    grown_config = train_config()
    grown_config.model.num_tokens = 8
    init = flat(sharding.params_of(build_model(grown_config.model, nnx.Rngs(0))))

    for key, before in first.items():
        after = second[key]
        if key.startswith(("mit/", "token_head/", "quantizer/")):
            np.testing.assert_array_equal(after, before, err_msg=key)  # frozen, weight decay included
        elif key.startswith("experts/"):
            np.testing.assert_array_equal(after[:4], before, err_msg=key)  # the old experts
            assert not np.array_equal(after[4:], init[key][4:]), key  # the new experts trained
    assert not np.array_equal(second["decoder/head/kernel"], first["decoder/head/kernel"])

    # The first 4 tokens of every image are exactly the first stage's: native order is kept.
    images = np.random.default_rng(0).integers(0, 256, (3, 16, 16, 3), dtype=np.uint8)
    ids_first = Tokenizer.from_checkpoint(os.path.join(workdir, "stage0_4tokens"), use_ema=False).encode(images)
    ids_second = Tokenizer.from_checkpoint(workdir, use_ema=False).encode(images)
    assert ids_second.shape == (3, 8)
    np.testing.assert_array_equal(ids_second[:, :4], ids_first)
    # So are they with the EMA weights, which users load by default: the EMA grew from the EMA.
    ids_first = Tokenizer.from_checkpoint(os.path.join(workdir, "stage0_4tokens")).encode(images)
    ids_second = Tokenizer.from_checkpoint(workdir).encode(images)
    np.testing.assert_array_equal(ids_second[:, :4], ids_first)
    first_ema = flat(checkpoints.load_params(os.path.join(workdir, "stage0_4tokens"), use_ema=True)[0])
    second_ema = flat(checkpoints.load_params(os.path.join(workdir, "stage1_8tokens"), use_ema=True)[0])
    for key in (k for k in first_ema if k.startswith(("mit/", "token_head/", "quantizer/"))):
        np.testing.assert_array_equal(second_ema[key], first_ema[key], err_msg=key)


def test_growing_parameters_names_what_does_not_fit():
    old = {"experts": {"stack": {"query": jnp.ones((4, 16))}}, "decoder": {"head": {"kernel": jnp.ones((3, 5))}}}
    new = {"experts": {"stack": {"query": jnp.zeros((8, 16))}}, "decoder": {"head": {"kernel": jnp.zeros((3, 6))}},
           "mit": {"norm": {"scale": jnp.ones(3)}}}
    with pytest.raises(RestoreError, match=r"missing mit/norm/scale; decoder/head/kernel has shape \(3, 5\), the model "
                                           r"needs \(3, 6\)"):
        grow_params(old, new)
    grown = grow_params({"experts": old["experts"]}, {"experts": new["experts"]})
    np.testing.assert_array_equal(grown["experts"]["stack"]["query"][:4], 1.0)
    np.testing.assert_array_equal(grown["experts"]["stack"]["query"][4:], 0.0)


@pytest.mark.slow
def test_a_non_finite_loss_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path):
    workdir = str(tmp_path / "nan")
    config = train_config(num_steps=20, checkpoint_every=1, log_every=1, learning_rate=1e30, grad_clip_norm=0.0)
    with pytest.raises(NonFiniteLossError, match=r"at step \d+; stopped, and (the last good checkpoint|no checkpoint)"):
        train_and_evaluate(config, workdir)
    saved = sorted(int(s) for s in os.listdir(os.path.join(workdir, "checkpoints")) if s.isdigit())
    if saved:
        params, _ = checkpoints.load_params(workdir, use_ema=False)
        assert all(np.all(np.isfinite(v)) for v in flat(params).values())


@pytest.mark.slow
@pytest.mark.parametrize(
    "flags, message",
    [
        (["--config.train.batch_size=0"], "error: config.train.batch_size: must be a positive integer, got 0"),
        (["--config.data.source=folder", "--config.data.path=/no/such/images"],
         "error: config.data.path: image folder '/no/such/images' does not exist"),
        (["--config.model.decoder.head=rgb"], "error: config.model.decoder.head: must be one of"),
        (["--config.data.path=/some/images"],
         "error: config.data.path: is read only when data.source is 'folder', but data.source is 'photos'"),
        (["--config.train.quantizer_warmup_steps=100"],
         "error: config.train.quantizer_warmup_steps: 100 leaves none of the 8 steps quantised"),
    ],
)
def test_bad_input_stops_main_with_one_line(tmp_path, flags, message):
    config_file = write_config_file(str(tmp_path))
    code, stderr = finish(start_main(config_file, str(tmp_path / "run"), *flags), timeout=120)
    assert code == 1
    assert stderr.strip().splitlines()[-1].startswith(message)
    assert "Traceback" not in stderr


@pytest.mark.slow
def test_two_processes_train_checkpoint_and_resume(tmp_path):
    config_file = write_config_file(str(tmp_path), checkpoint_every=2)
    workdir = str(tmp_path / "multi")
    port = 20000 + os.getpid() % 20000
    env = dict(os.environ, JAX_PLATFORMS="cpu",
               XLA_FLAGS=os.environ["XLA_FLAGS"].replace("device_count=8", "device_count=4"))

    def run_both(num_steps: int):
        processes = [
            start_main(config_file, workdir, f"--config.train.num_steps={num_steps}",
                       f"--coordinator_address=localhost:{port}", "--num_processes=2", f"--process_id={i}", env=env)
            for i in range(2)
        ]
        for process in processes:
            code, stderr = finish(process)
            assert code == 0, stderr[-3000:]

    run_both(2)
    assert checkpoints.Checkpoints(os.path.join(workdir, "checkpoints"), 5).latest_step() == 2
    run_both(4)  # restores step 2 on both processes, then trains on
    with open(os.path.join(workdir, "eval.json")) as f:
        assert json.load(f)["step"] == 4
    params, step = checkpoints.load_params(workdir, use_ema=False)
    assert step == 4 and all(np.all(np.isfinite(v)) for v in flat(params).values())


def test_a_later_stages_pretrained_file_is_read_before_the_first_stage_trains(tmp_path, monkeypatch):
    """The recipe's decoder fine-tune is the first stage to use LPIPS: a file of another kind failed
    only after the stages before it had trained."""
    from nativetok_jax.pretrained import files
    from nativetok_jax.pretrained.files import WeightsError

    wrong = str(tmp_path / "inception_not_lpips.npz")
    files.save_weights(wrong, {"a": np.zeros(1, np.float32)}, kind="fid_inception")
    config = train_config(num_steps=2)
    config.pretrained.lpips = wrong
    config.hnt.stages = (dict(name="first", num_tokens=8, num_steps=2),
                         dict(name="with_lpips", num_tokens=8, num_steps=2,
                              overrides=(("train.losses.perceptual_weight", 0.1),)))

    def trained(*args, **kwargs):
        raise AssertionError("a stage trained before the later stage's file was read")

    monkeypatch.setattr(trainer_module, "_train_stage", trained)
    with pytest.raises(WeightsError, match="holds 'fid_inception' weights, expected 'lpips'"):
        train_and_evaluate(config, str(tmp_path / "run"))


def test_a_stage_whose_overrides_change_a_shape_is_refused_before_any_stage_trains(tmp_path, monkeypatch):
    """Such a stage failed as a RestoreError when it started, after the stages before it had trained."""
    from nativetok_jax.config import ConfigError

    config = train_config(num_steps=2)
    config.hnt.stages = (dict(name="first", num_tokens=8, num_steps=2),
                         dict(name="deeper", num_tokens=16, num_steps=2, overrides=(("model.decoder.width", 48),)))
    monkeypatch.setattr(trainer_module, "_train_stage", lambda *a, **k: pytest.fail("a stage trained first"))
    with pytest.raises(ConfigError, match=r"^config.hnt.stages\[1\]: its model cannot grow from stage 0's: .*decoder"):
        train_and_evaluate(config, str(tmp_path / "run"))
