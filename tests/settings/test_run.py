"""The config objects of a run: checked when made (declared limits, then the rules between fields),
their flag names and the paths they derive."""

from __future__ import annotations

import dataclasses

import pytest

from lastlayer.errors import UsageError
from lastlayer.settings.run import CacheConfig, EngineConfig, OutputConfig, TrainingConfig, flat


def test_a_config_object_is_checked_when_it_is_made():
    with pytest.raises(UsageError, match=r"^--learning_rate=inf: must be a finite number$"):
        TrainingConfig(learning_rate=float("inf"))
    with pytest.raises(UsageError, match=r"^--how_many_training_steps=0: "):
        TrainingConfig(how_many_training_steps=0)
    with pytest.raises(UsageError, match=r"^--final_tensor_name='': must not be empty$"):
        OutputConfig(final_tensor_name="")
    with pytest.raises(UsageError, match=r"^--engine='gpu': must be one of local, spark$"):
        EngineConfig(engine="gpu")


def test_the_rules_between_fields_are_checked_after_the_limits_and_by_replace_too():
    with pytest.raises(UsageError, match=r"^--testing_percentage=60: with --validation_percentage=40 leaves"):
        TrainingConfig(testing_percentage=60, validation_percentage=40)
    with pytest.raises(UsageError, match=r"^--worker_index=2: must be in \[0, --worker_count\)$"):
        EngineConfig(worker_index=2, worker_count=2)
    with pytest.raises(UsageError, match=r"^--worker_count=2: must be 1 with --engine=spark"):
        EngineConfig(engine="spark", worker_count=2)
    engine = EngineConfig()
    assert dataclasses.replace(engine, worker_index=1, worker_count=2).worker_index == 1
    with pytest.raises(UsageError, match="--worker_index=1"):
        dataclasses.replace(engine, worker_index=1)


def test_flag_names_and_derived_paths():
    assert flat(CacheConfig(bottleneck_dir="b"))["bottleneck_dir"] == "b"
    assert set(flat(EngineConfig())) == {f.name for f in dataclasses.fields(EngineConfig)}
    outputs = OutputConfig(output_graph="/o/model.onnx")
    assert outputs.summary_url == "/o/model.summary.json" and outputs.report_url == "/o/model.report.html"
    assert OutputConfig(output_graph="/o/m.onnx", summary_json="/s.json").summary_url == "/s.json"
    assert (
        not TrainingConfig().distortions.enabled and TrainingConfig(flip_left_right=True).distortions.enabled
    )
