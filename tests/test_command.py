"""The command lines' shared parts: a bad config flag (a field typo, a config file given an argument
it does not take, a missing or unknown argument) is one line naming the field or the choices; the
project's own errors are one line and anything else keeps its traceback."""

import os
import sys
from unittest import mock

import pytest
from absl import flags

from nativetok_jax import command, errors
from nativetok_jax import main as train_main  # noqa: F401 - defines --config and --workdir
from nativetok_jax.config import ConfigError, load_config_file
from nativetok_jax.experiments.entry_point import run_and_report
from nativetok_jax.pretrained import files

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir)


def parse(*args: str):
    """``config_flags_parser`` on ``main ARGS`` (what ``python -m nativetok_jax.main ARGS`` parses)."""
    argv = ["nativetok_jax.main", *args]
    flags.FLAGS.unparse_flags()
    for name in [name for name in flags.FLAGS if name.startswith("config.")]:
        delattr(flags.FLAGS, name)
    with mock.patch.object(sys, "argv", argv):  # ml_collections reads config overrides from sys.argv
        return command.config_flags_parser(argv)


@pytest.mark.parametrize("args, message", [
    (["--config", "configs/demo.py", "--config.train.num_step=10"],
     "error: --config.train.num_step: config.train has no field 'num_step'; did you mean 'num_steps'?"),
    (["--config", "configs/demo.py", "--config.trian.num_steps=10"],
     "error: --config.trian.num_steps: config has no field 'trian'; did you mean 'train'?"),
    (["--config", "configs/demo.py:32"],
     "error: configs/demo.py takes no argument, got '32': give configs/demo.py without ':32'"),
    (["--config", "configs/token_order.py:tabel"],
     "error: configs/token_order.py: unknown argument 'tabel'; one of: configs/token_order.py:demo, "
     "configs/token_order.py:table, configs/token_order.py:full, configs/token_order.py:imagenet"),
    (["--config", "configs/nativetok.py"],
     "error: configs/nativetok.py needs an argument, one of: configs/nativetok.py:32, configs/nativetok.py:64, "
     "configs/nativetok.py:128, configs/nativetok.py:64,hnt, configs/nativetok.py:128,hnt"),
    (["--config", "configs/gen_imagenet.py"],
     "error: configs/gen_imagenet.py needs an argument, one of: configs/gen_imagenet.py:ar,B, "
     "configs/gen_imagenet.py:ar,L, configs/gen_imagenet.py:maskgit"),
    (["--config", "configs/d2it.py"],
     "error: configs/d2it.py needs an argument, one of: configs/d2it.py:B, configs/d2it.py:L, configs/d2it.py:XL"),
    # A DVAE has no HNT stages, prefix dropout or quantiser: its config does not hold those fields,
    # so setting one stops the run instead of being ignored.
    (["--config", "configs/dvae_demo.py", "--config.hnt.stages=()"],
     "error: --config.hnt.stages: config has no field 'hnt'; its fields: data, discriminator, mesh, model, "
     "pretrained, sharding, task, train"),
    (["--config", "configs/dvae_demo.py", "--config.train.quantizer_warmup_steps=10"],
     "error: --config.train.quantizer_warmup_steps: config.train has no field 'quantizer_warmup_steps'; "
     "did you mean 'warmup_steps'?"),
])
def test_a_bad_config_flag_is_one_line_naming_the_field_or_the_choices(args, message, monkeypatch):
    monkeypatch.chdir(ROOT)
    with pytest.raises(SystemExit) as stop:
        parse(*args, "--workdir", "/tmp/unused")
    assert stop.value.code == message


def test_a_good_config_flag_parses():
    parse("--config", os.path.join(ROOT, "configs", "demo.py"), "--workdir", "/tmp/unused",
          "--config.train.num_steps=10")
    assert flags.FLAGS.config.train.num_steps == 10


@pytest.mark.parametrize("spec, expected", [
    ("titok.py", 32), ("nativetok_base.py", 32),  # documented defaults: TiTok-L-32, the base size's 32 tokens
    ("nativetok.py:64", 64), ("recipe.py:titok,64", 64)])
def test_configs_with_a_documented_default_keep_it_and_the_others_take_their_argument(spec, expected):
    assert load_config_file(os.path.join(ROOT, "configs", spec)).model.num_tokens == expected


@pytest.mark.parametrize("spec", ["gen_demo.py", "demo_gan.py", "dvae.py", "token_order.py"])
def test_the_demos_and_documented_defaults_load_without_an_argument(spec):
    load_config_file(os.path.join(ROOT, "configs", spec))


@pytest.mark.parametrize("spec, message", [
    ("recipe.py", "configs/recipe.py needs an argument"), ("recipe.py:titok,x", "TOKENS a positive integer"),
    ("dit.py", "configs/dit.py needs an argument, one of: configs/dit.py:S, "), ("dvae.py:lsun", "one of: "),
    ("gen_demo.py:gpt", "configs/gen_demo.py: unknown argument 'gpt'; one of: configs/gen_demo.py:ar, ")])
def test_a_missing_or_unknown_config_argument_is_a_config_error(spec, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")) as error:
        load_config_file(os.path.join(ROOT, "configs", spec))
    assert "\n" not in str(error.value)


def test_experiments_print_the_projects_errors_in_one_line_and_keep_a_bugs_traceback():
    def bad_input():
        raise ConfigError("arms: unknown 'natve'; choose among native, order_free")

    with pytest.raises(SystemExit) as stop:
        run_and_report(bad_input, str, "nothing")
    assert stop.value.code == "error: arms: unknown 'natve'; choose among native, order_free"

    def bug():
        raise ValueError("operands could not be broadcast together")

    with pytest.raises(ValueError, match="operands could not be broadcast"):  # was "error: operands ..."
        run_and_report(bug, str, "nothing")


def test_every_error_of_the_project_is_a_user_error_and_keeps_its_cause(tmp_path):
    garbage = tmp_path / "weights.npz"
    garbage.write_bytes(b"not an npz")
    with pytest.raises(files.WeightsError) as error:
        files.load_weights(str(garbage))
    assert isinstance(error.value, errors.UserError) and error.value.__cause__ is not None


def test_sample_labels_that_are_not_integers_are_one_line():
    from nativetok_jax import sample

    assert sample.parse_labels("0,3,1") == [0, 3, 1] and sample.parse_labels(None) is None
    with pytest.raises(ConfigError, match=r"^--labels: expected comma-separated class ids such as 0,3,1, got 'a,b'$"):
        sample.parse_labels("a,b")
