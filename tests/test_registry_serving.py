"""The registered model travels and its endpoint refuses bad requests with 400.

A version is registered from copies of the base models and the checkpoint, which are then deleted: the model must
load from the registry alone, in a fresh interpreter that cannot import the repository's ``easyref``. Bad requests
go through MLflow's real scoring app (``mlflow.pyfunc.scoring_server``, served by uvicorn on loopback).
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from easyref.registry import RegisterConfig, input_example, register
from tests.registry_helpers import make_checkpoints, sqlite_uri, write_metrics

LOAD_ELSEWHERE = """
import sys
from pathlib import Path

# forget every easyref on the path (the repository's src/, an editable install): only the model's copy may load
sys.path[:] = [p for p in sys.path if not (Path(p or ".") / "easyref").is_dir()]
import base64, io
import mlflow, pandas as pd
from PIL import Image

local = mlflow.artifacts.download_artifacts("models:/travel@challenger", dst_path=sys.argv[1])
model = mlflow.pyfunc.load_model(local)
buf = io.BytesIO()
Image.new("RGB", (64, 64), (200, 30, 30)).save(buf, format="PNG")
frame = pd.DataFrame({"prompt": ["a red square"], "references": [[base64.b64encode(buf.getvalue()).decode()]]})
out = model.predict(frame, params={"num_inference_steps": 1})
import easyref
print("EASYREF", easyref.__file__)
print("IMAGES", len(out["image"]))
"""


@pytest.fixture(scope="module")
def travelled(tiny_models, tmp_path_factory):
    """``(uri, root)``: a version registered from copies of the base and checkpoint that no longer exist."""
    root = tmp_path_factory.mktemp("travel")
    base = Path(shutil.copytree(tiny_models, root / "base"))
    (checkpoint,) = make_checkpoints(base, root / "ckpts", count=1)
    uri = sqlite_uri(root)
    metrics = write_metrics(root / "eval/metrics.json", checkpoint)
    register(checkpoint, metrics, RegisterConfig(model_name="travel"), base=base, tracking_uri=uri)
    shutil.rmtree(base)
    shutil.rmtree(root / "ckpts")
    return uri, root


def test_registered_model_loads_without_the_repository_checkpoint_or_base_folder(travelled, tmp_path):
    uri, root = travelled
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(MLFLOW_TRACKING_URI=uri, OMP_NUM_THREADS="1")
    dst = tmp_path / "downloaded"
    done = subprocess.run(
        [sys.executable, "-c", LOAD_ELSEWHERE, str(dst)], cwd=tmp_path, env=env, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "IMAGES 1" in done.stdout
    (loaded,) = [line.split(" ", 1)[1] for line in done.stdout.splitlines() if line.startswith("EASYREF ")]
    assert Path(loaded).resolve().is_relative_to(dst.resolve()), loaded  # the code travelled with the model

    requirements = (dst / "requirements.txt").read_text()
    for package in ("mlflow==", "torch==", "diffusers==", "transformers==", "safetensors=="):
        assert package in requirements, requirements
    for text_file in ("requirements.txt", "python_env.yaml", "easyref_model.py"):
        assert str(root) not in (dst / text_file).read_text(), text_file  # no path of the registering machine
    # MLmodel keeps MLflow's record of where each bundled artifact was copied from (``uri``); loading uses ``path``
    lines = [line.strip() for line in (dst / "MLmodel").read_text().splitlines() if str(root) in line]
    assert lines and all(line.startswith("uri: ") for line in lines), lines


def test_version_says_where_it_came_from(travelled):
    from mlflow import MlflowClient

    uri, _ = travelled
    client = MlflowClient(uri)
    version = client.get_model_version("travel", "1")
    assert version.description.startswith("Checkpoint ckpt0 (sha256 ") and "sdxl bundled" in version.description
    assert version.tags["base.sdxl"].startswith("bundled (sha256 ")
    run = client.get_run(version.run_id)
    assert run.data.tags["mlflow.runName"] == f"register-{version.run_id[:8]}"  # <stage>-<short id>
    assert run.data.tags["mlflow.source.git.commit"] == version.tags["git_commit"]
    assert client.get_registered_model("travel").description.startswith("EasyRef: SDXL conditioned")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def endpoint(travelled):
    """MLflow's scoring app for the registered model, served by uvicorn in a thread."""
    import mlflow
    import uvicorn
    from mlflow.pyfunc import scoring_server

    uri, _ = travelled
    mlflow.set_tracking_uri(uri)
    model = mlflow.pyfunc.load_model("models:/travel@challenger")
    saved = dict(os.environ)
    app = scoring_server.init(model)  # marks the process as a serving environment: restored below
    port = _free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}/invocations"
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        os.environ.clear()
        os.environ.update(saved)


def _body(prompt: str | None = None, references: list | None = None, **params: object) -> dict:
    frame, _ = input_example()
    record = frame.to_dict(orient="records")[0]
    if prompt is not None:
        record["prompt"] = prompt
    if references is not None:
        record["references"] = references
    return {"dataframe_records": [record], "params": {"num_inference_steps": 1, **params}}


@pytest.mark.parametrize(
    ("body", "field"),
    [
        (_body(num_inference_steps=-3), "num_inference_steps = -3"),
        (_body(num_inference_steps=0), "num_inference_steps = 0"),
        (_body(num_inference_steps=10**6), "num_inference_steps = 1000000"),
        (_body(prompt="a cat " * 20_000), "row 0: 'prompt' must be a string of at most"),
        (_body(seed=-1), "seed = -1"),
        (_body(height=13), "height = 13"),
        (_body(guidance_scale=1e9), "guidance_scale"),
        (_body(references=[]), "row 0: 'references' holds 0 images"),
        (_body(references=["bm90IGFuIGltYWdl"]), "row 0: references[0]: not a base64-encoded image"),
    ],
    ids=["negative-steps", "zero-steps", "huge-steps", "oversized-prompt", "negative-seed", "odd-height",
         "huge-guidance", "no-references", "not-an-image"],
)  # fmt: skip
def test_bad_requests_get_400_naming_the_field(endpoint, body, field):
    import requests

    reply = requests.post(endpoint, json=body, timeout=60)
    assert reply.status_code == 400, reply.text[:500]
    assert field in reply.json()["message"], reply.text[:500]


def test_good_request_is_answered(endpoint):
    import requests

    from easyref.registry import decode_png

    reply = requests.post(endpoint, json=_body(), timeout=120)
    assert reply.status_code == 200, reply.text[:500]
    (prediction,) = reply.json()["predictions"]
    assert decode_png(prediction["image"]).size[0] > 0
