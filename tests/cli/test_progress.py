"""The training log: a redrawn status line on a terminal, retrain.py's exact lines anywhere else."""

from __future__ import annotations

import io
import logging
import os
import pty
import re
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from helpers import make_dataset
from lastlayer.cli import progress
from lastlayer.training.train import Evaluation

STEP_LINE = re.compile(
    r"^INFO:lastlayer\.train:\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{6}: Step (\d+): Train accuracy = \d+\.\d%$",
    re.M,
)


class Terminal(io.StringIO):
    """A stream that says it is a terminal."""

    def isatty(self) -> bool:
        return True


@pytest.fixture
def terminal_log(monkeypatch):
    """The CLI's handler on a fake terminal, on the root logger for the test."""
    stream = Terminal()
    handler = progress.log_handler(stream)
    handler.setFormatter(logging.Formatter("%(levelname)s:%(name)s:%(message)s"))
    root = logging.getLogger()
    monkeypatch.setattr(root, "handlers", [handler])
    level = root.level
    root.setLevel(logging.INFO)  # (setLevel clears the loggers' cached levels; setting .level would not)
    monkeypatch.setattr(progress, "REDRAW_SECONDS", 0.0)
    monkeypatch.setenv("COLUMNS", "200")
    yield stream
    root.setLevel(level)


def test_on_a_terminal_step_lines_give_way_to_the_status_line(terminal_log):
    train_log = logging.getLogger("lastlayer.train")
    bar = progress.TrainingProgress(terminal_log, steps=20)
    train_log.info("%s: Step %d: Train accuracy = %.1f%%", "now", 9, 90.0)
    bar(Evaluation(9, 0.9, 0.25, 0.8, 0.4, 5))
    logging.getLogger("lastlayer.retrain").info("Save final result to : %s", "m.onnx")
    bar(Evaluation(19, 1.0, 0.1, 0.875, 0.3, 8))
    text = terminal_log.getvalue()
    assert "Step 9" not in text
    assert (
        "Training [############............] step 10/20, train accuracy 90.0%, validation 80.0% (N=5)" in text
    )
    # the log record is written over the status line, which is drawn again below it
    assert "\r\x1b[2KINFO:lastlayer.retrain:Save final result to : m.onnx\n\r\x1b[2KTraining [" in text
    assert text.endswith(
        "step 20/20, train accuracy 100.0%, validation 87.5% (N=8), cross entropy 0.100, in 0:00\n"
    )


def test_the_bottleneck_bar_redraws_on_a_terminal_and_logs_elsewhere(terminal_log, caplog):
    bar = progress.ProgressBar(terminal_log)
    for done in (1, 2, 3):
        bar(done, 3)
    assert "Bottlenecks [" in terminal_log.getvalue() and terminal_log.getvalue().endswith("\n")
    assert "3/3 images" in terminal_log.getvalue()
    piped = io.StringIO()
    with caplog.at_level(logging.INFO):
        progress.ProgressBar(piped, every=1e9)(3, 3)
    assert piped.getvalue() == "" and "Bottlenecks: 3/3 images" in caplog.text


def test_a_pipe_gets_a_plain_handler():
    assert type(progress.log_handler(io.StringIO())) is logging.StreamHandler


def _retrain_argv(tmp: Path, data: Path, model_dir: Path) -> list[str]:
    out = tmp / "out"
    return [
        sys.executable, "-m", "lastlayer", "retrain", f"--image_dir={data}", "--how_many_training_steps=30",
        f"--model_dir={model_dir}", f"--bottleneck_dir={tmp / 'b'}", f"--output_graph={out / 'm.onnx'}",
        f"--output_labels={out / 'l.txt'}", f"--summaries_dir={out / 's'}", "--random_seed=1",
    ]  # fmt: skip


def _run_on_a_terminal(argv: list[str]) -> tuple[int, str, str]:
    """Run ``argv`` with stderr on a pseudo-terminal; its exit code, stdout and what the terminal got."""
    leader, follower = pty.openpty()
    chunks: list[bytes] = []

    def read() -> None:
        while True:
            try:
                chunk = os.read(leader, 65536)
            except OSError:  # EIO: the other side is closed
                return
            if not chunk:
                return
            chunks.append(chunk)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    env = {**os.environ, "COLUMNS": "160"}
    try:
        done = subprocess.run(argv, stderr=follower, stdout=subprocess.PIPE, text=True, timeout=300, env=env)
    finally:
        os.close(follower)
    reader.join(30)
    os.close(leader)
    return done.returncode, done.stdout, b"".join(chunks).decode()


@pytest.mark.slow
def test_retrain_on_a_terminal_and_into_a_file(tmp_path, model_dir):
    data = make_dataset(tmp_path / "data", per_class=8)
    code, stdout, screen = _run_on_a_terminal(_retrain_argv(tmp_path / "tty", data, model_dir))
    assert code == 0, screen
    assert "Bottlenecks [########################] 24/24 images" in screen
    assert "Training [########################] step 30/30, train accuracy" in screen
    assert "Train accuracy =" not in screen and "Final test accuracy = " in screen
    report = tmp_path / "tty" / "out" / "m.report.html"
    assert screen.rstrip().splitlines()[-2:] == [
        f"Open the report: {report.as_uri()}",
        f"Serve the model: lastlayer serve --graph={tmp_path / 'tty' / 'out' / 'm.onnx'}",
    ]
    assert report.is_file() and f'"report": "{report}"' in stdout

    with open(tmp_path / "log.txt", "w") as log_file:
        argv = _retrain_argv(tmp_path / "file", data, model_dir)
        done = subprocess.run(argv, stderr=log_file, stdout=subprocess.PIPE, text=True, timeout=300)
    assert done.returncode == 0
    text = (tmp_path / "log.txt").read_text()
    assert "\x1b" not in text and "\r" not in text and "Open the report" not in text
    assert [int(s) for s in STEP_LINE.findall(text)] == [*range(0, 30, 10), 29]
    lines = text.splitlines()
    assert (
        lines[-1] == f"INFO:lastlayer.retrain:Save report to : {tmp_path / 'file' / 'out' / 'm.report.html'}"
    )
    assert lines[-2].startswith("INFO:lastlayer.retrain:Save final result to : ")
