"""Flags: every retrain.py flag is accepted, unknown ones are named, values are checked."""

from __future__ import annotations

import logging

import pytest

from lastlayer.errors import UsageError
from lastlayer.settings.options import LabelOptions, RetrainOptions, parse_flags

RETRAIN_PY_FLAGS = {
    # the codelab's scripts/retrain.py
    "image_dir": "x",
    "output_graph": "g",
    "intermediate_output_graphs_dir": "i/",
    "intermediate_store_frequency": "5",
    "output_labels": "l",
    "summaries_dir": "s",
    "how_many_training_steps": "500",
    "learning_rate": "0.05",
    "testing_percentage": "10",
    "validation_percentage": "10",
    "eval_step_interval": "10",
    "train_batch_size": "100",
    "test_batch_size": "-1",
    "validation_batch_size": "100",
    "print_misclassified_test_images": None,
    "model_dir": "m",
    "bottleneck_dir": "b",
    "final_tensor_name": "final_result",
    "flip_left_right": None,
    "random_crop": "5",
    "random_scale": "5",
    "random_brightness": "5",
    "architecture": "mobilenet_0.50_224",
    # TF-Hub's retrain.py additions (accepted; some only to say what to use instead)
    "saved_model_dir": "",
    "logging_verbosity": "INFO",
    "checkpoint_path": "",
}


def test_every_retrain_py_flag_is_accepted():
    argv = []
    for name, value in RETRAIN_PY_FLAGS.items():
        argv += [f"--{name}"] if value is None else [f"--{name}={value}"]
    opts = parse_flags(argv)
    assert opts.training.how_many_training_steps == 500 and opts.training.flip_left_right is True
    assert opts.outputs.print_misclassified_test_images is True and opts.training.learning_rate == 0.05


def test_walkthrough_style_key_value_pairs():
    # the walkthrough's job adapter passes ["--flag", str(value)] pairs, booleans as "True"
    opts = parse_flags(
        ["--how_many_training_steps", "500", "--flip_left_right", "True", "--random_seed", "3"]
    )
    t = opts.training
    assert t.how_many_training_steps == 500 and t.flip_left_right and t.random_seed == 3
    assert parse_flags(["--flip_left_right", "false"]).training.flip_left_right is False


def test_unknown_flag_names_the_closest():
    with pytest.raises(
        UsageError, match=r"unknown flag --how_many_train_steps; did you mean --how_many_training_steps"
    ):
        parse_flags(["--how_many_train_steps=5"])
    with pytest.raises(UsageError, match="did you mean --top_k"):
        parse_flags(["--topk=3"], LabelOptions)


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["--testing_percentage=60", "--validation_percentage=40"], "--testing_percentage=60"),
        (["--train_batch_size=0"], "--train_batch_size=0: must be -1"),
        (["--learning_rate=-1"], "--learning_rate"),
        (["--how_many_training_steps=abc"], "invalid int value"),
        (["--tfhub_module=https://tfhub.dev/x"], "use --architecture"),
    ],
)
def test_bad_values_name_the_flag(argv, needle):
    with pytest.raises(UsageError, match=needle):
        parse_flags(argv)


def test_inapplicable_flags_say_what_to_use_instead(caplog):
    with caplog.at_level(logging.WARNING):
        parse_flags(["--saved_model_dir=/tmp/sm"])
    assert "self-contained ONNX" in caplog.text


def test_defaults_are_retrain_py_defaults():
    o = RetrainOptions().training
    assert (
        o.how_many_training_steps,
        o.learning_rate,
        o.train_batch_size,
        o.eval_step_interval,
        o.validation_batch_size,
        o.test_batch_size,
        o.validation_percentage,
        o.testing_percentage,
    ) == (4000, 0.01, 100, 10, 100, -1, 10, 10)


@pytest.mark.parametrize(
    "flag",
    ["--learning_rate=inf", "--learning_rate=nan", "--random_crop=inf", "--shard_wait_seconds=-inf"],
)
def test_non_finite_numbers_are_refused(flag, capsys):
    # issue 9, finding 10: --learning_rate=inf trained to nan and saved a model that scored nan
    from lastlayer.cli import main

    assert main(["retrain", flag]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith(f"lastlayer: error: {flag.split('=')[0]}=") and "must be a finite number" in line
