"""Faults: a run killed with SIGKILL resumes from what it flushed; processes sharing one bottleneck
cache at the same time, compaction by both included, lose nothing and corrupt nothing."""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from helpers import make_dataset
from lastlayer.bottlenecks.parts import Row
from lastlayer.bottlenecks.store import COMPACT_ABOVE, FeatureStore
from lastlayer.cli import main

DIM = 4
RUN_TIMEOUT_S = 300


def _writer(folder: str, who: int, rounds: int) -> None:
    """Add rows in small part files and compact, ``rounds`` times (in its own process)."""
    for r in range(rounds):
        store = FeatureStore(folder, DIM, flush_rows=3)
        rows = [f"{who:02d}{r:04d}{k:02d}".ljust(64, "0") for k in range(12)]
        store.add(Row(c, 0, f"p/{c}", None, np.full(DIM, who, np.float32), None) for c in rows)
        store.compact()


def test_processes_writing_and_compacting_one_folder_lose_no_row(tmp_path):
    folder = str(tmp_path / "cache")
    context = multiprocessing.get_context("spawn")
    writers = [context.Process(target=_writer, args=(folder, who, 6)) for who in range(3)]
    for w in writers:
        w.start()
    for w in writers:
        w.join(RUN_TIMEOUT_S)
        assert w.exitcode == 0
    store = FeatureStore(folder, DIM)
    assert store.damaged == 0 and len(store) == 3 * 6 * 12
    assert not [p for p in Path(folder).iterdir() if not p.name.startswith("part-")]  # no temp files


def retrain_argv(tmp: Path, data: Path, model_dir: Path, out: str) -> list[str]:
    return [
        "retrain",
        f"--image_dir={data}",
        "--how_many_training_steps=10",
        f"--model_dir={model_dir}",
        f"--bottleneck_dir={tmp / 'bottlenecks'}",
        f"--output_graph={tmp / out / 'g.onnx'}",
        f"--output_labels={tmp / out / 'l.txt'}",
        f"--summaries_dir={tmp / out / 's'}",
        "--random_seed=1",
    ]


def split_into_parts(folder: Path, count: int) -> None:
    """Rewrite the one part file of ``folder`` as ``count`` content-addressed part files."""
    (part,) = folder.glob("part-*.parquet")
    table = pq.read_table(part)
    part.unlink()
    step = -(-table.num_rows // count)
    for start in range(0, table.num_rows, step):
        sink = pa.BufferOutputStream()
        pq.write_table(table.slice(start, step), sink, compression="none")
        data = sink.getvalue().to_pybytes()
        (folder / f"part-{hashlib.sha256(data).hexdigest()}.parquet").write_bytes(data)


def test_two_retrain_runs_sharing_a_cache_at_once_both_compact_and_lose_nothing(tmp_path, model_dir):
    data = make_dataset(tmp_path / "data", per_class=10)
    assert main(retrain_argv(tmp_path, data, model_dir, "first")) == 0
    (cache,) = (tmp_path / "bottlenecks").iterdir()
    split_into_parts(cache, COMPACT_ABOVE + 1)  # each of the next runs compacts
    make_dataset(tmp_path / "more", per_class=12, seed=5)
    for folder in (tmp_path / "more").iterdir():
        for image in folder.iterdir():
            image.rename(data / folder.name / f"more_{image.name}")
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "lastlayer", *retrain_argv(tmp_path, data, model_dir, f"run{k}")],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        for k in range(2)
    ]
    for proc in procs:
        _, err = proc.communicate(timeout=RUN_TIMEOUT_S)
        assert proc.returncode == 0, err.decode()[-2000:]
        assert b"damaged" not in err
    assert main(retrain_argv(tmp_path, data, model_dir, "last")) == 0
    summary = json.loads((tmp_path / "last" / "g.summary.json").read_text())
    assert summary["cache"] == {"computed": 0, "reused": 66, "damaged_files": 0}


KILLABLE = """
import sys
import lastlayer.bottlenecks.store
lastlayer.bottlenecks.store.FLUSH_ROWS = 8
from lastlayer.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_a_run_killed_during_extraction_keeps_what_it_flushed(tmp_path, model_dir):
    data = make_dataset(tmp_path / "data", per_class=100)
    argv = retrain_argv(tmp_path, data, model_dir, "killed")
    proc = subprocess.Popen([sys.executable, "-c", KILLABLE, *argv], stderr=subprocess.DEVNULL)
    parts = tmp_path / "bottlenecks"
    deadline = time.monotonic() + RUN_TIMEOUT_S
    while not list(parts.rglob("part-*.parquet")) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    if proc.returncode != -signal.SIGKILL:
        pytest.skip("the run finished before it could be killed (machine too fast for this test)")
    flushed = sum(pq.read_metadata(p).num_rows for p in parts.rglob("part-*.parquet"))
    assert 0 < flushed < 300
    assert not list((tmp_path / "killed").glob("*.onnx"))  # nothing half-written
    assert main(retrain_argv(tmp_path, data, model_dir, "again")) == 0
    summary = json.loads((tmp_path / "again" / "g.summary.json").read_text())
    assert summary["cache"]["reused"] == flushed and summary["cache"]["computed"] == 300 - flushed
