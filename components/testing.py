"""Test helpers shared by the component tests and tests/test_pipeline*.py: a tiny workspace built with the CLI."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]

# Small reference images keep the tiny MLLM fast (4-9 visual tokens per image), as in tests/conftest.py.
TINY_MODEL = {"num_tokens": 8, "min_pixels": 4 * 28 * 28, "max_pixels": 9 * 28 * 28, "dropped_image_size": 56}
TINY_TRAIN = {"batch_size": 1, "save_every": 0, "preview_every": -1, "preview_steps": 2, "model": TINY_MODEL}
TINY_EVALUATE = {"steps": 2, "max_samples": 2, "images_per_sample": 1, "batch_size": 2, "baselines": [],
                 "reference_gain": {"enabled": True, "timesteps": 1}}
TINY_SPLIT = {"held_out_groups": 4, "held_in_groups": 4}


def easyref(*args: str, cwd: Path | None = None) -> None:
    """Run an ``easyref`` command with this interpreter; raise with its output if it fails."""
    done = subprocess.run([sys.executable, "-m", "easyref.cli", *args], cwd=cwd, capture_output=True, text=True)
    if done.returncode != 0:
        raise AssertionError(f"easyref {' '.join(args)} failed ({done.returncode}):\n{done.stdout}\n{done.stderr}")


def component_env() -> dict[str, str]:
    """Environment in which kfp.local's subprocesses can import ``components`` (the image sets PYTHONPATH)."""
    paths = [str(REPO_ROOT), *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))]
    return {"PYTHONPATH": os.pathsep.join(dict.fromkeys(paths))}


def workspace_paths(root: Path) -> dict[str, Path]:
    """Where :func:`build_workspace` puts the tiny models, the demo data, its ingestion and its split."""
    return {"models": root / "models" / "tiny", "raw": root / "data" / "raw",
            "ingested": root / "data" / "ingested", "split": root / "data" / "split"}


def build_workspace(root: Path, groups: int = 12) -> dict[str, Path]:
    """Tiny models, demo data (``groups`` groups of 4-5 images), its ingestion and split, under ``root``."""
    paths = workspace_paths(root)
    from easyref.tiny_models import write_tiny_models

    write_tiny_models(paths["models"], seed=0)
    easyref("demo-data", "--out", str(paths["raw"]), "--min-images", "4", "--max-images", "5")
    _keep_groups(paths["raw"], groups)
    easyref("ingest", str(paths["raw"]), "--out", str(paths["ingested"]), "--workers", "1", "--no-progress")
    easyref("split", "--manifest", str(paths["ingested"] / "manifest.parquet"), "--out", str(paths["split"]),
            "--held-out-groups", "2", "--held-in-groups", "2")
    return paths


def built_once(tmp_path_factory: Any, name: str, build: Callable[[Path], object]) -> Path:
    """A folder ``name`` that ``build(folder)`` fills once per test run, shared by the pytest-xdist workers.

    A session-scoped fixture runs once per worker, and ``make test`` has two: inputs that take half a minute (a
    workspace, a trained checkpoint) were built twice. The workers of one run share the parent of their temp
    folders; the first worker to get here builds under a file lock, the others wait for it and reuse the folder.
    A failed build leaves no mark, so the next worker tries again (and fails the same way). Without xdist: the
    session's temp folder, once per session. Use it only for what the tests read and never change."""
    from filelock import FileLock

    root = tmp_path_factory.getbasetemp()
    root = root.parent if os.environ.get("PYTEST_XDIST_WORKER") else root
    folder = root / "built-once" / name
    done = folder.with_name(f"{name}.done")
    folder.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(folder.with_name(f"{name}.lock"))):
        if not done.is_file():
            shutil.rmtree(folder, ignore_errors=True)
            folder.mkdir()
            build(folder)
            done.touch()
    return folder


def _keep_groups(raw: Path, groups: int) -> None:
    """Trim the demo dataset to its first ``groups`` groups (fewer images = faster tests)."""
    import json

    folders = sorted(p for p in raw.iterdir() if p.is_dir())
    for folder in folders[groups:]:
        shutil.rmtree(folder)
    kept = {p.name for p in folders[:groups]}
    lines = (raw / "captions.jsonl").read_text().splitlines()
    (raw / "captions.jsonl").write_text(
        "".join(line + "\n" for line in lines if line and json.loads(line)["image"].split("/")[0] in kept))



def fresh_copy(dst: Path) -> Path:
    """The repository's files (tracked + untracked, not ignored) copied to ``dst`` as a new one-commit git repo."""
    listed = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=REPO_ROOT,
                            capture_output=True, text=True, check=True).stdout.split("\0")
    for rel in filter(None, listed):
        src = REPO_ROOT / rel
        if src.is_file():
            (dst / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dst / rel)
    git = ["git", "-c", "user.name=test", "-c", "user.email=test@example.invalid"]
    subprocess.run(["git", "init", "-q"], cwd=dst, check=True)
    subprocess.run([*git, "add", "-A"], cwd=dst, check=True)
    subprocess.run([*git, "commit", "-q", "-m", "copy"], cwd=dst, check=True)
    return dst


_TEMPLATES: dict[str, Path] = {}


def _mlflow_template() -> Path:
    """This process's empty, migrated MLflow store (built once, in a temp folder removed at exit)."""
    if "store" not in _TEMPLATES or not _TEMPLATES["store"].is_file():
        import atexit
        import tempfile

        from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

        folder = Path(tempfile.mkdtemp(prefix="easyref-mlflow-template-"))
        atexit.register(shutil.rmtree, folder, True)
        store = SqlAlchemyStore(f"sqlite:///{folder / 'mlflow.db'}", str(folder / "mlruns"))
        store.engine.dispose()
        _TEMPLATES["store"] = folder / "mlflow.db"
    return _TEMPLATES["store"]


def mlflow_store(db: Path, artifact_root: str | None = None) -> str:
    """``sqlite:///DB``: a new, empty MLflow store at ``db`` (kept if it already exists). Opening a new store runs
    MLflow's ~50 schema migrations, 5-10 s of CPU in whichever process opens it first; the tests open dozens, so the
    migrations run once per test process and each store is a copy. The copy is what MLflow would have created: the
    same schema, no runs, and the Default experiment's artifacts under ``artifact_root`` (default: ``mlruns`` beside
    the store, as for a process started in its folder; a server passes its ``--default-artifact-root``)."""
    import sqlite3
    from contextlib import closing

    db = Path(db)
    if not db.exists():
        db.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(_mlflow_template(), db)
        root = (artifact_root or str(db.parent.resolve() / "mlruns")).rstrip("/")
        with closing(sqlite3.connect(db)) as con, con:
            con.execute("UPDATE experiments SET artifact_location = ? WHERE experiment_id = 0", (f"{root}/0",))
    return f"sqlite:///{db}"


def tool_env(tmp: Path) -> dict[str, str]:
    """Environment for `dvc` / `easyref` subprocesses: this venv first on PATH, MLflow in ``tmp``, no telemetry."""
    env = dict(os.environ)
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    env["MLFLOW_TRACKING_URI"] = mlflow_store(tmp / "mlflow.db")
    env["DVC_NO_ANALYTICS"] = "1"
    return env


def fast_params(params_file: Path) -> None:
    """Shrink params.yaml for tests: 2 optimizer steps per stage, 2 test samples of one image, 2 DDIM steps, no
    baselines."""
    import yaml

    params = yaml.safe_load(params_file.read_text())
    params["data"].update({"demo_groups_min_images": 4, "demo_groups_max_images": 5})
    for stage in ("pretrain", "single_ref", "multi_ref"):
        params["train"][stage]["max_steps"] = 2
    params["train"].update({"preview_every": -1, "save_every": 0})
    params["evaluate"].update(TINY_EVALUATE)
    # A 2-step model cannot show a reference gain: keep the relative rules so that the first version is promoted
    # (the absolute reference-gain rule is tested in tests/test_registry_promotion.py).
    gate = params.get("register", {}).get("gate", [])
    params.setdefault("register", {})["gate"] = [r for r in gate if "min" not in r and "max" not in r]
    params_file.write_text(yaml.safe_dump(params, sort_keys=False))


def _children() -> dict[int, list[int]]:
    """Parent pid -> child pids, from /proc (Linux)."""
    tree: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue  # the process ended while we looked
        tree.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    return tree


def _leaves(root: int, tree: dict[int, list[int]]) -> list[int]:
    """The processes of ``root``'s tree (``root`` included) that have no children of their own."""
    leaves, level = [], [root]
    while level:
        leaves += [pid for pid in level if not tree.get(pid)]
        level = [child for pid in level for child in tree.get(pid, [])]
    return leaves


def dump_stacks_and_stop(proc: subprocess.Popen, grace_s: float = 20.0) -> None:
    """Stop a hung process tree so that it says where it hung: each Python process in it (started with
    ``PYTHONFAULTHANDLER=1``) prints every thread's stack on SIGABRT. The deepest processes go first, so their
    parents are still alive to pass the stacks on (kfp.local and torchrun relay their children's output); what is
    left after ``grace_s`` is killed."""
    deadline = time.monotonic() + grace_s
    while proc.poll() is None and time.monotonic() < deadline:
        for pid in _leaves(proc.pid, _children()):
            try:
                os.kill(pid, signal.SIGABRT)
            except ProcessLookupError:
                pass
        time.sleep(2.0)
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


def run_watched(cmd: list[str], *, log: Path, timeout_s: float, **popen: Any) -> subprocess.CompletedProcess:
    """Run ``cmd`` with its stdout in ``log`` and its stderr in ``log`` + ``.stderr``; returns what
    ``subprocess.run(..., capture_output=True, text=True)`` would. A run still going after ``timeout_s`` (keep it
    under the test's own limit) is stopped by :func:`dump_stacks_and_stop` and fails the test with the end of its
    output, where the stack of each process shows what it waited on."""
    env = {**popen.pop("env", os.environ), "PYTHONFAULTHANDLER": "1"}
    err = log.with_name(log.name + ".stderr")
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("w") as out, err.open("w") as out_err:
        proc = subprocess.Popen(cmd, stdout=out, stderr=out_err, env=env, start_new_session=True, **popen)
        try:
            proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            dump_stacks_and_stop(proc)
            raise AssertionError(
                f"{' '.join(map(str, cmd))} still ran after {timeout_s:.0f} s and was stopped; the end of its "
                f"output ({log}):\n{log.read_text()[-12000:]}\nand of its stderr, with the stack of each "
                f"process:\n{err.read_text()[-20000:]}"
            ) from None
    return subprocess.CompletedProcess(cmd, proc.returncode, log.read_text(), err.read_text())
