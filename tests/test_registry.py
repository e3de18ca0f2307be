"""easyref register: idempotent versions, @challenger / @champion by gate, pyfunc loading, failures, concurrency.

Runs against the embedded sqlite store and against a real ``mlflow server`` whose artifact store is S3 served by
moto, both on loopback.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from components.testing import mlflow_store
from easyref.errors import UserError
from easyref.registry import (
    CHALLENGER,
    CHAMPION,
    GateRule,
    RegisterConfig,
    decode_png,
    encode_png,
    evaluate_gate,
    register,
)
from easyref.registry.pyfunc import BadRequest
from tests.conftest import make_group
from tests.registry_helpers import GOOD, aliases, make_checkpoints, sqlite_uri, write_metrics


@pytest.fixture(scope="module")
def checkpoints(tiny_models, tmp_path_factory) -> list[Path]:
    return make_checkpoints(tiny_models, tmp_path_factory.mktemp("ckpts"))


def test_gate_rules_with_margins_and_directions():
    rules = [
        GateRule(metric="a", margin=0.01),
        GateRule(metric="b", margin=-0.02),
        GateRule(metric="loss", margin=0.0, higher_is_better=False),
    ]
    lines = evaluate_gate({"a": 0.52, "b": 0.49, "loss": 1.0}, {"a": 0.50, "b": 0.50, "loss": 1.1}, rules)
    assert [line.passed for line in lines] == [True, True, True]
    lines = evaluate_gate({"a": 0.505, "b": 0.47, "loss": 1.2}, {"a": 0.50, "b": 0.50, "loss": 1.1}, rules)
    assert [line.passed for line in lines] == [False, False, False]
    (missing,) = evaluate_gate({}, {"a": 1.0}, rules[:1])
    assert not missing.passed and "missing" in missing.describe()


def test_png_round_trip_and_bad_input():
    image = make_group(1, 1)[0]
    assert decode_png(encode_png(image)).tobytes() == image.tobytes()
    with pytest.raises(BadRequest, match="row 0: not a base64"):
        decode_png("not base64!", "row 0")


@pytest.fixture(scope="module")
def registry(checkpoints, tiny_models, tmp_path_factory):
    """An sqlite registry where ckpt0 was registered twice (then promoted) - shared by the read-only tests."""
    root = tmp_path_factory.mktemp("registry")
    uri = sqlite_uri(root)
    metrics = write_metrics(root / "m0/metrics.json", checkpoints[0])
    config = RegisterConfig(model_name="demo")
    first = register(checkpoints[0], metrics, config, base=tiny_models, tracking_uri=uri)
    second = register(checkpoints[0], metrics, config, base=tiny_models, tracking_uri=uri)
    return root, uri, first, second


def test_registering_twice_gives_one_version_with_challenger(registry):
    from mlflow import MlflowClient

    _, uri, first, second = registry
    assert first.created and not second.created and first.version == second.version == "1"
    versions = MlflowClient(uri).search_model_versions("name = 'demo'")
    assert len(versions) == 1
    tags = versions[0].tags
    assert tags["easyref.status"] == "ready" and len(tags["checkpoint_sha256"]) == 64
    assert float(tags["metric.easyref.clip_i"]) == GOOD["easyref.clip_i"] and "git_commit" in tags
    assert aliases(uri, "demo") == {CHALLENGER: "1"}


def test_a_version_carries_only_the_headline_metrics_as_tags(checkpoints, tiny_models, tmp_path):
    """An evaluation writes a few hundred numbers (sections, slices, baselines, confidence bounds): the version's
    ``metric.*`` tags keep EasyRef's primary scores and what the gate reads; its run keeps every metric."""
    from mlflow import MlflowClient

    sections = ("held_in/", "held_out/", "held_out/no_colour/", "")
    methods = ("easyref", "easyref_swapped", "text", "ip_adapter")
    many = {
        f"{section}{method}.{name}{bound}": 0.5
        for section in sections
        for method in methods
        for name in ("clip_i", "clip_t", "dino_i", "colour", "reference_gain")
        for bound in ("", ".ci_low", ".ci_high")
        if section or method != "easyref"
    }
    assert len(many) > 200
    headline = {"easyref.clip_i.ci_low": 0.7, "easyref.clip_i.ci_high": 0.9, "easyref.reference_gain.ci_low": 0.01}
    uri = sqlite_uri(tmp_path)
    metrics = write_metrics(tmp_path / "m/metrics.json", checkpoints[1], **many, **headline)
    config = RegisterConfig(model_name="headline")
    result = register(checkpoints[1], metrics, config, base=tiny_models, tracking_uri=uri, promote_=True)
    client = MlflowClient(uri)
    version = client.get_model_version("headline", result.version)
    tagged = {k.removeprefix("metric."): float(v) for k, v in version.tags.items() if k.startswith("metric.")}
    assert tagged == {**GOOD, **headline}
    assert result.promoted and aliases(uri, "headline")["champion"] == result.version  # the gate read the tags
    assert set(client.get_run(version.run_id).data.metrics) == set(many) | set(GOOD) | set(headline)


def test_pyfunc_model_loads_by_alias_and_generates(registry):
    import mlflow

    from easyref.registry import input_example

    _, uri, _, _ = registry
    mlflow.set_tracking_uri(uri)
    model = mlflow.pyfunc.load_model("models:/demo@challenger")
    frame, _ = input_example(None)
    out = model.predict(frame, params={"num_inference_steps": 2, "seed": 1, "height": 64, "width": 64})
    assert list(out.columns) == ["image"] and len(out) == 1
    assert decode_png(out["image"][0]).size == (64, 64)
    schema = model.metadata.get_input_schema()
    assert schema.input_names() == ["prompt", "references"]


def test_promotion_gate_moves_champion_only_when_it_passes(checkpoints, tiny_models, tmp_path):
    from mlflow import MlflowClient

    uri = sqlite_uri(tmp_path)
    config = RegisterConfig(
        model_name="gated",
        gate=[GateRule(metric="easyref.clip_i", margin=0.01), GateRule(metric="easyref.dino_i", margin=-0.05)],
    )
    first = register(
        checkpoints[0],
        write_metrics(tmp_path / "a/metrics.json", checkpoints[0]),
        config,
        base=tiny_models,
        promote_=True,
        tracking_uri=uri,
    )
    assert first.promoted and first.decision == "promoted: no champion yet"
    worse = register(
        checkpoints[1],
        write_metrics(tmp_path / "b/metrics.json", checkpoints[1], **{"easyref.clip_i": 0.805}),
        config,
        base=tiny_models,
        promote_=True,
        tracking_uri=uri,
    )
    assert worse.promoted is False and worse.decision == "rejected vs champion v1"
    assert aliases(uri, "gated") == {CHALLENGER: "2", CHAMPION: "1"}
    tags = MlflowClient(uri).get_model_version("gated", "2").tags
    assert tags["gate.decision"] == "rejected vs champion v1" and tags["gate.champion_version"] == "1"
    assert "0.8050 vs champion 0.8000" in tags["gate.easyref.clip_i"] and tags["gate.easyref.clip_i"].endswith("FAIL")
    better = register(
        checkpoints[2],
        write_metrics(tmp_path / "c/metrics.json", checkpoints[2], **{"easyref.clip_i": 0.85, "easyref.dino_i": 0.58}),
        config,
        base=tiny_models,
        promote_=True,
        tracking_uri=uri,
    )
    assert better.promoted and aliases(uri, "gated") == {CHALLENGER: "3", CHAMPION: "3"}
    assert MlflowClient(uri).get_model_version("gated", "3").tags["gate.easyref.dino_i"].endswith("pass")


def test_gate_fails_when_champion_was_evaluated_on_another_split(checkpoints, tiny_models, tmp_path):
    uri = sqlite_uri(tmp_path)
    config = RegisterConfig(model_name="splits")
    for i, split in enumerate(("a" * 64, "b" * 64)):
        metrics = write_metrics(
            tmp_path / f"{i}/metrics.json", checkpoints[i], {"split_sha256": split}, **{"easyref.clip_i": 0.8 + i}
        )
        result = register(checkpoints[i], metrics, config, base=tiny_models, promote_=True, tracking_uri=uri)
    assert result.promoted is False and any(line.metric == "same_split" and not line.passed for line in result.lines)


def test_bad_metrics_file_is_a_user_error(checkpoints, tiny_models, tmp_path):
    (tmp_path / "nested.json").write_text(json.dumps({"easyref": {"clip_i": 0.8}}))
    with pytest.raises(UserError, match="nested.json: key 'easyref' is nested"):
        register(
            checkpoints[0],
            tmp_path / "nested.json",
            RegisterConfig(),
            base=tiny_models,
            tracking_uri=sqlite_uri(tmp_path),
        )
    with pytest.raises(UserError, match="no such metrics file"):
        register(
            checkpoints[0],
            tmp_path / "none.json",
            RegisterConfig(),
            base=tiny_models,
            tracking_uri=sqlite_uri(tmp_path),
        )


def _register_cli(
    checkpoint: Path, metrics: Path, name: str, uri: str, base: Path, env: dict[str, str], promote: bool = True
) -> subprocess.Popen:
    args = [
        sys.executable,
        "-m",
        "easyref.cli",
        "register",
        "--checkpoint",
        str(checkpoint),
        "--metrics",
        str(metrics),
        "--model-name",
        name,
        "--base",
        str(base),
        "--tracking-uri",
        uri,
    ]
    return subprocess.Popen(
        args + (["--promote"] if promote else []), env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )


def test_concurrent_registrations_keep_aliases_consistent(checkpoints, tiny_models, tmp_path):
    """Three processes at once: the same checkpoint twice and another one, all promoting."""
    from mlflow import MlflowClient

    uri = sqlite_uri(tmp_path)
    MlflowClient(uri).search_experiments()  # create the schema once, before the racers
    metrics = [
        write_metrics(tmp_path / "a/metrics.json", checkpoints[0]),
        write_metrics(tmp_path / "b/metrics.json", checkpoints[1], **{"easyref.clip_i": 0.9}),
    ]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src")}
    procs = [_register_cli(checkpoints[i], metrics[i], "race", uri, tiny_models, env) for i in (0, 0, 1)]
    outputs = [p.communicate(timeout=300)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), outputs
    client = MlflowClient(uri)
    versions = client.search_model_versions("name = 'race'")
    assert len(versions) == 2 and all(v.tags["easyref.status"] == "ready" for v in versions)
    by_sha = {v.tags["checkpoint_sha256"]: v for v in versions}
    assert len(by_sha) == 2
    final = aliases(uri, "race")
    assert final[CHALLENGER] in {str(v.version) for v in versions}
    champion = client.get_model_version("race", final[CHAMPION])
    assert champion.tags["easyref.status"] == "ready" and "gate.decision" in champion.tags
    for v in versions:  # every version got a recorded decision
        assert "gate.decision" in client.get_model_version("race", v.version).tags


# -- a real tracking server with S3 artifacts ---------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_http(url: str, proc: subprocess.Popen, timeout: float = 90) -> None:
    import requests

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args[0]} exited with {proc.returncode}: {proc.stdout.read()}")
        try:
            if requests.get(url, timeout=2).status_code < 500:
                return
        except requests.RequestException:
            pass
        time.sleep(0.5)
    raise TimeoutError(url)


@pytest.fixture()
def s3_server(tmp_path, monkeypatch):
    """A tracking server (sqlite backend) whose artifacts the clients write to S3 (moto) directly."""
    import boto3
    from moto.server import ThreadedMotoServer

    for key, value in {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_MAX_ATTEMPTS": "1",
        "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0",
        "MLFLOW_HTTP_REQUEST_TIMEOUT": "20",
    }.items():
        monkeypatch.setenv(key, value)
    moto = ThreadedMotoServer(ip_address="127.0.0.1", port=0)
    moto.start()
    host, port = moto.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    monkeypatch.setenv("MLFLOW_S3_ENDPOINT_URL", endpoint)
    boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket="mlflow")
    mlflow_port = _free_port()
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "mlflow",
            "server",
            "--host",
            "127.0.0.1",
            "--port",
            str(mlflow_port),
            "--backend-store-uri",
            mlflow_store(tmp_path / "server.db", artifact_root="s3://mlflow/art"),
            "--default-artifact-root",
            "s3://mlflow/art",
            "--no-serve-artifacts",
            "--workers",
            "1",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=dict(os.environ),
    )
    uri = f"http://127.0.0.1:{mlflow_port}"
    try:
        _wait_http(f"{uri}/health", server)
        yield uri, endpoint
    finally:
        server.terminate()
        server.wait(timeout=30)
        moto.stop()


def test_register_against_mlflow_server_with_s3_artifacts(s3_server, checkpoints, tiny_models, tmp_path, monkeypatch):
    import boto3
    import mlflow

    uri, endpoint = s3_server
    config = RegisterConfig(model_name="remote")
    first = register(
        checkpoints[0],
        write_metrics(tmp_path / "a/metrics.json", checkpoints[0]),
        config,
        base=tiny_models,
        promote_=True,
        tracking_uri=uri,
    )
    assert first.created and first.promoted and aliases(uri, "remote") == {CHALLENGER: "1", CHAMPION: "1"}
    keys = [o["Key"] for o in boto3.client("s3", endpoint_url=endpoint).list_objects_v2(Bucket="mlflow")["Contents"]]
    assert any(k.endswith("/easyref.safetensors") for k in keys), "\n".join(keys)
    mlflow.set_tracking_uri(uri)
    from easyref.registry import input_example

    out = mlflow.pyfunc.load_model("models:/remote@champion").predict(
        input_example(None)[0], params={"num_inference_steps": 1}
    )
    assert decode_png(out["image"][0]).size[0] > 0

    # S3 goes away half-way: logging the model fails, nothing is registered, aliases stay where they were.
    monkeypatch.setenv("MLFLOW_S3_ENDPOINT_URL", f"http://127.0.0.1:{_free_port()}")
    with pytest.raises(UserError, match=r"no alias was changed; re-run `easyref register --checkpoint"):
        register(
            checkpoints[1],
            write_metrics(tmp_path / "b/metrics.json", checkpoints[1], **{"easyref.clip_i": 0.9}),
            config,
            base=tiny_models,
            promote_=True,
            tracking_uri=uri,
        )
    from mlflow import MlflowClient

    assert len(MlflowClient(uri).search_model_versions("name = 'remote'")) == 1
    assert aliases(uri, "remote") == {CHALLENGER: "1", CHAMPION: "1"}


def test_unreachable_tracking_server_changes_nothing_and_says_what_to_rerun(
    checkpoints, tiny_models, tmp_path, monkeypatch
):
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")
    with pytest.raises(UserError, match="nothing was changed; re-run `easyref register"):
        register(
            checkpoints[0],
            write_metrics(tmp_path / "metrics.json", checkpoints[0]),
            RegisterConfig(),
            base=tiny_models,
            tracking_uri=f"http://127.0.0.1:{_free_port()}",
        )


@pytest.mark.slow
def test_mlflow_models_serve_answers_on_loopback(registry, tmp_path):
    import requests

    from easyref.registry import input_example

    _, uri, _, _ = registry
    port = _free_port()
    # mlflow execs uvicorn by name: put this interpreter's scripts folder first on PATH.
    env = {
        **os.environ,
        "MLFLOW_TRACKING_URI": uri,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
    }
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "mlflow",
            "models",
            "serve",
            "-m",
            "models:/demo@challenger",
            "--env-manager",
            "local",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
    )
    try:
        _wait_http(f"http://127.0.0.1:{port}/ping", server, timeout=180)
        frame, _ = input_example(None)
        body = {"dataframe_records": frame.to_dict(orient="records"), "params": {"num_inference_steps": 1}}
        reply = requests.post(f"http://127.0.0.1:{port}/invocations", json=body, timeout=120)
        assert reply.status_code == 200, reply.text
        (prediction,) = reply.json()["predictions"]
        assert decode_png(prediction["image"]).size[0] > 0
        body["params"]["num_inference_steps"] = -1
        reply = requests.post(f"http://127.0.0.1:{port}/invocations", json=body, timeout=120)
        assert reply.status_code == 400 and "num_inference_steps = -1" in reply.json()["message"], reply.text[:500]
    finally:
        server.terminate()
        server.wait(timeout=30)
