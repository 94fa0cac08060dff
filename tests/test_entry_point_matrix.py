"""Every entry point on every kind of run: ``main`` trains a few steps, then ``evaluate``, ``sample``,
``export`` and ``from_pretrained`` each do their job or refuse in one line naming what the workdir is
and what the command needs. One tiny run per kind for the module, every command called in this
process through its own ``main`` (as ``python -m`` would, without the process start)."""

import os
import signal
import sys
from types import SimpleNamespace
from unittest import mock

import numpy as np
import pytest
from absl import flags

import conftest
from conftest import flat
from nativetok_jax import Tokenizer, command, evaluate, sample
from nativetok_jax import main as train_main
from nativetok_jax.dvae import DVAE
from nativetok_jax.generation.diffusion_models import TrainedD2iT, TrainedDiT
from nativetok_jax.generation.pretrained import TrainedGenerator
from nativetok_jax.pretrained import export
from test_training import train_config

KINDS = ("tokenizer", "hnt", "ar", "maskgit", "dit", "dvae", "d2it")
STEPS = ["--config.train.num_steps=2", "--config.train.checkpoint_every=2", "--config.train.eval_every=2"]
# What each kind's workdir is called in the refusals.
WHAT = {"tokenizer": "a tokenizer run (task 'tokenizer')", "hnt": "an HNT tokenizer run (2 stages, task 'tokenizer')",
        "ar": "an AR generator run (task 'generator')", "maskgit": "a MaskGIT generator run (task 'generator')",
        "dit": "a DiT run (task 'diffusion')", "dvae": "a DVAE run (task 'dvae')", "d2it": "a D²iT run (task 'd2it')"}
LOADERS = {"tokenizer": Tokenizer, "hnt": Tokenizer, "ar": TrainedGenerator, "maskgit": TrainedGenerator,
           "dit": TrainedDiT, "dvae": DVAE, "d2it": TrainedD2iT}


def hnt_config():
    """The tiny tokenizer in two HNT stages of 2 steps: 4 tokens, then 8 with the old parts frozen."""
    config = train_config(num_steps=2, checkpoint_every=2, eval_every=2)
    config.hnt.stages = (dict(num_tokens=4, num_steps=2, frozen=()),
                         dict(num_tokens=8, num_steps=2, frozen=("mit", "old_experts", "token_head", "quantizer")))
    return config


def run_command(module, args: list[str], parser=None) -> int | str:
    """``python -m nativetok_jax.<module> ARGS`` in this process: 0, or what it exited with."""
    argv = [module.__name__, *args]
    try:
        with mock.patch.object(sys, "argv", argv):  # ml_collections reads config overrides from sys.argv
            if parser is None:
                module.FLAGS.unparse_flags()
                parsed = module.FLAGS(argv, known_only=True)
            else:
                flags.FLAGS.unparse_flags()
                for name in [name for name in flags.FLAGS if name.startswith("config.")]:
                    delattr(flags.FLAGS, name)  # the previous call's config overrides (ml_collections adds flags)
                parsed = parser(argv)
            module.main(parsed[:1])
    except SystemExit as stop:
        return stop.code
    return 0


def train(config_file: str, workdir: str, *overrides: str) -> int | str:
    return run_command(train_main, ["--config", config_file, "--workdir", workdir, *STEPS, *overrides],
                       parser=command.config_flags_parser)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """``{kind: workdir}``, each trained lazily by ``main`` when a test first asks for it."""
    root = tmp_path_factory.mktemp("matrix")
    trained: dict[str, str] = {}

    def config_file(factory: str, **kwargs) -> str:
        directory = root / "configs" / factory.replace(".", "_")
        directory.mkdir(parents=True, exist_ok=True)
        return conftest.write_config_file(directory, factory, **kwargs)

    def get(kind: str) -> str:
        if kind in trained:
            return trained[kind]
        workdir = str(root / kind)
        if kind == "tokenizer":
            code = train(config_file("test_training.train_config"), workdir)
        elif kind == "hnt":
            code = train(config_file("test_entry_point_matrix.hnt_config"), workdir)
        elif kind in ("ar", "maskgit"):
            code = train(config_file("test_generator_training.tiny_generator_config", tokenizer_dir=get("tokenizer"),
                                     kind=kind), workdir, "--config.generator.num_train_examples=32",
                         "--config.generator.num_eval_examples=16")
        elif kind == "dit":
            code = train(config_file("test_diffusion_training.tiny_dit_config"), workdir,
                         "--config.latents.num_train_examples=16")
        elif kind == "dvae":
            code = train(config_file("test_dvae_training.dvae_train_config"), workdir,
                         "--config.train.latent_scale_batches=1")
        else:
            code = train(config_file("test_d2it_training.tiny_d2it_config", dvae_dir=get("dvae")), workdir,
                         "--config.latents.num_train_examples=16", "--config.train.log_every=1")
        assert code == 0, code
        trained[kind] = workdir
        return workdir

    return get


@pytest.mark.slow
@pytest.mark.parametrize("kind", KINDS)
def test_main_trains_every_kind_in_a_few_steps(runs, kind):
    workdir = runs(kind)
    stage = os.path.join(workdir, "stage1_8tokens") if kind == "hnt" else workdir
    assert sorted(os.listdir(os.path.join(stage, "checkpoints"))) == ["2"]


@pytest.mark.slow
@pytest.mark.parametrize("kind", KINDS)
def test_evaluate_judges_tokenizers_and_dvaes_and_refuses_the_rest_in_one_line(runs, kind, tmp_path, capsys):
    workdir = runs(kind)
    capsys.readouterr()  # what training printed
    out = str(tmp_path / "eval.json")
    code = run_command(evaluate, ["--workdir", workdir, "--data", "photos", "--num_images", "2", "--batch_size", "2",
                                  "--noprefix", "--out", out])
    if kind in ("tokenizer", "hnt", "dvae"):
        assert code == 0 and os.path.isfile(out)
        assert capsys.readouterr().out.startswith("2 images: PSNR ")
        return
    assert code == (f"error: evaluate --workdir: {workdir} is {WHAT[kind]}; evaluate --workdir needs a tokenizer or "
                    "DVAE run (task 'tokenizer' or 'dvae'); judge a generator's images with sample, then evaluate "
                    "--samples")
    assert not os.path.exists(out)


@pytest.mark.slow
@pytest.mark.parametrize("kind", KINDS)
def test_sample_draws_from_generators_and_diffusion_runs_and_refuses_the_rest_in_one_line(runs, kind, tmp_path,
                                                                                          capsys):
    workdir = runs(kind)
    capsys.readouterr()
    out = str(tmp_path / "samples")
    args = ["--workdir", workdir, "--out", out, "--num_samples", "2", "--batch_size", "2"]
    if kind in ("dit", "d2it"):
        args += ["--num_steps", "2"]
    code = run_command(sample, args)
    if kind in ("ar", "maskgit", "dit", "d2it"):
        assert code == 0, code
        assert {"grid.png", "sample_00000.png", "sample_00001.png"} <= set(os.listdir(out))
        assert capsys.readouterr().out.startswith("wrote 2 samples")
        return
    assert code == (f"error: sample: {workdir} is {WHAT[kind]}; sample needs a generator, DiT or D²iT run (task "
                    "'generator', 'diffusion' or 'd2it'); a tokenizer or DVAE is judged with evaluate --workdir")
    assert not os.path.exists(out)


@pytest.mark.slow
@pytest.mark.parametrize("kind", KINDS)
def test_export_then_from_pretrained_gives_the_checkpoints_model(runs, kind, tmp_path, capsys):
    workdir, out = runs(kind), str(tmp_path / "exported")
    capsys.readouterr()
    assert export.main(["--workdir", workdir, "--out", out]) == 0
    written = export.TASK_KINDS[{"hnt": "tokenizer", "ar": "generator", "maskgit": "generator",
                                 "dit": "diffusion"}.get(kind, kind)]
    assert capsys.readouterr().out.strip() == f"exported the {written} of {workdir} to {out}"
    loader = LOADERS[kind]
    loaded, expected = loader.from_pretrained(out), loader.from_checkpoint(workdir)
    assert flat(loaded.params).keys() == flat(expected.params).keys()
    for name, value in flat(expected.params).items():
        np.testing.assert_array_equal(flat(loaded.params)[name], value, err_msg=name)
    if kind in ("dvae", "d2it"):
        dvae_loaded, dvae_expected = (loaded, expected) if kind == "dvae" else (loaded.dvae, expected.dvae)
        assert dvae_loaded.latent_scale == dvae_expected.latent_scale
        for name, value in flat(dvae_expected.params).items():
            np.testing.assert_array_equal(flat(dvae_loaded.params)[name], value, err_msg=name)
    if kind in ("ar", "maskgit"):
        for name, value in flat(expected.tokenizer.params).items():
            np.testing.assert_array_equal(flat(loaded.tokenizer.params)[name], value, err_msg=name)


@pytest.mark.slow
def test_export_of_a_directory_without_a_checkpoint_is_one_line(tmp_path, capsys):
    workdir = tmp_path / "run"
    workdir.mkdir()
    (workdir / "config.json").write_text(train_config().to_json_best_effort())
    assert export.main(["--workdir", str(workdir), "--out", str(tmp_path / "out")]) == 1
    assert capsys.readouterr().err == f"error: no finished checkpoint under {str(workdir)!r} or its training stages\n"


# ------------------------------------------------------------------- an output that cannot be written

def unwritable(tmp_path) -> str:
    """A path under a regular file: no process can create it (a permission check would not stop
    root, which CI may run as)."""
    (tmp_path / "a_file").write_text("")
    return str(tmp_path / "a_file" / "out")


@pytest.mark.parametrize("bench", ["compile", "model", "train", "generate", "compare", "profile", "diffusion"])
def test_every_benchmark_refuses_an_unwritable_out_in_one_line_before_it_runs(bench, tmp_path, capsys):
    from nativetok_jax.bench import __main__ as bench_main

    out = unwritable(tmp_path)
    required = ["--configs", "configs/demo.py"] if bench == "compile" else []
    with pytest.raises(SystemExit) as stop:
        bench_main.main([bench, *required, "--out", out])
    assert stop.value.code == f"error: --out: cannot write {out}: {tmp_path / 'a_file'} is a file, not a directory"


def test_evaluate_and_the_tools_refuse_an_unwritable_out_in_one_line_before_any_work(tmp_path, capsys,
                                                                                     monkeypatch):
    from nativetok_jax import convert, grain_thresholds

    out = unwritable(tmp_path)
    # evaluate: before the workdir is even read (it does not exist here).
    assert run_command(evaluate, ["--workdir", str(tmp_path / "no_run"), "--data", "photos", "--out", out]) == (
        f"error: --out: cannot write {out}: {tmp_path / 'a_file'} is a file, not a directory")
    # convert: before the (absent) weights are read; dit writes a run directory, the others a file.
    for network in ("dit", "inception"):
        assert convert.main([network, str(tmp_path / "absent.pt"), "--out", out]) == 1
        assert capsys.readouterr().err == f"error: --out: cannot write {out}: {tmp_path / 'a_file'} is a file, not a directory\n"
    # grain_thresholds: before its config's crops are measured.
    monkeypatch.setattr(grain_thresholds, "compute_thresholds", lambda *a, **k: pytest.fail("crops were measured"))
    monkeypatch.setattr(grain_thresholds, "FLAGS", SimpleNamespace(config=None, out=out, num_images=8, batch_size=8))
    with pytest.raises(SystemExit) as stop:
        grain_thresholds.main(["grain_thresholds"])
    assert stop.value.code == f"error: --out: cannot write {out}: {tmp_path / 'a_file'} is a file, not a directory"


@pytest.mark.slow
def test_sample_and_export_refuse_an_unwritable_out_in_one_line_before_loading(runs, tmp_path, capsys, monkeypatch):
    from nativetok_jax import checkpoints

    out, generator, tokenizer = unwritable(tmp_path), runs("ar"), runs("tokenizer")
    monkeypatch.setattr(checkpoints, "load_params", lambda *a, **k: pytest.fail("the checkpoint was read"))
    assert run_command(sample, ["--workdir", generator, "--out", out, "--num_samples", "2"]) == (
        f"error: --out: cannot write {out}: {tmp_path / 'a_file'} is a file, not a directory")
    assert export.main(["--workdir", tokenizer, "--out", out]) == 1
    assert capsys.readouterr().err.endswith(f"error: --out: cannot write {out}: {tmp_path / 'a_file'} is a file, not a directory\n")


# ----------------------------------------------------------------------------- the error boundary

@pytest.mark.slow
def test_a_bug_inside_evaluate_keeps_its_traceback_instead_of_blaming_the_data(runs, monkeypatch):
    def shape_bug(*args, **kwargs):
        raise ValueError("operands could not be broadcast together with shapes (2,16) (2,8)")

    monkeypatch.setattr(evaluate, "evaluate_tokenizer", shape_bug)
    with pytest.raises(ValueError, match="operands could not be broadcast"):
        run_command(evaluate, ["--workdir", runs("tokenizer"), "--data", "photos", "--num_images", "2",
                               "--out", "/nonexistent/eval.json"])


# ----------------------------------------------------------------------------- Ctrl-C

def interrupt_at_step_2(monkeypatch, presses: int) -> None:
    """Ctrl-C (SIGINT to this process) ``presses`` times just before the training loop's second step."""
    from nativetok_jax.training import loop

    real = loop.make_train_step

    def make_train_step(*args, **kwargs):
        step, calls = real(*args, **kwargs), []

        def interrupted_step(state, batch):
            calls.append(1)
            if len(calls) == 2:
                for _ in range(presses):
                    os.kill(os.getpid(), signal.SIGINT)
                    sum(range(1000))  # the handler runs between two bytecodes, before the next press
            return step(state, batch)

        return interrupted_step

    monkeypatch.setattr(loop, "make_train_step", make_train_step)


@pytest.mark.slow
def test_ctrl_c_saves_stops_and_prints_the_resume_line(runs, tmp_path, monkeypatch):
    runs("tokenizer")  # compiled programs in the cache
    workdir = str(tmp_path / "run")
    interrupt_at_step_2(monkeypatch, presses=1)
    before = signal.getsignal(signal.SIGINT)
    code = train(conftest.write_config_file(tmp_path, "test_training.train_config"), workdir,
                 "--config.train.num_steps=4", "--config.train.checkpoint_every=4")
    assert code == (f"stopped: interrupted (Ctrl-C) at step 2; checkpoint saved in {workdir}/checkpoints; run the "
                    "same command to resume")
    assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["2"]
    assert signal.getsignal(signal.SIGINT) == before  # the loop and the boundary put the previous handler back


@pytest.mark.slow
def test_a_second_ctrl_c_stops_at_once_without_saving(runs, tmp_path, monkeypatch, capsys):
    runs("tokenizer")
    workdir = str(tmp_path / "run")
    interrupt_at_step_2(monkeypatch, presses=2)
    code = train(conftest.write_config_file(tmp_path, "test_training.train_config"), workdir,
                 "--config.train.num_steps=4", "--config.train.checkpoint_every=4")
    assert code == 130
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        "stopped: Ctrl-C twice, so without saving; the newest saved checkpoint is kept, run the same command to "
        "resume from it")
    assert not os.listdir(os.path.join(workdir, "checkpoints"))
