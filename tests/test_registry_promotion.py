"""Promotion only of what was evaluated: the checkpoint's hash, finite gate metrics, absolute bounds, one writer.

Each test names a promise of docs/reliability.md ("Registry and promotion").
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from easyref.errors import UserError
from easyref.registry import CHALLENGER, GateRule, RegisterConfig, check_model_name, evaluate_gate, register
from tests.registry_helpers import aliases, make_checkpoints, sqlite_uri, write_metrics

ROOT = Path(__file__).resolve().parents[1]
PAIRED_ABOVE_ZERO = {"paired/easyref_vs_text.clip_i": 0.03, "paired/easyref_vs_text.clip_i.ci_low": 0.01}
ENV = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def checkpoints(tiny_models, tmp_path_factory) -> list[Path]:
    return make_checkpoints(tiny_models, tmp_path_factory.mktemp("ckpts"), count=2)


def _cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "easyref.cli", "register", *args],
        capture_output=True,
        text=True,
        env=ENV,
        cwd=cwd,
        timeout=300,
    )


def _error_lines(stderr: str) -> list[str]:
    """stderr without MLflow's own INFO log lines (a fresh sqlite store announces its tables)."""
    return [line for line in stderr.strip().splitlines() if " INFO mlflow" not in line]


def _registered_models(uri: str) -> list[str]:
    from mlflow import MlflowClient

    return [m.name for m in MlflowClient(uri).search_registered_models()]


def test_metrics_of_another_checkpoint_are_refused_before_anything_is_written(checkpoints, tiny_models, tmp_path):
    uri = sqlite_uri(tmp_path)
    metrics = write_metrics(tmp_path / "eval0/metrics.json", checkpoints[0])
    with pytest.raises(UserError, match=r"measures checkpoint .*ckpt0 with sha256 .* but .*ckpt1 has sha256"):
        register(checkpoints[1], metrics, RegisterConfig(model_name="m"), base=tiny_models, tracking_uri=uri)
    (metrics.parent / "evaluation.json").unlink()
    with pytest.raises(UserError, match=r"evaluation.json: missing; `easyref evaluate` writes it"):
        register(checkpoints[0], metrics, RegisterConfig(model_name="m"), base=tiny_models, tracking_uri=uri)
    assert _registered_models(uri) == []


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ('{"easyref.clip_i": Infinity, "easyref.clip_t": 0.7, "easyref.dino_i": 0.6}', "easyref.clip_i = inf is not"),
        ('{"easyref.clip_i": NaN, "easyref.clip_t": 0.7, "easyref.dino_i": 0.6}', "easyref.clip_i = nan is not"),
        ("{}", "gate metric(s) easyref.clip_i, easyref.clip_t, easyref.dino_i missing"),
        ('{"easyref.clip_i": null, "easyref.clip_t": 0.7, "easyref.dino_i": 0.6}', "easyref.clip_i missing or null"),
    ],
)
def test_non_finite_or_missing_gate_metrics_are_never_promoted(checkpoints, tiny_models, tmp_path, content, message):
    uri = sqlite_uri(tmp_path)
    metrics = write_metrics(tmp_path / "eval/metrics.json", checkpoints[0])
    metrics.write_text(content)
    with pytest.raises(UserError, match=message.replace("(", r"\(").replace(")", r"\)")):
        register(checkpoints[0], metrics, RegisterConfig(), base=tiny_models, promote_=True, tracking_uri=uri)
    assert _registered_models(uri) == []


def test_absolute_bounds_apply_with_and_without_a_champion():
    rules = [GateRule(metric="gain", min=0.0), GateRule(metric="loss", max=1.0, margin=0.0, higher_is_better=False)]
    lines = evaluate_gate({"gain": 0.0, "loss": 0.5}, None, rules)
    assert [line.passed for line in lines] == [False, True]  # no champion: only the bounds are checked
    assert lines[0].describe() == "gain: 0.0000 must be > 0.0000 -> FAIL"
    (small,) = evaluate_gate({"gain": 1.9e-5}, None, rules[:1])
    assert small.describe() == "gain: 1.90e-05 must be > 0.0000 -> pass"  # not "0.0000 must be > 0.0000 -> pass"
    lines = evaluate_gate({"gain": 0.01, "loss": 0.5}, {"gain": 0.5, "loss": 0.4}, rules)
    assert [(line.key, line.passed) for line in lines] == [
        ("gain.bounds", True),
        ("loss.bounds", True),
        ("loss", False),
    ]
    (missing,) = evaluate_gate({}, None, rules[:1])
    assert not missing.passed and "missing must be > 0" in missing.describe()


def test_model_that_ignores_its_references_is_registered_but_never_champion(checkpoints, tiny_models, tmp_path):
    """The shipped gate (params.yaml) requires reference_gain's lower bound > 0, also for the first version."""
    from mlflow import MlflowClient

    from easyref.config import load_section

    config = load_section(RegisterConfig, ROOT / "params.yaml", "register", {"model_name": "refs"})
    assert any(r.metric == "easyref.reference_gain.ci_low" and r.min == 0.0 for r in config.gate)
    uri = sqlite_uri(tmp_path)
    gain = {"easyref.reference_gain": 0.0001, "easyref.reference_gain.ci_low": -0.0002, **PAIRED_ABOVE_ZERO}
    metrics = write_metrics(tmp_path / "a/metrics.json", checkpoints[0], **gain)
    blind = register(checkpoints[0], metrics, config, base=tiny_models, promote_=True, tracking_uri=uri)
    assert blind.created and blind.promoted is False
    assert blind.decision.startswith("rejected (no champion yet): easyref.reference_gain.ci_low: -2.00e-04 must be > 0")
    assert aliases(uri, "refs") == {CHALLENGER: "1"}
    tags = MlflowClient(uri).get_model_version("refs", "1").tags
    assert tags["gate.decision"] == blind.decision and tags["gate.easyref.reference_gain.ci_low.bounds"].endswith(
        "FAIL"
    )

    gain = {"easyref.reference_gain": 0.02, "easyref.reference_gain.ci_low": 0.01, **PAIRED_ABOVE_ZERO}
    metrics = write_metrics(tmp_path / "b/metrics.json", checkpoints[1], **gain)
    seeing = register(checkpoints[1], metrics, config, base=tiny_models, promote_=True, tracking_uri=uri)
    assert seeing.promoted and seeing.decision == "promoted: no champion yet"


def test_model_whose_images_score_as_text_only_is_registered_but_never_champion(checkpoints, tiny_models, tmp_path):
    """The shipped gate also requires EasyRef's held-out CLIP-I above text-only SDXL's on the same samples (the
    paired difference's lower bound > 0): a reference gain alone does not promote."""
    from easyref.config import load_section

    config = load_section(RegisterConfig, ROOT / "params.yaml", "register", {"model_name": "paired"})
    uri = sqlite_uri(tmp_path)
    same = {
        "easyref.reference_gain": 0.02,
        "easyref.reference_gain.ci_low": 0.01,
        "paired/easyref_vs_text.clip_i": 0.0,
        "paired/easyref_vs_text.clip_i.ci_low": 0.0,
    }
    metrics = write_metrics(tmp_path / "a/metrics.json", checkpoints[0], **same)
    result = register(checkpoints[0], metrics, config, base=tiny_models, promote_=True, tracking_uri=uri)
    assert result.created and result.promoted is False
    assert result.decision == (
        "rejected (no champion yet): paired/easyref_vs_text.clip_i.ci_low: 0.0000 must be > 0.0000 -> FAIL"
    )
    assert aliases(uri, "paired") == {CHALLENGER: "1"}


def test_metrics_edited_or_copied_after_evaluation_are_refused_before_anything_is_written(
    checkpoints, tiny_models, tmp_path
):
    """evaluation.json seals metrics.json's sha256 (and so do the tags of the evaluation's MLflow run)."""
    from mlflow import MlflowClient

    from easyref.data.parquet import sha256_file
    from easyref.registry import checkpoint_sha256

    uri = sqlite_uri(tmp_path)
    config = RegisterConfig(model_name="sealed")
    metrics = write_metrics(tmp_path / "eval/metrics.json", checkpoints[0])
    good = metrics.read_text()
    edited = json.loads(good) | {"easyref.clip_i": 0.9999, "easyref.reference_gain.ci_low": 0.5}
    metrics.write_text(json.dumps(edited))
    with pytest.raises(
        UserError, match=r"metrics.json: sha256 .* is not what `easyref evaluate` wrote .*sealed sha256"
    ):
        register(checkpoints[0], metrics, config, base=tiny_models, promote_=True, tracking_uri=uri)
    # another evaluation's metrics.json copied beside this checkpoint's evaluation.json
    other = write_metrics(tmp_path / "other/metrics.json", checkpoints[0], **{"easyref.clip_i": 0.95})
    metrics.write_text(other.read_text())
    with pytest.raises(UserError, match="edited or copied after evaluation"):
        register(checkpoints[0], metrics, config, base=tiny_models, promote_=True, tracking_uri=uri)
    # an evaluation.json without the seal (written before metrics were sealed) is refused too
    record = json.loads((metrics.parent / "evaluation.json").read_text())
    (metrics.parent / "evaluation.json").write_text(json.dumps({**record, "metrics_sha256": None}))
    with pytest.raises(UserError, match=r"records no metrics_sha256"):
        register(checkpoints[0], metrics, config, base=tiny_models, promote_=True, tracking_uri=uri)

    # both files edited to agree: the evaluation's MLflow run in the same store recorded the original digest
    metrics.write_text(good)
    client = MlflowClient(uri)
    run = client.create_run(client.create_experiment("easyref-evaluate"))
    sha = checkpoint_sha256(checkpoints[0])
    tags = {
        "easyref.step": "evaluate",
        "easyref.checkpoint_sha256": sha,
        "easyref.metrics_sha256": sha256_file(metrics),
    }
    for key, value in tags.items():
        client.set_tag(run.info.run_id, key, value)
    metrics.write_text(json.dumps(edited))
    (metrics.parent / "evaluation.json").write_text(json.dumps({**record, "metrics_sha256": sha256_file(metrics)}))
    with pytest.raises(UserError, match=rf"not the digest any `easyref evaluate` run .*{run.info.run_id}"):
        register(checkpoints[0], metrics, config, base=tiny_models, promote_=True, tracking_uri=uri)
    assert _registered_models(uri) == []


def test_second_registration_of_a_model_is_refused_naming_the_lock_holder(checkpoints, tiny_models, tmp_path):
    """The lock is a file lock in register.lock_dir (a shared volume on a cluster), held across processes."""
    from easyref.registry.store import registry_lock

    uri = sqlite_uri(tmp_path)
    params = tmp_path / "params.yaml"
    params.write_text(f"register:\n  lock_dir: {tmp_path / 'locks'}\n  lock_timeout_s: 1\n")
    metrics = write_metrics(tmp_path / "a/metrics.json", checkpoints[0])
    config = RegisterConfig(model_name="locked", lock_dir=str(tmp_path / "locks"))
    with registry_lock(uri, "locked", config):
        done = _cli(
            *("--checkpoint", str(checkpoints[0]), "--metrics", str(metrics), "--model-name", "locked"),
            *("--base", str(tiny_models), "--params", str(params), "--tracking-uri", uri),
        )
    assert done.returncode == 2, done.stderr
    assert f"pid {os.getpid()}" in done.stderr and "held the registry lock for over 1s" in done.stderr
    assert "Traceback" not in done.stderr and _error_lines(done.stderr)[0].startswith("easyref register: error:")


def test_one_tracking_store_spelled_differently_takes_one_registry_lock(tmp_path, monkeypatch):
    """A doubled or trailing ``/``, or a relative spelling of the same sqlite file, is the same store: same lock."""
    from easyref.registry.store import registry_lock

    monkeypatch.chdir(tmp_path)
    config = RegisterConfig(model_name="m", lock_dir=str(tmp_path / "locks"), lock_timeout_s=0.2)
    with registry_lock(f"sqlite:///{tmp_path}/reg.db", "m", config):
        for spelling in (f"sqlite:///{tmp_path}//reg.db", f"sqlite:///{tmp_path}/reg.db/", "sqlite:///reg.db"):
            with pytest.raises(UserError, match="held the registry lock"), registry_lock(spelling, "m", config):
                pass
        with registry_lock(f"sqlite:///{tmp_path}/other.db", "m", config):  # another store: its own lock
            pass


def test_lock_dir_that_is_empty_a_file_or_unwritable_exits_2_with_one_line(checkpoints, tiny_models, tmp_path):
    from easyref.config import load_section
    from easyref.registry.store import registry_lock

    params = tmp_path / "params.yaml"
    params.write_text('register:\n  lock_dir: ""\n')
    with pytest.raises(UserError, match=r"register: lock_dir is empty: name the folder"):
        load_section(RegisterConfig, params, "register")
    a_file = tmp_path / "a-file"
    a_file.write_text("")
    unwritable = tmp_path / "read-only"
    unwritable.mkdir(mode=0o555)
    if os.geteuid() == 0:  # root writes anywhere; sysfs refuses new folders even to root
        unwritable = Path("/sys/kernel")
    for folder in (a_file, a_file / "sub", unwritable):
        config = RegisterConfig(model_name="m", lock_dir=str(folder), lock_timeout_s=0.2)
        with pytest.raises(UserError, match=rf"register.lock_dir {folder}: cannot take the registry lock"):
            with registry_lock(sqlite_uri(tmp_path), "m", config):
                pass
    params.write_text(f"register:\n  lock_dir: {a_file}\n")
    metrics = write_metrics(tmp_path / "a/metrics.json", checkpoints[0])
    done = _cli(
        *("--checkpoint", str(checkpoints[0]), "--metrics", str(metrics), "--model-name", "m"),
        *("--base", str(tiny_models), "--params", str(params), "--tracking-uri", sqlite_uri(tmp_path)),
    )
    assert done.returncode == 2, done.stderr
    (line,) = _error_lines(done.stderr)
    assert f"register.lock_dir {a_file}: cannot take the registry lock" in line and "(Not a directory)" in line


def test_model_names_mlflow_refuses_exit_2_with_one_line(checkpoints, tiny_models, tmp_path):
    for bad in ("team/easyref", "a:b", "it's", " padded", "", "x" * 300):
        with pytest.raises(ValueError, match="model_name"):
            check_model_name(bad)
    metrics = write_metrics(tmp_path / "a/metrics.json", checkpoints[0])
    done = _cli(
        *("--checkpoint", str(checkpoints[0]), "--metrics", str(metrics), "--model-name", "team/easyref"),
        *("--base", str(tiny_models), "--tracking-uri", sqlite_uri(tmp_path)),
    )
    assert done.returncode == 2, done.stderr
    (line,) = _error_lines(done.stderr)
    assert "--model-name: model_name 'team/easyref' is not a registered-model name MLflow can" in line


def test_registry_section_with_unpinned_base_models_is_refused(tmp_path):
    from easyref.config import load_section

    params = tmp_path / "params.yaml"
    params.write_text(json.dumps({"register": {"base_models": {"sdxl": "/abs/sdxl", "mllm": "org/mllm@abc123"}}}))
    with pytest.raises(UserError, match=r"base_models.sdxl = '/abs/sdxl': give a hub id with a pinned revision"):
        load_section(RegisterConfig, params, "register")
    params.write_text(json.dumps({"register": {"base_models": {"sdxl": "org/sdxl", "mllm": "s3://b/mllm"}}}))
    with pytest.raises(UserError, match=r"base_models.sdxl = 'org/sdxl'"):
        load_section(RegisterConfig, params, "register")


def test_model_that_fails_its_serving_check_is_not_registered(checkpoints, tiny_models, tmp_path, monkeypatch):
    """The logged model is loaded and run as the endpoint would; if that fails, no version and no alias exist."""
    from mlflow import MlflowClient

    uri = sqlite_uri(tmp_path)
    metrics = write_metrics(tmp_path / "a/metrics.json", checkpoints[0])
    monkeypatch.setenv("EASYREF_BASE", str(tmp_path / "no-base-models-here"))  # read by the model when it loads
    with pytest.raises(UserError, match=r"failed to load or predict on its input example.*no-base-models-here"):
        register(checkpoints[0], metrics, RegisterConfig(model_name="broken"), base=tiny_models, tracking_uri=uri)
    assert MlflowClient(uri).search_model_versions("name = 'broken'") == []
