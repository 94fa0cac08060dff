"""A run's directory: a config whose model does not fit the checkpoints already there is refused in
one line naming the fields and parameters that differ, before anything is written, and never
replaces the run's config.json (issue 17, case 4)."""

import os
import shutil
import subprocess
import sys

import pytest

from nativetok_jax import checkpoints, evaluate, workdir
from nativetok_jax.config import ConfigError
from nativetok_jax.tokenizer import Tokenizer
from nativetok_jax.training.trainer import train_and_evaluate
from nativetok_jax.workdir import check_loadable, check_resume, run_directories
from test_training import ROOT, train_config, write_config_file


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    directory = str(tmp_path_factory.mktemp("run"))
    train_and_evaluate(train_config(num_steps=2), directory)
    return directory


def snapshot(directory: str) -> dict[str, tuple[int, bytes]]:
    """Every file under ``directory`` with its modification time and contents."""
    files = {}
    for folder, _, names in os.walk(directory):
        for name in names:
            path = os.path.join(folder, name)
            with open(path, "rb") as f:
                files[os.path.relpath(path, directory)] = (os.stat(path).st_mtime_ns, f.read())
    return files


def wider_codebook():
    config = train_config(num_steps=2)
    config.model.quantizer.codebook_size = 1024
    return config


def test_a_model_of_other_shapes_is_refused_naming_the_fields_and_parameters(finished_run):
    with pytest.raises(ConfigError) as error:
        check_resume(wider_codebook(), finished_run)
    message = str(error.value)
    assert "\n" not in message
    assert message.startswith(f"{finished_run} holds checkpoints (step 2) of another model: "
                              "config.model.quantizer.codebook_size is 1024, config.json has 64; parameters differ: "
                              "quantizer/codebook has shape (64, 4), expected (1024, 4)")


def test_the_same_model_with_other_training_settings_may_resume(finished_run):
    config = train_config(num_steps=6, learning_rate=1e-4, log_every=3)
    check_resume(config, finished_run)


def test_write_config_never_replaces_a_config_its_checkpoints_do_not_fit(finished_run):
    before = snapshot(finished_run)
    with pytest.raises(ConfigError, match="codebook_size is 1024"):
        workdir.write_config(finished_run, wider_codebook())  # what every trainer calls
    assert snapshot(finished_run) == before
    assert Tokenizer.from_checkpoint(finished_run).codebook_size == 64  # still loadable


def test_checkpoints_are_compared_even_after_the_config_was_overwritten(finished_run, tmp_path):
    """A workdir damaged by the old behaviour (config.json already rewritten) is still protected."""
    damaged = str(tmp_path / "damaged")
    shutil.copytree(finished_run, damaged)
    with open(os.path.join(damaged, checkpoints.CONFIG_FILE), "w") as f:
        f.write(wider_codebook().to_json_best_effort())
    with pytest.raises(ConfigError, match="its config.json has the requested model fields, the checkpoints do not; "
                                          r"parameters differ: quantizer/codebook has shape \(64, 4\)"):
        check_resume(wider_codebook(), damaged)
    # evaluate (and sample, Tokenizer users) name the damage in one line instead of a restore traceback.
    with pytest.raises(ConfigError) as error:
        evaluate.run_evaluation(damaged, "photos", str(tmp_path / "eval.json"))
    assert str(error.value) == (
        f"{damaged}/config.json does not describe the checkpoints there, which are (step 2) of another model: its "
        "config.json has the requested model fields, the checkpoints do not; parameters differ: quantizer/codebook "
        "has shape (64, 4), expected (1024, 4). Restore the config the run was trained with")
    check_loadable(finished_run)  # an intact run loads


def test_each_training_stage_is_checked_against_its_own_directory(finished_run, tmp_path):
    config = train_config(num_steps=2)
    config.hnt.stages = (dict(name="small", num_tokens=8, num_steps=2),
                         dict(name="large", num_tokens=16, num_steps=2))
    workdir = str(tmp_path / "hnt")
    assert [str(d) for d, _ in run_directories(config, workdir)] == [f"{workdir}/small", f"{workdir}/large"]
    large = run_directories(config, workdir)[1][1]
    large.train.quantizer_warmup_steps = 5  # the run's warm-up, longer than this later stage: still one directory
    assert [str(d) for d, _ in run_directories(large, f"{workdir}/large")] == [f"{workdir}/large"]
    shutil.copytree(os.path.join(finished_run, "checkpoints"), os.path.join(workdir, "small", "checkpoints"))
    check_resume(config, workdir)  # the 8-token checkpoints fit the 8-token stage
    shutil.copytree(os.path.join(finished_run, "checkpoints"), os.path.join(workdir, "large", "checkpoints"))
    with pytest.raises(ConfigError, match=f"^{workdir}/large holds checkpoints \\(step 2\\) of another model: no "
                                          "config.json to compare with; parameters differ: "):
        check_resume(config, workdir)


@pytest.mark.slow
def test_the_command_line_refuses_in_one_line_and_writes_nothing(finished_run, tmp_path):
    before = snapshot(finished_run)
    result = subprocess.run(
        [sys.executable, "-m", "nativetok_jax.main", "--config", write_config_file(tmp_path, num_steps=2),
         "--workdir", finished_run, "--config.model.quantizer.codebook_size=1024"],
        cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith(
        f"error: {finished_run} holds checkpoints (step 2) of another model: "
        "config.model.quantizer.codebook_size is 1024, config.json has 64")
    assert snapshot(finished_run) == before


def test_a_changed_step_count_may_not_move_the_warm_up_or_the_gan_start_across_the_checkpoint(finished_run, tmp_path):
    """A warm-up given as a fraction follows --config.train.num_steps: a run trained to step 2 with
    a quarter of 4 steps (codebook fitted before update 1), resumed with 16 steps, would put its
    warm-up at step 4 and fit the codebook again; with 6 steps (warm-up at 1) nothing moves across."""
    run = str(tmp_path / "run")
    shutil.copytree(finished_run, run)

    def config(num_steps, **train):
        return train_config(num_steps=num_steps, quantizer_warmup_steps=0, quantizer_warmup_fraction=0.25, **train)

    checkpoints.write_config(run, config(4))
    check_resume(config(6), run)
    check_resume(train_config(num_steps=16, quantizer_warmup_steps=1), run)  # pinned: the same boundary
    with pytest.raises(ConfigError) as error:
        check_resume(config(16), run)
    assert str(error.value) == (
        f"{run} holds checkpoints at step 2, after its quantiser warm-up at step 1; these settings put it at step 4 "
        "(train.num_steps 4 -> 16), so the resumed run would fit its codebook again, after 1 quantised update. Keep it "
        "with --config.train.quantizer_warmup_steps=1 --config.train.quantizer_warmup_fraction=0, or give a new "
        "--workdir")
    checkpoints.write_config(run, config(16))  # the other way: a warm-up at 4 moved to 1 would never be fitted
    with pytest.raises(ConfigError, match="before its quantiser warm-up at step 4; these settings put it at step 1 "
                                          r"\(train.num_steps 16 -> 4\), so the resumed run would never fit its codebook"):
        check_resume(config(4), run)

    def gan(num_steps):
        trained = train_config(num_steps=num_steps, quantizer_warmup_steps=0)
        trained.train.losses.update(adversarial_weight=0.1, adversarial_start_fraction=0.25)
        return trained

    checkpoints.write_config(run, gan(4))
    with pytest.raises(ConfigError, match="after its GAN start at step 1; these settings put it at step 4 .* switch its "
                                          "GAN off again, after 1 adversarial update. Keep it with "
                                          "--config.train.losses.adversarial_start_step=1 "
                                          "--config.train.losses.adversarial_start_fraction=0"):
        check_resume(gan(16), run)
    with pytest.raises(ConfigError, match="at step 2, after its quantiser warm-up"):
        workdir.write_config(run, config(16))  # what the trainers call before replacing config.json


def test_a_generator_knows_its_tokenizer_by_stage_and_step_so_a_later_stage_at_the_same_step_is_refused(
        finished_run, tmp_path):
    """HNT stages count their steps from 0: a tokenizer's next stage reaches step 2 with another
    model. The step alone passed the check; the stage (its directory's name) is recorded too, by
    the generator's upstream.json and its token stores."""
    from nativetok_jax.data import token_store
    from nativetok_jax.training.generator_trainer import tokenizer_upstream

    assert tokenizer_upstream(finished_run) == {"tokenizer stage": "", "tokenizer step": 2}
    config = train_config(num_steps=2)
    config.hnt.stages = (dict(name="small", num_tokens=8, num_steps=2), dict(name="large", num_tokens=16, num_steps=2))
    tokenizer = str(tmp_path / "tokenizer")
    checkpoints.write_config(tokenizer, config)
    shutil.copytree(os.path.join(finished_run, "checkpoints"), os.path.join(tokenizer, "small", "checkpoints"))
    upstream = tokenizer_upstream(tokenizer)
    assert upstream == {"tokenizer stage": "small", "tokenizer step": 2}
    generator = str(tmp_path / "generator")
    workdir.record_upstream(generator, upstream)
    store = tmp_path / "tokens"
    token_store.write_meta(store, dict(tokenizer=tokenizer, num_examples=4, **upstream, complete=True))

    shutil.copytree(os.path.join(finished_run, "checkpoints"), os.path.join(tokenizer, "large", "checkpoints"))
    now = tokenizer_upstream(tokenizer)
    with pytest.raises(ConfigError, match="tokenizer stage: 'small' when it trained, 'large' now"):
        workdir.check_upstream(generator, now, "sampling")
    with pytest.raises(token_store.TokenStoreError, match=r"made with other settings \(tokenizer stage\)"):
        token_store.check_meta(store, dict(tokenizer=tokenizer, num_examples=4, **now))
    # A store made before these fields were recorded is compared without them.
    token_store.write_meta(store, dict(tokenizer=tokenizer, num_examples=4, complete=True))
    assert token_store.check_meta(store, dict(tokenizer=tokenizer, num_examples=4, **now))["num_examples"] == 4
