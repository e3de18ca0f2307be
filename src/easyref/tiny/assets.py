"""The packaged pretrained tiny parts: where they live, their manifests, and installing them into a model tree.

It imports no torch and no other project module at import time (the atomic writer only when publishing):
:mod:`easyref.tiny_models` and every pretraining module import it, never the other way round.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Iterable
from pathlib import Path
from typing import Any

ASSETS = Path(__file__).resolve().parent.parent / "assets"
MANIFEST = "pretrain.json"
PREVIEW = "preview.png"
"""A picture of what the part can do, written beside it; not part of the checksummed model."""


def asset(part: str) -> Path:
    """The packaged folder of a pretrained part (``tiny_sdxl``, ``tiny_clip``, ...)."""
    return ASSETS / f"tiny_{part}"


NOT_MODEL = (MANIFEST, PREVIEW, "checksums.sha256")
"""Files of an asset folder that are not part of the model (the last is the atomic writer's own record)."""


def file_checksums(folder: Path) -> dict[str, str]:
    """sha256 of every model file under ``folder`` (not :data:`NOT_MODEL`), by relative path."""
    from easyref.data.parquet import sha256_file

    return {
        str(p.relative_to(folder)): sha256_file(p)
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name not in NOT_MODEL
    }


def code_fingerprint(files: Iterable[str | Path]) -> str:
    """sha256 over the source files that shape a pretrained part."""
    digest = hashlib.sha256()
    for f in files:
        digest.update(Path(f).read_bytes())
    return digest.hexdigest()


def forget_source_path(config_file: Path) -> None:
    """Drop ``_name_or_path`` (the temporary folder the model was loaded from) from a saved config."""
    config = json.loads(config_file.read_text())
    if config.pop("_name_or_path", None) is not None:
        config_file.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def read_manifest(folder: Path) -> dict[str, Any]:
    from easyref.errors import UserError

    path = folder / MANIFEST
    if not path.is_file():
        raise UserError(f"{folder}: no pretrained tiny part ({MANIFEST} missing); run `easyref pretrain-tiny`")
    return json.loads(path.read_text())


def publish(staged: Path, out: Path, manifest: dict[str, Any]) -> dict[str, Any]:
    """Write a trained part's files (``staged``) and its sealed manifest (with every file's sha256) to ``out``,
    through the atomic folder writer; returns the manifest."""
    from easyref.atomic import atomic_folder

    with atomic_folder(out) as writer:
        shutil.copytree(staged, writer.path, dirs_exist_ok=True)
        manifest = {**manifest, "files": file_checksums(writer.path)}
        writer.write_text(MANIFEST, json.dumps(manifest, indent=2) + "\n")
    return manifest


def install(source: Path, target: Path, parts: Iterable[str] | None = None) -> None:
    """Copy a packaged part over a random one: the whole folder, or only the named sub-folders."""
    read_manifest(source)
    if parts is None:
        shutil.rmtree(target, ignore_errors=True)
        shutil.copytree(source, target, ignore=shutil.ignore_patterns(*NOT_MODEL))
        return
    for part in parts:
        shutil.rmtree(target / part, ignore_errors=True)
        shutil.copytree(source / part, target / part, ignore=shutil.ignore_patterns(*NOT_MODEL))
