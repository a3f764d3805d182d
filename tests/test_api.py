"""The public Python API: its names, and the README's example, run as written."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import lastlayer
from lastlayer.engines import engine_class
from lastlayer.settings.run import ENGINE_NAMES, KNOWN_ENGINES, EngineConfig

README = Path(__file__).resolve().parents[1] / "README.md"


def test_every_public_name_resolves():
    for name in lastlayer.__all__:
        assert getattr(lastlayer, name) is not None, name
    assert set(lastlayer.__all__) == {*lastlayer._HOME, "__version__"}
    assert callable(lastlayer.retrain) and callable(lastlayer.label) and callable(lastlayer.upload)


def test_engine_choices_come_from_the_registry():
    assert ENGINE_NAMES == tuple(KNOWN_ENGINES) == ("local", "spark")
    assert [engine_class(name).name for name in ENGINE_NAMES] == ["local", "spark"]
    (engine_field,) = [f for f in EngineConfig.__dataclass_fields__.values() if f.name == "engine"]
    assert engine_field.metadata["option"].choices == ENGINE_NAMES


def test_settings_load_no_engine_network_runtime_arrow_or_hdfs_client():
    """Building a run's settings imports neither onnxruntime, pyarrow nor hdfs-native (engines and
    the hdfs:// adapter load when a run makes them), and no engine module."""
    code = (
        "import sys, lastlayer; lastlayer.TrainingConfig(); lastlayer.EngineConfig(engine='spark');"
        "print(sorted(m for m in ('onnxruntime', 'pyarrow', 'hdfs_native', 'lastlayer.engines.local',"
        " 'lastlayer.engines.spark', 'lastlayer.hadoop.fs') if m in sys.modules))"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_the_readme_python_example_runs(tmp_path, monkeypatch, capsys):
    text = README.read_text()
    section = text[text.index("## Python API") :]
    example = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    monkeypatch.chdir(tmp_path)
    exec(compile(example, "README.md", "exec"), {})
    out = capsys.readouterr().out.splitlines()
    assert re.fullmatch(r"test accuracy \d+\.\d% \(N=\d+\)", out[0])
    assert re.fullmatch(r"\('sneaker', 0\.\d+\)", out[1])
    assert (tmp_path / "work" / "model.onnx").is_file() and (tmp_path / "work" / "labels.txt").is_file()
