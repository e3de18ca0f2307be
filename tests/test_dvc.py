"""dvc.yaml + params.yaml: stages validate, manifests go to an S3 remote and come back (moto on loopback), and
`dvc repro` on a fresh copy runs the whole tiny pipeline, after which `dvc status` has nothing to do."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from components.testing import fast_params, fresh_copy, run_watched, tool_env  # noqa: E402

STAGES = [
    "tiny_models",
    "demo_data",
    "ingest",
    "split",
    "pretrain",
    "finetune_single",
    "finetune_multi",
    "evaluate",
    "register",
]


def dvc(*args: str, cwd: Path, env: dict[str, str]) -> str:
    """``dvc ARGS`` in ``cwd``; its output (a hung run is stopped after 20 min with every process's stack)."""
    done = run_watched([sys.executable, "-m", "dvc", *args], log=cwd.parent / f"dvc-{args[0]}.log",
                       timeout_s=1200, cwd=cwd, env=env)
    if done.returncode != 0:
        raise AssertionError(f"dvc {' '.join(args)} failed ({done.returncode}):\n{done.stdout}\n{done.stderr}")
    return done.stdout


def test_stages_and_params_are_consistent() -> None:
    pipeline = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    assert list(pipeline) == STAGES
    for name, stage in pipeline.items():
        for key in stage.get("params", []):
            node = params
            for part in key.split("."):
                assert part in node, f"stage {name}: params key {key} not in params.yaml"
                node = node[part]
    # the manifests are DVC outputs (versioned), the ingest cache is not
    ingest_outs = [next(iter(o)) if isinstance(o, dict) else o for o in pipeline["ingest"]["outs"]]
    assert "data/ingested/manifest.parquet" in ingest_outs and not any(".cache" in o for o in ingest_outs)
    assert "data/ingested/.cache" in (ROOT / ".dvcignore").read_text()
    assert "data/split/train.parquet" in pipeline["split"]["outs"]


def test_evaluate_stage_and_component_score_both_sections_of_the_split() -> None:
    """DVC and KFP evaluate the same sets: the split folder (held-in and held-out), both files as inputs."""
    import inspect

    from components.evaluate.component import evaluate

    stage = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]["evaluate"]
    assert " --split data/split " in f" {stage['cmd']} "
    assert {"data/split/held_in.parquet", "data/split/held_out.parquet"} <= set(stage["deps"])
    assert inspect.signature(evaluate.python_func).parameters["split_name"].default == "all"
    assert 'evaluate_split: str = "all"' in (ROOT / "pipelines" / "full.py").read_text()


def test_the_demo_trains_with_two_torchrun_processes_as_the_readme_says() -> None:
    pipeline = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    for name in ("pretrain", "finetune_single", "finetune_multi"):
        assert pipeline[name]["cmd"].startswith("torchrun --standalone --nproc_per_node 2 -m easyref.cli train "), name
    assert "two `torchrun` processes each" in (ROOT / "README.md").read_text()


def test_plots_have_an_offline_image_and_their_html_is_not_committed() -> None:
    pipeline = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    for name in ("pretrain", "finetune_single", "finetune_multi"):
        plots = [next(iter(p)) if isinstance(p, dict) else p for p in pipeline[name]["plots"]]
        assert any(p.endswith("loss.png") for p in plots), name
    assert "/dvc_plots/" in (ROOT / ".gitignore").read_text().split()


def test_each_section_validates_with_its_command(tmp_path: Path) -> None:
    from easyref.config import from_dict, load_yaml
    from easyref.data.ingest import IngestConfig
    from easyref.data.split import SplitConfig
    from easyref.evaluate.config import EvaluateConfig
    from easyref.registry import RegisterConfig
    from easyref.train.config import STAGES as TRAIN_STAGES
    from easyref.train.config import load_train_config

    params = load_yaml(ROOT / "params.yaml")
    from_dict(IngestConfig, params["ingest"], "ingest")
    from_dict(SplitConfig, params["split"], "split")
    from_dict(EvaluateConfig, params["evaluate"], "evaluate")
    from_dict(RegisterConfig, params["register"], "register")
    steps = [load_train_config(ROOT / "params.yaml", stage).max_steps for stage in TRAIN_STAGES]
    assert all(s > 0 for s in steps)


@pytest.fixture()
def s3_endpoint():
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0)
    server.start()
    host, port = server.get_host_and_port()
    try:
        yield f"http://{host}:{port}"
    finally:
        server.stop()


def test_manifests_push_to_and_pull_from_an_s3_remote(
    tmp_path: Path, s3_endpoint: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    import boto3

    for key, value in {
        "AWS_ACCESS_KEY_ID": "test",
        "AWS_SECRET_ACCESS_KEY": "test",
        "AWS_DEFAULT_REGION": "us-east-1",
    }.items():
        monkeypatch.setenv(key, value)
    boto3.client("s3", endpoint_url=s3_endpoint).create_bucket(Bucket="easyref-dvc")
    env = tool_env(tmp_path)
    repo = fresh_copy(tmp_path / "repo")
    fast_params(repo / "params.yaml")
    dvc("repro", "split", cwd=repo, env=env)
    # `dvc metrics show` holds counts only: the records' provenance stays in their own files
    import json

    shown = json.loads(dvc("metrics", "show", "--json", cwd=repo, env=env))
    files = [f.get("data", {}) for data in shown.values() for f in data["data"].values()]  # evaluate: not run yet
    values = {k: v for f in files for k, v in f.items()}
    assert values["split.groups.train"] > 0 and values["ingest.accepted"] > 0
    assert all(isinstance(v, int | float) for v in values.values()), values
    assert len(values) <= 12 and not [k for k in values if "sha256" in k or "manifest" in k or "threshold" in k]
    assert "manifest_sha256" in json.loads((repo / "data" / "split" / "split.json").read_text())
    # the README's remote set-up: URL in the repo config, endpoint and credentials in config.local / the environment
    dvc("remote", "add", "-d", "storage", "s3://easyref-dvc/cache", cwd=repo, env=env)
    dvc("remote", "modify", "--local", "storage", "endpointurl", s3_endpoint, cwd=repo, env=env)
    dvc("push", "--with-deps", "split", cwd=repo, env=env)
    subprocess.run(["git", "add", "dvc.lock", "params.yaml", ".dvc/config"], cwd=repo, check=True)
    subprocess.run(
        ["git", "-c", "user.name=t", "-c", "user.email=t@example.invalid", "commit", "-qam", "lock"],
        cwd=repo,
        check=True,
    )
    objects = boto3.client("s3", endpoint_url=s3_endpoint).list_objects_v2(Bucket="easyref-dvc")
    assert objects["KeyCount"] > 0

    clone = tmp_path / "clone"
    subprocess.run(["git", "clone", "-q", str(repo), str(clone)], check=True)
    dvc("remote", "modify", "--local", "storage", "endpointurl", s3_endpoint, cwd=clone, env=env)
    dvc("pull", "--with-deps", "split", cwd=clone, env=env)
    for rel in ("data/ingested/manifest.parquet", "data/split/train.parquet", "data/split/held_out.parquet"):
        assert (clone / rel).read_bytes() == (repo / rel).read_bytes(), rel
    assert "up to date" in dvc("status", "--with-deps", "split", cwd=clone, env=env)


@pytest.mark.slow
def test_dvc_repro_on_a_fresh_copy_then_status_is_clean(tmp_path: Path) -> None:
    env = tool_env(tmp_path)
    repo = fresh_copy(tmp_path / "repo")
    fast_params(repo / "params.yaml")
    dvc("repro", cwd=repo, env=env)
    assert "up to date" in dvc("status", cwd=repo, env=env)
    assert (repo / "outputs" / "eval" / "report.html").is_file()
    assert "@champion -> v1" in (repo / "outputs" / "register.txt").read_text()
    loss = (repo / "outputs" / "runs" / "pretrain" / "loss.csv").read_text().splitlines()
    assert loss[0] == "step,loss" and len(loss) == 3
    assert (repo / "outputs" / "runs" / "pretrain" / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # a parameter change re-runs only the stages that depend on it
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["evaluate"]["seed"] = 1
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    status = dvc("status", cwd=repo, env=env)
    assert "evaluate:" in status and "pretrain:" not in status and "ingest:" not in status
