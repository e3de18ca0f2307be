"""Register an evaluated checkpoint in the MLflow model registry and promote it by alias.

Example:

  easyref register --checkpoint checkpoints/multi --metrics outputs/eval/metrics.json --model-name easyref \\
      --base models/tiny --params params.yaml --promote

What it does, in order:

1. Hashes the checkpoint folder (SHA-256 over its files). If a complete version of the model already carries that
   hash (tag ``checkpoint_sha256``), nothing new is logged: registering the same checkpoint twice gives one version.
2. Otherwise logs an MLflow pyfunc model (:class:`EasyRefModel`, a wrapper around the library's sampler) whose
   artifacts are the trained weights and their config; the base models are recorded by reference (paths or hub ids
   in the model config, overridable at load time with ``EASYREF_BASE``). The model has a signature and an input
   example: a ``prompt`` and ``references`` (base64 PNG strings) in, one base64 PNG ``image`` per row out.
   The version gets tags: metrics (``metric.<name>``), git commit, checkpoint / params / data hashes, and
   ``easyref.status=ready`` last of all.
3. Points the alias ``challenger`` at the version.
4. With ``--promote``, compares the challenger with ``@champion`` on the metrics and margins of
   ``register.gate`` and moves ``champion`` only if every rule passes (or there is no champion yet). The decision
   and the numbers are recorded as tags of the challenger version either way.

Reliability: aliases move only after a version is complete; a failure half-way deletes the half-made version when
the server can still be reached, never touches an alias, and the error says what to re-run. Registrations of the
same model are serialised by a file lock (per tracking URI and model name), and ``champion`` is moved with a
compare-and-set check, so concurrent registrations cannot interleave their alias updates.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import fcntl
import hashlib
import io
import json
import logging
import math
import os
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import mlflow
import pandas as pd

from easyref.errors import UserError

if TYPE_CHECKING:
    from mlflow import MlflowClient
    from mlflow.entities.model_registry import ModelVersion
    from PIL import Image

HELP = "register an evaluated checkpoint in the MLflow registry (@challenger) and promote it (@champion)"

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"
CHALLENGER, CHAMPION = "challenger", "champion"
STATUS_TAG, READY = "easyref.status", "ready"
SHA_TAG = "checkpoint_sha256"
METRIC_PREFIX = "metric."
MODEL_ARTIFACT = "model"


def resolve_tracking_uri(explicit: str | None = None) -> str:
    """``explicit``, else ``$MLFLOW_TRACKING_URI``, else the embedded default ``sqlite:///mlflow.db``."""
    return explicit or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return out.stdout.strip() if out.returncode == 0 else "unknown"


# -- configuration ----------------------------------------------------------------------------------------------------


@dataclass(kw_only=True)
class GateRule:
    """One promotion condition: ``challenger >= champion + margin`` (or ``<= champion - margin`` if lower wins)."""

    metric: str
    """A key of metrics.json, e.g. ``easyref.clip_i``."""
    margin: float = 0.0
    """Required improvement; negative = tolerated regression."""
    higher_is_better: bool = True
    """Direction of the metric (losses: false)."""


def _default_gate() -> list[GateRule]:
    return [GateRule(metric=f"easyref.{m}") for m in ("clip_i", "clip_t", "dino_i")]


@dataclass(kw_only=True)
class RegisterConfig:
    """The ``register`` section of ``params.yaml``; command-line flags override it."""

    model_name: str = "easyref"
    """Registered model name."""
    experiment: str = "easyref-register"
    """MLflow experiment of the runs that log the models."""
    base: str | None = None
    """Base-model folder recorded in the model (holding sdxl/ and mllm/); default: ``--base``, made absolute."""
    gate: list[GateRule] = field(default_factory=_default_gate)
    """Promotion rules; all must pass."""
    require_same_split: bool = True
    """Fail the gate when champion and challenger were evaluated on different splits (``split_sha256`` tags)."""
    lock_timeout_s: float = 600.0
    """How long to wait for another registration of the same model to finish."""

    def __post_init__(self) -> None:
        if not self.model_name.strip():
            raise ValueError("model_name must not be empty")


# -- the pyfunc model -------------------------------------------------------------------------------------------------


def encode_png(image: Image.Image) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode("ascii")


def decode_png(data: str, where: str = "image") -> Image.Image:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(base64.b64decode(data, validate=True))) as im:
            return im.convert("RGB")
    except (ValueError, UnidentifiedImageError, OSError) as exc:
        raise ValueError(f"{where}: not a base64-encoded image ({exc})") from exc


def resolve_base(model_config: dict[str, Any]) -> tuple[str, str]:
    """``(sdxl, mllm)``: from ``$EASYREF_BASE`` (a folder with sdxl/ and mllm/) if set, else the recorded ones."""
    from easyref.sampler import base_paths

    override = os.environ.get("EASYREF_BASE")
    if override:
        sdxl, mllm = base_paths(override)
        return str(sdxl), str(mllm)
    return model_config["sdxl"], model_config["mllm"]


class EasyRefModel(mlflow.pyfunc.PythonModel):
    """The EasyRef sampler as an MLflow pyfunc model.

    Input: a DataFrame with ``prompt`` (str) and ``references`` (list of base64 PNG strings) per row. Params:
    ``num_inference_steps``, ``guidance_scale``, ``seed``, ``negative_prompt``, ``height``/``width`` (0 = the
    model's size). Output: a DataFrame with one base64 PNG ``image`` per input row.
    """

    def load_context(self, context: Any) -> None:
        import torch

        from easyref.sampler import EasyRefSampler

        sdxl, mllm = resolve_base(context.model_config)
        device = "cuda" if torch.cuda.is_available() else "cpu"
        dtype = torch.bfloat16 if device == "cuda" else None
        self.sampler = EasyRefSampler.from_pretrained(
            sdxl, mllm, checkpoint=context.artifacts["checkpoint"], device=device, torch_dtype=dtype
        )

    def predict(self, context: Any, model_input: pd.DataFrame, params: dict[str, Any] | None = None) -> pd.DataFrame:
        params = {**DEFAULT_PARAMS, **(params or {})}
        groups = []
        for i, refs in enumerate(model_input["references"]):
            refs = list(refs) if refs is not None else []
            if not refs:
                raise ValueError(f"row {i}: 'references' is empty; give at least one base64 PNG")
            groups.append([decode_png(r, f"row {i}: references[{j}]") for j, r in enumerate(refs)])
        images = self.sampler(
            [str(p) for p in model_input["prompt"]],
            groups,
            negative_prompt=str(params["negative_prompt"]),
            num_inference_steps=int(params["num_inference_steps"]),
            guidance_scale=float(params["guidance_scale"]),
            height=int(params["height"]) or None,
            width=int(params["width"]) or None,
            generator=int(params["seed"]),
            progress=False,
        )
        return pd.DataFrame({"image": [encode_png(im) for im in images]})


DEFAULT_PARAMS: dict[str, Any] = {
    "num_inference_steps": 30,
    "guidance_scale": 7.5,
    "seed": 0,
    "negative_prompt": "",
    "height": 0,
    "width": 0,
}

MODEL_CODE = """\
# MLflow models-from-code entry point: the model object is built from the installed easyref package.
import mlflow

from easyref.registry import EasyRefModel

mlflow.models.set_model(EasyRefModel())
"""


def model_signature() -> Any:
    from mlflow.models import ModelSignature
    from mlflow.types.schema import Array, ColSpec, ParamSchema, ParamSpec, Schema

    types = {
        "num_inference_steps": "long",
        "guidance_scale": "double",
        "seed": "long",
        "negative_prompt": "string",
        "height": "long",
        "width": "long",
    }
    return ModelSignature(
        inputs=Schema([ColSpec("string", "prompt"), ColSpec(Array("string"), "references")]),
        outputs=Schema([ColSpec("string", "image")]),
        params=ParamSchema([ParamSpec(k, types[k], v) for k, v in DEFAULT_PARAMS.items()]),
    )


def input_example(checkpoint: Path) -> tuple[pd.DataFrame, dict[str, Any]]:
    """Two small synthetic reference images and a prompt; one denoising step keeps validation cheap."""
    from PIL import Image, ImageDraw

    refs = []
    for colour in ((215, 30, 35), (30, 70, 210)):
        im = Image.new("RGB", (64, 64), (250, 250, 250))
        ImageDraw.Draw(im).ellipse((16, 16, 48, 48), fill=colour)
        refs.append(encode_png(im))
    frame = pd.DataFrame({"prompt": ["a shape on a plain background"], "references": [refs]})
    return frame, {"num_inference_steps": 1}


# -- hashing and inputs -----------------------------------------------------------------------------------------------


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def checkpoint_sha256(checkpoint: str | Path) -> str:
    """SHA-256 over the checkpoint folder's files (relative names and content hashes, sorted)."""
    root = Path(checkpoint)
    digest = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        digest.update(f"{path.relative_to(root).as_posix()}\0{sha256_file(path)}\n".encode())
    return digest.hexdigest()


def read_metrics(path: Path) -> dict[str, float]:
    """The numeric entries of a flat metrics.json (nulls and NaNs dropped)."""
    if not path.is_file():
        raise UserError(f"{path}: no such metrics file (written by `easyref evaluate --out DIR` as DIR/metrics.json)")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise UserError(f"{path}: not valid JSON ({exc})") from exc
    if not isinstance(data, dict):
        raise UserError(f"{path}: expected a JSON object of metric name -> number")
    metrics = {}
    for key, value in data.items():
        if isinstance(value, dict):
            raise UserError(f"{path}: key {key!r} is nested; expected flat keys such as 'easyref.clip_i'")
        if isinstance(value, int | float) and not isinstance(value, bool) and not math.isnan(value):
            metrics[key] = float(value)
    return metrics


def provenance(checkpoint: Path, metrics_file: Path, params_file: Path | None) -> dict[str, str]:
    """Version tags that say where the model came from."""
    from easyref.model import read_checkpoint_config

    record = read_checkpoint_config(checkpoint)
    tags = {"git_commit": git_commit(), "checkpoint_parts": ",".join(record.parts)}
    for key, value in record.extra.items():
        if "sha256" in key or "hash" in key or key in ("stage", "step"):
            tags[f"train.{key}"] = str(value)
    evaluation = metrics_file.parent / "evaluation.json"
    if evaluation.is_file():
        with contextlib.suppress(json.JSONDecodeError):
            info = json.loads(evaluation.read_text())
            for key in ("split_sha256", "split", "dreambench", "checkpoint_sha256"):
                if key in info:
                    tags[f"eval.{key}"] = str(info[key])
    if params_file is not None and params_file.is_file():
        tags["params_sha256"] = sha256_file(params_file)
    return tags


# -- locking ----------------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def registry_lock(tracking_uri: str, model_name: str, timeout_s: float) -> Iterator[None]:
    """An exclusive lock per (tracking URI, model name) shared by every process on this host."""
    key = hashlib.sha256(f"{tracking_uri}\0{model_name}".encode()).hexdigest()[:16]
    path = Path(tempfile.gettempdir()) / f"easyref-registry-{key}.lock"
    deadline = time.monotonic() + timeout_s
    with open(path, "a") as handle:
        while True:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise UserError(
                        f"another registration of {model_name!r} holds {path} for over {timeout_s:.0f}s; "
                        "wait for it or raise register.lock_timeout_s"
                    ) from None
                time.sleep(0.2)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


# -- registry operations ----------------------------------------------------------------------------------------------


def _alias_version(client: MlflowClient, name: str, alias: str) -> ModelVersion | None:
    from mlflow.exceptions import MlflowException

    try:
        return client.get_model_version_by_alias(name, alias)
    except MlflowException as exc:
        if exc.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE", "NOT_FOUND"):
            return None
        raise


def _search_sha(client: MlflowClient, name: str, sha: str) -> list[ModelVersion]:
    """Every version of ``name`` tagged with checkpoint ``sha``, complete or not."""
    return client.search_model_versions(f"name = '{name}' and tags.{SHA_TAG} = '{sha}'")


def find_ready_version(client: MlflowClient, name: str, sha: str) -> ModelVersion | None:
    """The complete version holding checkpoint ``sha``, if any (incomplete leftovers are ignored)."""
    versions = _search_sha(client, name, sha)
    ready = [v for v in versions if v.tags.get(STATUS_TAG) == READY]
    return min(ready, key=lambda v: int(v.version)) if ready else None


def _log_and_register(
    client: MlflowClient,
    checkpoint: Path,
    sha: str,
    metrics: dict[str, float],
    tags: dict[str, str],
    base: tuple[str, str],
    config: RegisterConfig,
) -> ModelVersion:
    """Log the pyfunc model in a run, create the version with its tags, mark it ready. Raises on any failure."""
    mlflow.set_experiment(config.experiment)
    validation = _ValidationWatch()
    with tempfile.TemporaryDirectory() as tmp, mlflow.start_run(run_name=f"register {sha[:12]}") as run:
        code = Path(tmp) / "easyref_model.py"
        code.write_text(MODEL_CODE)
        mlflow.set_tags({SHA_TAG: sha, "easyref.step": "register", **tags})
        mlflow.log_metrics(metrics)
        with validation:
            info = mlflow.pyfunc.log_model(
                name=MODEL_ARTIFACT,
                python_model=str(code),
                artifacts={"checkpoint": str(checkpoint)},
                model_config={"sdxl": base[0], "mllm": base[1], SHA_TAG: sha},
                signature=model_signature(),
                input_example=input_example(checkpoint),
                pip_requirements=_pip_requirements(),
            )
        if validation.failed:
            raise RuntimeError(f"the logged model failed to load or predict on its input example: {validation.failed}")
        run_id = run.info.run_id
    version = mlflow.register_model(
        info.model_uri,
        config.model_name,
        await_registration_for=0,
        tags={SHA_TAG: sha, "run_id": run_id, **tags, **{f"{METRIC_PREFIX}{k}": repr(v) for k, v in metrics.items()}},
    )
    version = _await_ready(client, config.model_name, version.version)
    client.set_model_version_tag(config.model_name, version.version, STATUS_TAG, READY)
    return version


class _ValidationWatch(logging.Handler):
    """Catches MLflow's warning that the logged model failed on its input example (MLflow only warns)."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.failed: str | None = None

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if "Failed to validate serving input example" in message:
            self.failed = message.splitlines()[-1][:500] or message[:500]

    def __enter__(self) -> _ValidationWatch:
        logging.getLogger("mlflow").addHandler(self)
        return self

    def __exit__(self, *exc: object) -> None:
        logging.getLogger("mlflow").removeHandler(self)


def _await_ready(client: MlflowClient, name: str, version: str, timeout_s: float = 300) -> ModelVersion:
    deadline = time.monotonic() + timeout_s
    while True:
        mv = client.get_model_version(name, version)
        if mv.status == "READY":
            return mv
        if mv.status == "FAILED_REGISTRATION" or time.monotonic() > deadline:
            raise RuntimeError(f"model version {name} v{version} is {mv.status}: {mv.status_message}")
        time.sleep(0.5)


def _pip_requirements() -> list[str]:
    from importlib.metadata import PackageNotFoundError, version

    reqs = []
    for package in (
        "mlflow",
        "torch",
        "diffusers",
        "transformers",
        "safetensors",
        "accelerate",
        "peft",
        "pillow",
        "numpy",
        "pandas",
    ):
        with contextlib.suppress(PackageNotFoundError):
            reqs.append(f"{package}=={version(package).split('+')[0]}")
    return reqs


@dataclass
class GateLine:
    metric: str
    challenger: float | None
    champion: float | None
    margin: float
    passed: bool
    note: str = ""

    def describe(self) -> str:
        if self.note:
            return f"{self.note} -> {'pass' if self.passed else 'FAIL'}"
        fmt = lambda v: "missing" if v is None else f"{v:.4f}"  # noqa: E731
        return (
            f"{self.metric}: challenger {fmt(self.challenger)} vs champion {fmt(self.champion)} "
            f"(margin {self.margin:+.4f}) -> {'pass' if self.passed else 'FAIL'}"
        )


def version_metrics(version: ModelVersion) -> dict[str, float]:
    return {k[len(METRIC_PREFIX) :]: float(v) for k, v in version.tags.items() if k.startswith(METRIC_PREFIX)}


def evaluate_gate(challenger: dict[str, float], champion: dict[str, float], rules: list[GateRule]) -> list[GateLine]:
    """One line per rule; a metric missing on either side fails its rule."""
    lines = []
    for rule in rules:
        new, old = challenger.get(rule.metric), champion.get(rule.metric)
        if new is None or old is None:
            passed = False
        elif rule.higher_is_better:
            passed = new >= old + rule.margin
        else:
            passed = new <= old - rule.margin
        lines.append(GateLine(rule.metric, new, old, rule.margin, passed))
    return lines


@dataclass
class Registration:
    """What :func:`register` did."""

    version: str
    created: bool
    promoted: bool | None = None
    decision: str = ""
    lines: list[GateLine] = field(default_factory=list)


def _record_decision(
    client: MlflowClient, name: str, version: str, decision: str, champion: str | None, lines: list[GateLine]
) -> None:
    tags = {
        "gate.decision": decision,
        "gate.champion_version": champion or "none",
        "gate.time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    tags.update({f"gate.{line.metric}": line.describe() for line in lines})
    for key, value in tags.items():
        client.set_model_version_tag(name, version, key, value)


def promote(
    client: MlflowClient, name: str, version: ModelVersion, config: RegisterConfig, attempts: int = 3
) -> Registration:
    """Move ``champion`` to ``version`` if the gate passes against the current champion (compare-and-set)."""
    for _ in range(attempts):
        champion = _alias_version(client, name, CHAMPION)
        if champion is not None and str(champion.version) == str(version.version):
            return Registration(str(version.version), False, True, "already champion")
        lines: list[GateLine] = []
        if champion is None:
            decision = "promoted: no champion yet"
        else:
            lines = evaluate_gate(version_metrics(version), version_metrics(champion), config.gate)
            split_old, split_new = champion.tags.get("eval.split_sha256"), version.tags.get("eval.split_sha256")
            if config.require_same_split and split_old != split_new:
                lines.append(
                    GateLine(
                        "same_split",
                        None,
                        None,
                        0.0,
                        False,
                        note=f"evaluated on split {split_new} vs champion's {split_old}",
                    )
                )
            passed = all(line.passed for line in lines)
            decision = f"{'promoted' if passed else 'rejected'} vs champion v{champion.version}"
        promoted = decision.startswith("promoted")
        current = _alias_version(client, name, CHAMPION)
        if (current and str(current.version)) != (champion and str(champion.version)):
            continue  # someone moved champion while we compared: compare again
        _record_decision(client, name, version.version, decision, champion and str(champion.version), lines)
        if promoted:
            client.set_registered_model_alias(name, CHAMPION, version.version)
        return Registration(str(version.version), False, promoted, decision, lines)
    raise UserError(f"{name}: @champion kept changing during promotion; re-run `easyref register ... --promote`")


def register(
    checkpoint: Path,
    metrics_file: Path,
    config: RegisterConfig,
    base: Path | None = None,
    params_file: Path | None = None,
    promote_: bool = False,
    tracking_uri: str | None = None,
) -> Registration:
    """Register ``checkpoint`` (idempotently), point ``challenger`` at it and optionally promote it."""
    from mlflow import MlflowClient

    from easyref.model import read_checkpoint_config
    from easyref.sampler import base_paths

    read_checkpoint_config(checkpoint)
    metrics = read_metrics(metrics_file)
    if config.base is not None:
        sdxl, mllm = base_paths(config.base)
        recorded = (str(sdxl), str(mllm))
    else:
        sdxl, mllm = base_paths(base or Path("models/tiny"))
        recorded = (str(sdxl.resolve()), str(mllm.resolve()))
    sha = checkpoint_sha256(checkpoint)
    tags = provenance(checkpoint, metrics_file, params_file)
    uri = resolve_tracking_uri(tracking_uri)
    mlflow.set_tracking_uri(uri)
    client = MlflowClient(uri)
    name = config.model_name
    rerun = f"re-run `easyref register --checkpoint {checkpoint} --metrics {metrics_file} --model-name {name}`"
    with registry_lock(uri, name, config.lock_timeout_s):
        try:
            existing = find_ready_version(client, name, sha) if _model_exists(client, name) else None
        except Exception as exc:  # noqa: BLE001 - any transport error: nothing was changed
            raise UserError(f"cannot reach the MLflow registry at {uri} ({exc}); nothing was changed; {rerun}") from exc
        created = existing is None
        version = existing or _create_version(client, checkpoint, sha, metrics, tags, recorded, config, rerun)
        try:
            client.set_registered_model_alias(name, CHALLENGER, version.version)
            result = promote(client, name, version, config) if promote_ else Registration(str(version.version), created)
        except UserError:
            raise
        except Exception as exc:  # noqa: BLE001
            raise UserError(
                f"{name} v{version.version} is registered and complete, but setting its aliases failed "
                f"({exc}); {rerun} (it will reuse v{version.version})"
            ) from exc
    result.created = created
    return result


def _model_exists(client: MlflowClient, name: str) -> bool:
    from mlflow.exceptions import MlflowException

    try:
        client.get_registered_model(name)
        return True
    except MlflowException as exc:
        if exc.error_code == "RESOURCE_DOES_NOT_EXIST":
            return False
        raise


def _create_version(
    client: MlflowClient,
    checkpoint: Path,
    sha: str,
    metrics: dict[str, float],
    tags: dict[str, str],
    base: tuple[str, str],
    config: RegisterConfig,
    rerun: str,
) -> ModelVersion:
    """:func:`_log_and_register`, deleting a half-made version on failure (best effort)."""
    before = _versions_with_sha(client, config.model_name, sha)
    try:
        return _log_and_register(client, checkpoint, sha, metrics, tags, base, config)
    except Exception as exc:  # noqa: BLE001 - S3, HTTP and database errors all mean the same here
        leftovers = [v for v in _versions_with_sha(client, config.model_name, sha, quiet=True) if v not in before]
        for version in leftovers:
            with contextlib.suppress(Exception):
                client.delete_model_version(config.model_name, version)
        raise UserError(
            f"registering {checkpoint} failed ({type(exc).__name__}: {exc}); no alias was changed; {rerun}"
        ) from exc


def _versions_with_sha(client: MlflowClient, name: str, sha: str, quiet: bool = False) -> set[str]:
    try:
        return {v.version for v in _search_sha(client, name, sha)}
    except Exception:  # noqa: BLE001
        if quiet:
            return set()
        raise


# -- command ----------------------------------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", type=Path, required=True, help="trained EasyRef checkpoint folder")
    parser.add_argument("--metrics", type=Path, required=True, help="metrics.json written by easyref evaluate")
    parser.add_argument("--model-name", help="registered model name (default: register.model_name, 'easyref')")
    parser.add_argument(
        "--base",
        type=Path,
        default=Path("models/tiny"),
        help="base models (sdxl/, mllm/) recorded by reference (default: models/tiny)",
    )
    parser.add_argument("--promote", action="store_true", help="move @champion here if the gate passes")
    parser.add_argument("--params", type=Path, help="read the 'register' section of this params.yaml")
    parser.add_argument(
        "--tracking-uri", help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI or sqlite:///mlflow.db)"
    )


def config_from_args(args: argparse.Namespace) -> RegisterConfig:
    from easyref.config import load_section

    return load_section(RegisterConfig, args.params, "register", {"model_name": args.model_name or None})


def run(args: argparse.Namespace) -> int:
    config = config_from_args(args)
    result = register(
        args.checkpoint,
        args.metrics,
        config,
        base=args.base,
        params_file=args.params,
        promote_=args.promote,
        tracking_uri=args.tracking_uri,
    )
    name = config.model_name
    print(
        f"{name} v{result.version}: {'registered' if result.created else 'already registered (same checkpoint)'}; "
        f"@{CHALLENGER} -> v{result.version}"
    )
    if result.promoted is not None:
        for line in result.lines:
            print(f"  {line.describe()}")
        print(f"gate: {result.decision}" + (f"; @{CHAMPION} -> v{result.version}" if result.promoted else ""))
    return 0
