"""Registering a verified checkpoint: the lock, logging the pyfunc model, creating the version, the aliases."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import tempfile
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import mlflow

from easyref.errors import UserError
from easyref.registry.config import BASE_PARTS, RegisterConfig
from easyref.registry.evidence import (
    check_sealed_by_run,
    checkpoint_sha256,
    provenance,
    read_metrics,
    require_gate_metrics,
    resolve_tracking_uri,
    verify_evaluated,
)
from easyref.registry.gate import CHALLENGER, METRIC_PREFIX, Registration, promote
from easyref.registry.pyfunc import (
    MODEL_CODE,
    easyref_code_path,
    input_example,
    model_signature,
    pip_requirements,
)
from easyref.runs import stage_run

if TYPE_CHECKING:
    from mlflow import MlflowClient
    from mlflow.entities.model_registry import ModelVersion

STATUS_TAG, READY = "easyref.status", "ready"
SHA_TAG = "checkpoint_sha256"
MODEL_ARTIFACT = "model"
MODEL_DESCRIPTION = (
    "EasyRef: SDXL conditioned on a group of reference images through a multimodal LLM. Input: `prompt` and "
    "`references` (base64 PNGs); output: one base64 PNG `image` per row. Versions are created by `easyref register`; "
    "@challenger is the latest, @champion the one that passed the promotion gate."
)


def canonical_tracking_uri(uri: str) -> str:
    """One spelling per tracking store, for the lock's key: a sqlite or file store is named by its resolved path
    (``sqlite:////a//reg.db``, ``sqlite:////a/reg.db/`` and a relative ``sqlite:///reg.db`` run from ``/a`` are one
    store); other URIs get a lower-case scheme and host and no doubled or trailing ``/`` in the path."""
    from urllib.parse import urlsplit, urlunsplit

    scheme, _, rest = uri.partition(":")
    scheme = scheme.lower()
    if scheme == "sqlite" and rest.startswith("///"):
        path, sep, query = rest[3:].partition("?")
        return f"sqlite:///{Path(path).resolve()}{sep}{query}" if path and path != ":memory:" else uri
    if scheme == "file" or "://" not in uri:
        local = urlsplit(uri).path if scheme == "file" else uri
        return f"file://{Path(local).resolve()}"
    parts = urlsplit(uri)
    path = "/".join(piece for piece in parts.path.split("/") if piece)
    return urlunsplit((scheme, parts.netloc.lower(), f"/{path}" if path else "", parts.query, ""))


@contextlib.contextmanager
def registry_lock(tracking_uri: str, model_name: str, config: RegisterConfig) -> Iterator[None]:
    """One registration at a time per (tracking store, model name), among processes sharing ``config.lock_dir``."""
    from easyref.locking import FolderLocked, output_lock

    key = hashlib.sha256(f"{canonical_tracking_uri(tracking_uri)}\0{model_name}".encode()).hexdigest()[:16]
    root = Path(config.lock_dir or tempfile.gettempdir())
    folder = root / f"easyref-registry-{key}"
    with contextlib.ExitStack() as stack:
        try:
            folder.mkdir(parents=True, exist_ok=True)
            if not os.access(folder, os.W_OK | os.X_OK):  # filelock would take an unwritable lock file for a holder
                raise PermissionError(errno.EACCES, "Permission denied", str(folder))
            stack.enter_context(output_lock(folder, f"register {model_name}", timeout=config.lock_timeout_s))
        except FolderLocked as exc:
            holder = str(exc).split("; wait for it")[0]  # drop output_lock's hint about --out
            raise UserError(
                f"another registration of {model_name!r} held the registry lock for over "
                f"{config.lock_timeout_s:.0f}s ({holder}); wait for it or raise register.lock_timeout_s"
            ) from None
        except OSError as exc:  # a file in the way, no permission, a read-only volume
            raise UserError(
                f"register.lock_dir {root}: cannot take the registry lock in {folder} ({exc.strerror or exc}); "
                "point register.lock_dir at a writable folder"
            ) from None
        yield


def base_models(base: Path | None, config: RegisterConfig) -> tuple[dict[str, str], dict[str, str], dict[str, str]]:
    """``(model_config, artifacts, tags)`` for the base models: references from ``config.base_models``, or the
    ``base`` folder's sdxl/ and mllm/ bundled as artifacts (never an absolute local path in the model)."""
    from easyref.sampler import base_paths

    if config.base_models is not None:
        refs = {p: str(config.base_models[p]) for p in BASE_PARTS}
        return refs, {}, {f"base.{p}": ref for p, ref in refs.items()}
    folders = dict(zip(BASE_PARTS, base_paths(base or Path("models/tiny")), strict=True))
    size = sum(f.stat().st_size for folder in folders.values() for f in folder.rglob("*") if f.is_file())
    if size > config.bundle_base_max_mb * 2**20:
        raise UserError(
            f"{base}: the base models are {size / 2**30:.1f} GiB, over register.bundle_base_max_mb "
            f"({config.bundle_base_max_mb:.0f} MB) to bundle with every version; record them by reference instead: "
            "register.base_models: {sdxl: 'org/name@<revision>', mllm: 'org/name@<revision>'} (or URIs)"
        )
    tags = {f"base.{p}": f"bundled (sha256 {checkpoint_sha256(f)})" for p, f in folders.items()}
    return {p: "bundled" for p in BASE_PARTS}, {p: str(f) for p, f in folders.items()}, tags


def _validate_serving(model_uri: str) -> None:
    """Load the logged model as ``mlflow models serve`` would and predict its input example; raise on failure."""
    from mlflow.models import convert_input_example_to_serving_input, validate_serving_input

    serving_input = convert_input_example_to_serving_input(input_example())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # deprecated in favour of mlflow.models.predict (env-based)
        validate_serving_input(model_uri, serving_input)


@dataclass(frozen=True)
class Submission:
    """Everything a new version is made of, checked before the registry is touched."""

    checkpoint: Path
    sha: str
    metrics: dict[str, float]
    tags: dict[str, str]
    bases: tuple[dict[str, str], dict[str, str], dict[str, str]]
    """``(model_config, artifacts, tags)`` of the base models (see :func:`base_models`)."""
    config: RegisterConfig


def headline_metrics(metrics: dict[str, float], config: RegisterConfig) -> dict[str, float]:
    """The metrics a version carries as ``metric.*`` tags: EasyRef's scores on the primary section (unprefixed
    ``easyref.*``: means and confidence bounds), ``num_samples`` and every metric a gate rule names. The other
    sections, slices and baselines (a few hundred numbers) stay in the version's run (its ``run_id`` tag)."""
    gate = {rule.metric for rule in config.gate}
    return {k: v for k, v in metrics.items() if k in gate or k == "num_samples" or k.startswith("easyref.")}


def _log_and_register(client: MlflowClient, sub: Submission) -> ModelVersion:
    """Log the pyfunc model in a run, check it serves, create the version with its tags, mark it ready."""
    checkpoint, sha, metrics, tags, config = sub.checkpoint, sub.sha, sub.metrics, sub.tags, sub.config
    refs, base_artifacts, base_tags = sub.bases
    name = config.model_name
    run_tags = {SHA_TAG: sha, "easyref.step": "register", "mlflow.source.git.commit": tags["git_commit"]}
    with tempfile.TemporaryDirectory() as tmp, stage_run("register", config.experiment, run_tags) as run:
        code = Path(tmp) / "easyref_model.py"
        code.write_text(MODEL_CODE)
        mlflow.set_tags({**run_tags, **tags, **base_tags})
        mlflow.log_metrics(metrics)
        with warnings.catch_warnings():  # the example is checked below, by validate_serving_input
            warnings.filterwarnings("ignore", message=".*input example was not provided")
            info = mlflow.pyfunc.log_model(
                name=MODEL_ARTIFACT,
                python_model=str(code),
                code_paths=[easyref_code_path()],
                artifacts={"checkpoint": str(checkpoint), **base_artifacts},
                model_config={**refs, SHA_TAG: sha},
                signature=model_signature(),
                pip_requirements=pip_requirements(),
            )
        try:
            _validate_serving(info.model_uri)
        except Exception as exc:  # noqa: BLE001 - whatever broke, the model must not be registered
            raise RuntimeError(f"the logged model failed to load or predict on its input example: {exc}") from exc
        run_id = run.info.run_id
    version_tags = {SHA_TAG: sha, "run_id": run_id, **tags, **base_tags}
    version_tags.update({f"{METRIC_PREFIX}{k}": repr(v) for k, v in headline_metrics(metrics, config).items()})
    version = mlflow.register_model(info.model_uri, name, await_registration_for=300, tags=version_tags)
    client.update_model_version(name, version.version, description=_describe(checkpoint, sha, metrics, refs, tags))
    client.set_model_version_tag(name, version.version, STATUS_TAG, READY)
    return client.get_model_version(name, version.version)


def _describe(checkpoint: Path, sha: str, metrics: dict[str, float], refs: dict[str, str], tags: dict) -> str:
    shown = {k: round(v, 4) for k, v in metrics.items() if k.count(".") == 1 and k.startswith("easyref.")}
    return (
        f"Checkpoint {checkpoint.name} (sha256 {sha[:12]}), git {tags.get('git_commit', '?')[:12]}, evaluated on "
        f"split {tags.get('eval.split_sha256', '?')[:12]}: {json.dumps(shown)}. Base models: "
        + ", ".join(f"{p} {r}" for p, r in refs.items())
    )


def _search_sha(client: MlflowClient, name: str, sha: str) -> list[ModelVersion]:
    """Every version of ``name`` tagged with checkpoint ``sha``, complete or not."""
    return client.search_model_versions(f"name = '{name}' and tags.{SHA_TAG} = '{sha}'")


def find_ready_version(client: MlflowClient, name: str, sha: str) -> ModelVersion | None:
    """The complete version holding checkpoint ``sha``, if any (incomplete leftovers are ignored)."""
    ready = [v for v in _search_sha(client, name, sha) if v.tags.get(STATUS_TAG) == READY]
    return min(ready, key=lambda v: int(v.version)) if ready else None


def _versions_with_sha(client: MlflowClient, name: str, sha: str, quiet: bool = False) -> set[str]:
    try:
        return {v.version for v in _search_sha(client, name, sha)}
    except Exception:  # noqa: BLE001
        if quiet:
            return set()
        raise


def _model_exists(client: MlflowClient, name: str) -> bool:
    from mlflow.exceptions import MlflowException

    try:
        client.get_registered_model(name)
        return True
    except MlflowException as exc:
        if exc.error_code == "RESOURCE_DOES_NOT_EXIST":
            return False
        raise


def _create_version(client: MlflowClient, sub: Submission, rerun: str) -> ModelVersion:
    """:func:`_log_and_register`, deleting a half-made version on failure (best effort)."""
    name, sha = sub.config.model_name, sub.sha
    before = _versions_with_sha(client, name, sha)
    try:
        if not _model_exists(client, name):
            with contextlib.suppress(Exception):  # a concurrent creator may win; its model is as good
                client.create_registered_model(name, description=MODEL_DESCRIPTION)
        return _log_and_register(client, sub)
    except Exception as exc:  # noqa: BLE001 - S3, HTTP and database errors all mean the same here
        leftovers = [v for v in _versions_with_sha(client, name, sha, quiet=True) if v not in before]
        for version in leftovers:
            with contextlib.suppress(Exception):
                client.delete_model_version(name, version)
        raise UserError(
            f"registering {sub.checkpoint} failed ({type(exc).__name__}: {exc}); no alias was changed; {rerun}"
        ) from exc


def register(
    checkpoint: Path,
    metrics_file: Path,
    config: RegisterConfig,
    base: Path | None = None,
    params_file: Path | None = None,
    promote_: bool = False,
    tracking_uri: str | None = None,
) -> Registration:
    """Register ``checkpoint`` (idempotently), point ``challenger`` at it and optionally promote it.

    Refused before anything is written: a checkpoint whose sha256 differs from the one its evaluation recorded,
    non-finite metrics, and (with ``promote_``) gate metrics missing from metrics.json.
    """
    from mlflow import MlflowClient

    from easyref.model import read_checkpoint_config

    read_checkpoint_config(checkpoint)
    metrics = read_metrics(metrics_file)
    if promote_:
        require_gate_metrics(metrics_file, metrics, config.gate)
    sha = checkpoint_sha256(checkpoint)
    evaluation = verify_evaluated(checkpoint, sha, metrics_file)
    bases = base_models(base, config)
    tags = provenance(checkpoint, evaluation, params_file)
    uri = resolve_tracking_uri(tracking_uri)
    mlflow.set_tracking_uri(uri)
    client = MlflowClient(uri)
    name = config.model_name
    rerun = f"re-run `easyref register --checkpoint {checkpoint} --metrics {metrics_file} --model-name {name}`"
    check_sealed_by_run(client, sha, metrics_file, rerun)
    with registry_lock(uri, name, config):
        try:
            existing = find_ready_version(client, name, sha) if _model_exists(client, name) else None
        except Exception as exc:  # noqa: BLE001 - any transport error: nothing was changed
            raise UserError(f"cannot reach the MLflow registry at {uri} ({exc}); nothing was changed; {rerun}") from exc
        created = existing is None
        version = existing or _create_version(client, Submission(checkpoint, sha, metrics, tags, bases, config), rerun)
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
