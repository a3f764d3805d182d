"""Spark on YARN against the local engine, side by side in one run, on the same images in a Kerberized HDFS.

    python benchmarks/bench_yarn.py [--images DIR] [--copies 1] [--rounds 1] [--executors 2]

Starts the secure HDFS and YARN of harness/ (a temporary folder, stopped at the end), builds and
uploads the executors' archives (scripts/yarn_archives.py, timed), uploads the images as `hdfs`, then
each round runs, each in a fresh process logged in as `tensorflow` from its keytab, on an empty cache
in HDFS: the local engine (HDFS photos to the HDFS cache), the Spark engine on YARN (client mode,
``--executors`` executors of 1 core) with the application's start-up included (submission, the
application master's and the executors' containers, localization, Python workers, the model
broadcast), then, in the same application, a second extraction on another empty cache (the steady
state), then the local engine again (the reference is the mean of its two runs). Prints images/s and

    YARN images/s, steady state / local images/s
    YARN images/s (start-up included) / local images/s

On this machine YARN's containers share the cores of the local engine's process (2 cores here), so
the ratios say what the cluster machinery costs, not what more machines would gain.

    python benchmarks/bench_yarn.py --job [--rounds 3]

measures the job service instead: seconds from ``lastlayer job deploy`` to its first task running,
with ``--scheduler=yarn`` (the tasks' packed Python built and uploaded once, outside the timings; the
deploy's login, archive, skein's driver, the submission, the application master's and the task's
containers and their localization inside) and with the local scheduler, side by side in each round,
on a job of one worker whose module returns at once (its options: :func:`job_options`).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import ModuleType

from bench import machine, missing_images, repeated_copy

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_IMAGES = ROOT.parent / "shared" / "datasets" / "flower_photos_sample"
INPUT = "/tensorflow_input_data/bench_yarn"
CHILD_TIMEOUT_S = 1800
SPARK_DEFAULTS = """\
spark.yarn.archive hdfs:///apps/spark/spark-jars.zip
spark.archives hdfs:///apps/lastlayer/lastlayer-env.tar.gz#env
spark.executor.instances {executors}
spark.executor.cores 1
spark.executor.memory 512m
spark.executor.memoryOverhead 700m
spark.yarn.am.memory 384m
spark.driver.host 127.0.0.1
spark.driver.bindAddress 127.0.0.1
spark.ui.enabled false
"""


def harness() -> ModuleType:
    spec = importlib.util.spec_from_file_location("securehdfs", ROOT / "harness" / "securehdfs.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["securehdfs"] = module
    spec.loader.exec_module(module)
    return module


def child(engine: str, state: str, model_dir: str, work: str) -> dict:
    """One measurement in this (fresh) process, logged in as tensorflow: its timings."""
    from lastlayer.bottlenecks.needs import compute_bottlenecks
    from lastlayer.dataset import scan
    from lastlayer.engines.local import LocalEngine
    from lastlayer.hadoop import ClusterConfig, HadoopLogin
    from lastlayer.zoo import DEFAULT_ARCHITECTURE, load_feature_model

    root = Path(state)
    config = ClusterConfig(
        principal="tensorflow@LOCAL",
        keytab=str(root / "keytabs" / "tensorflow.keytab"),
        krb5_conf=str(root / "krb5.conf"),
        hadoop_conf_dir=str(root / "conf"),
    )
    model = load_feature_model(DEFAULT_ARCHITECTURE, model_dir)
    with HadoopLogin(config) as hadoop:
        options = hadoop.storage_options()
        if engine == "local":
            images = scan(f"hdfs://{INPUT}", 10, 10, options)
            tick = time.perf_counter()
            local = LocalEngine(storage_options=options)
            done = compute_bottlenecks(images, model, f"hdfs://{work}/local", local, storage_options=options)
            return {
                "images": len(images.files),
                "computed": done.computed,
                "extract_s": time.perf_counter() - tick,
            }
        from lastlayer.engines import spark

        tick = time.perf_counter()
        # The session first: pyspark forks its JVM launcher, which must not inherit the HDFS client's threads.
        with spark.SparkEngine("yarn", storage_options=options, cluster=hadoop.spark_conf()) as remote:
            remote.spark().sparkContext.setLogLevel("ERROR")
            out: dict = {"start_s": time.perf_counter() - tick}
            images = scan(f"hdfs://{INPUT}", 10, 10, options)
            for name in ("first", "steady"):
                tick = time.perf_counter()
                done = compute_bottlenecks(
                    images, model, f"hdfs://{work}/{name}", remote, storage_options=options
                )
                out[f"{name}_s"], out["computed"] = time.perf_counter() - tick, done.computed
            out["cores"] = remote.spark().sparkContext.defaultParallelism
    return out


def run_child(engine: str, args: argparse.Namespace, env: dict[str, str], work: str) -> dict:
    argv = [sys.executable, __file__, "--child", engine, "--state", str(args.state)]
    argv += ["--model-dir", str(args.model_dir), "--work", work]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=CHILD_TIMEOUT_S, env=env, check=False)
    if done.returncode != 0:
        raise SystemExit(f"{engine} run failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def as_hdfs(cluster, code: str) -> None:
    """Python ``code`` with an hdfs-native ``fs`` as the superuser, in a fresh process."""
    env = {**os.environ, **cluster.env("hdfs")}
    prologue = "import fsspec\nfs = fsspec.filesystem('hdfs')\n"
    subprocess.run([sys.executable, "-c", prologue + code], env=env, check=True, timeout=600)


def prepare(cluster, args: argparse.Namespace, work: Path) -> float:
    """Archives built and uploaded, /user/tensorflow and /tensorflow made, the images uploaded; the
    seconds the archives took (built + uploaded)."""
    tick = time.perf_counter()
    archives = work / "archives"
    subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "yarn_archives.py"), str(archives)], check=True, timeout=900
    )
    as_hdfs(
        cluster,
        "for d in ('/apps/spark', '/apps/lastlayer', '/user/tensorflow', '/tensorflow'):\n"
        "    fs.makedirs(d, exist_ok=True)\n"
        "for d in ('/user/tensorflow', '/tensorflow'):\n"
        "    fs.client.set_owner(d, 'tensorflow', 'tensorflow')\n"
        f"fs.put('{archives}/spark-jars.zip', '/apps/spark/spark-jars.zip')\n"
        f"fs.put('{archives}/lastlayer-env.tar.gz', '/apps/lastlayer/lastlayer-env.tar.gz')\n"
        "for f in ('/apps/spark/spark-jars.zip', '/apps/lastlayer/lastlayer-env.tar.gz'):\n"
        "    fs.client.set_permission(f, 0o644)\n",
    )
    seconds = time.perf_counter() - tick
    principal = [f"--principal={cluster.principal('hdfs')}", f"--keytab={cluster.keytab('hdfs')}"]
    principal += [f"--krb5_conf={cluster.krb5_conf}", f"--hadoop_conf_dir={cluster.conf_dir}"]
    subprocess.run(
        [sys.executable, "-m", "lastlayer", "upload", str(args.images), f"hdfs://{INPUT}", *principal],
        check=True, timeout=1800, capture_output=True,
    )  # fmt: skip
    return seconds


JOB_MODULE = "def main(server, log_dir, context):\n    print('running', server.task_name)\n"


def job_options(cluster, work: Path) -> Path:
    """An options file of one worker running :data:`JOB_MODULE`, logged in as tensorflow; its secret
    store in ``work/secrets``."""
    import zipfile

    from lastlayer.jobs import secret_store

    with zipfile.ZipFile(work / "job.zip", "w") as archive:
        archive.writestr("bench/quick.py", JOB_MODULE)
    keytab = cluster.keytab("tensorflow").read_bytes()
    secret_store.write_secret("tensorflow_keytab", keytab, str(work / "secrets"))
    kerberos = {"enabled": True, "kdc": {"hostname": "127.0.0.1", "port": cluster.kdc_port}}
    kerberos |= {"primary": "tensorflow", "realm": "LOCAL", "keytab_secret": "tensorflow_keytab"}
    spec = {
        "service": {
            "name": "bench",
            "job_url": str(work / "job.zip"),
            "job_path": "bench",
            "job_name": "quick",
            "security": {"kerberos": kerberos},
        },
        "worker": {"count": 1, "cpus": 1, "mem": 512},
    }
    path = work / "bench.json"
    path.write_text(json.dumps(spec))
    return path


def first_running(argv: list[str], env: dict[str, str]) -> float:
    """Seconds from starting ``argv`` (a ``job deploy``, which prints its plan as it changes) to the
    first plan showing a task RUNNING; the deploy is then waited for (it must succeed)."""
    tick = time.perf_counter()
    with subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) as proc:
        assert proc.stderr is not None
        seconds = None
        for line in proc.stderr:
            if seconds is None and ":[node] (RUNNING)" in line:
                seconds = time.perf_counter() - tick
        proc.wait(timeout=CHILD_TIMEOUT_S)
    if proc.returncode != 0 or seconds is None:
        raise SystemExit(f"{' '.join(argv)} failed (exit {proc.returncode}) or no task ran")
    return seconds


def measure_job(cluster, work: Path, rounds: int) -> None:
    """The job service's deploy to first running task, YARN and local side by side, ``rounds`` times."""
    tick = time.perf_counter()
    subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "yarn_archives.py"), str(work), "--job"],
        check=True,
        timeout=900,
    )
    as_hdfs(
        cluster,
        "for d in ('/apps/lastlayer', '/user/tensorflow'):\n"
        "    fs.makedirs(d, exist_ok=True)\n"
        "fs.client.set_owner('/user/tensorflow', 'tensorflow', 'tensorflow')\n"
        f"fs.put('{work}/lastlayer-job-env.tar.gz', '/apps/lastlayer/lastlayer-job-env.tar.gz')\n"
        "fs.client.set_permission('/apps/lastlayer/lastlayer-job-env.tar.gz', 0o644)\n",
    )
    print(f"job env built and uploaded in {time.perf_counter() - tick:.1f} s", flush=True)
    options = job_options(cluster, work)
    env = {**os.environ, "PATH": f"{cluster.bin_dir}:{os.environ['PATH']}"}
    deploy = [
        sys.executable,
        "-m",
        "lastlayer",
        "job",
        "deploy",
        str(options),
        f"--secrets_dir={work / 'secrets'}",
    ]
    yarn_env = "--yarn_env=hdfs:///apps/lastlayer/lastlayer-job-env.tar.gz"
    ratios = []
    for r in range(rounds):
        on_yarn = first_running([*deploy, f"--state_dir={work / f'y{r}'}", "--scheduler=yarn", yarn_env], env)
        local = first_running([*deploy, f"--state_dir={work / f'l{r}'}"], env)
        ratios.append(on_yarn / local)
        print(
            f"round {r + 1}: job deploy to first task running: YARN {on_yarn:.1f} s, local {local:.1f} s",
            flush=True,
        )
    print(
        f"job deploy to first task running, YARN / local: {', '.join(f'{x:.1f}' for x in ratios)} (per round)"
    )


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--images", type=Path, default=DEFAULT_IMAGES)
    parser.add_argument("--copies", type=int, default=1, help="distinct copies of --images (1: as they are)")
    parser.add_argument(
        "--model-dir", type=Path, default=Path(tempfile.gettempdir()) / "lastlayer-bench-models"
    )
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--executors", type=int, default=2)
    parser.add_argument("--job", action="store_true", help="the job service: deploy to first task running")
    parser.add_argument("--child", choices=("local", "yarn"), help=argparse.SUPPRESS)
    parser.add_argument("--state", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--work", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, str(args.state), str(args.model_dir), args.work)))
        return 0
    if args.job:
        with tempfile.TemporaryDirectory() as tmp, harness().running(Path(tmp) / "state") as cluster:
            cluster.start_yarn()
            measure_job(cluster, Path(tmp), args.rounds)
        return 0
    if missing_images(args.images):
        return 2
    from lastlayer.zoo import DEFAULT_ARCHITECTURE, load_feature_model

    load_feature_model(DEFAULT_ARCHITECTURE, str(args.model_dir))  # built once, outside the timings
    print(
        f"{machine()}; images: {args.images} x {args.copies}; YARN: 2 NodeManagers, "
        f"{args.executors} executors of 1 core"
    )
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        if args.copies > 1:
            args.images = repeated_copy(args.images, work / "copies", args.copies)
        securehdfs = harness()
        tick = time.perf_counter()
        with securehdfs.running(work / "state") as cluster:
            cluster.start_yarn()
            print(f"secure HDFS + YARN up in {time.perf_counter() - tick:.1f} s", flush=True)
            print(f"archives built and uploaded in {prepare(cluster, args, work):.1f} s", flush=True)
            args.state = cluster.root
            conf = work / "spark-conf"
            conf.mkdir()
            (conf / "spark-defaults.conf").write_text(SPARK_DEFAULTS.format(executors=args.executors))
            env = {
                **os.environ,
                "HADOOP_CONF_DIR": str(cluster.conf_dir),
                "KRB5_CONFIG": str(cluster.krb5_conf),
                "SPARK_CONF_DIR": str(conf),
                "PYSPARK_PYTHON": "./env/bin/python",
                "SPARK_LOCAL_IP": "127.0.0.1",
            }
            rounds = [measure(args, env, r) for r in range(args.rounds)]
    summarize(rounds)
    return 0


def measure(args: argparse.Namespace, env: dict[str, str], r: int) -> dict[str, float]:
    """One round: the local engine before and after the YARN application's start-up, first and steady
    extractions."""
    before = run_child("local", args, env, f"/tensorflow/bench/{r}/before")
    remote = run_child("yarn", args, env, f"/tensorflow/bench/{r}")
    after = run_child("local", args, env, f"/tensorflow/bench/{r}/after")
    n = before["computed"]
    assert remote["computed"] == n == after["computed"], (before, remote, after)
    times = {"before": before["extract_s"], "after": after["extract_s"], "start": remote["start_s"]}
    times |= {"first": remote["first_s"], "steady": remote["steady_s"], "images": n}
    print(
        f"round {r + 1}: {n} images; local engine {times['before']:.1f} s before, "
        f"{times['after']:.1f} s after = {2 * n / (times['before'] + times['after']):.1f} img/s; "
        "YARN application start-up "
        f"{times['start']:.1f} s + first extraction {times['first']:.1f} s = "
        f"{n / (times['start'] + times['first']):.1f} img/s; steady (same application, new cache) "
        f"{times['steady']:.1f} s = {n / times['steady']:.1f} img/s ({remote['cores']} executor cores)",
        flush=True,
    )
    return times


def summarize(rounds: list[dict[str, float]]) -> None:
    local = [(r["before"] + r["after"]) / 2 for r in rounds]
    steady = [a / r["steady"] for a, r in zip(local, rounds, strict=True)]
    first = [a / (r["start"] + r["first"]) for a, r in zip(local, rounds, strict=True)]
    print(f"YARN steady state / local: {', '.join(f'{x:.3f}' for x in steady)} (per round)")
    print(f"YARN (start-up included) / local: {', '.join(f'{x:.3f}' for x in first)} (per round)")


if __name__ == "__main__":
    sys.exit(main())
