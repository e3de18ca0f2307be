"""An optional on-disk cache of the frozen conditioning: VAE posteriors of the targets and SDXL text states.

With ``train.cache_dir`` set, :class:`~easyref.train.recipe.Conditioner` reads each target's VAE posterior and each
caption's text states from here instead of running the VAE and both text encoders again. The latent entry is the
posterior's *parameters* (mean and log-variance, as the VAE returns them), not a sampled latent: the step still
draws its noise ``eps`` from the step's generator, so a cached run draws and trains exactly what an uncached run does.

Layout: ``CACHE/latents/<vae fingerprint>/<key[:2]>/<key>.safetensors`` and the same under ``text/``.

* Latent key: sha256 of the target tensor's bytes (after the dataset's deterministic resize and crop), its shape
  and dtype. Text key: sha256 of the caption as encoded (after the cut to 77 tokens).
* Fingerprints: sha256 over the content of the files that determine the values (``vae/`` for latents;
  ``text_encoder/``, ``text_encoder_2/``, ``tokenizer/``, ``tokenizer_2/`` for text), the modules' dtype and the
  device type. A changed base never reads another base's entries. File hashes are memoised by path, size and
  modification time in ``CACHE/file_hashes.json``, so a 2 GB base is hashed once.
* Writes are atomic (a temporary file, then ``os.replace``): ranks and processes can share one folder. Every entry
  carries the sha256 of its tensors, its own key and its store's fingerprint; an entry that is unreadable,
  truncated, does not match its checksum, or was written for another key or fingerprint (a file copied or moved
  under another name) is recomputed and overwritten, and counted (``cache_corrupt``).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import safetensors.torch
import torch

from easyref.data.parquet import sha256_file
from easyref.errors import UserError

FORMAT = "2"  # 2: entries record their key and fingerprint
LATENT_PARTS = ("vae",)
TEXT_PARTS = ("text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2")
HASH_MEMO = "file_hashes.json"


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


class FileHashes:
    """sha256 of files, memoised in a JSON file by (resolved path, size, mtime_ns)."""

    def __init__(self, memo: Path):
        self.memo = memo
        try:
            self.table: dict[str, str] = json.loads(memo.read_text())
        except (OSError, ValueError):
            self.table = {}
        self.hashed = 0
        """Files actually read by this instance (tests check that a second run reads none)."""

    def __call__(self, path: Path) -> str:
        st = path.stat()
        key = f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}"
        if key not in self.table:
            self.table[key] = sha256_file(path)
            self.hashed += 1
        return self.table[key]

    def save(self) -> None:
        """Write the memo when this instance hashed anything (a read-only cache folder still works, only slower)."""
        if self.hashed:
            with contextlib.suppress(OSError):
                _atomic_write_bytes(self.memo, json.dumps(self.table, indent=0, sort_keys=True).encode())


def fingerprint(base: Path, parts: tuple[str, ...], dtype: Any, device_type: str, hashes: FileHashes) -> str:
    """sha256 over the contents of every file under ``base/<part>`` (relative names included), dtype and device."""
    digest = hashlib.sha256(f"easyref-conditioning-cache {FORMAT} {dtype} {device_type}".encode())
    for part in parts:
        folder = base / part
        if not folder.is_dir():
            raise UserError(f"train.cache_dir: the base has no folder {folder}; the cache needs a local base folder")
        for path in sorted(p for p in folder.rglob("*") if p.is_file()):
            digest.update(f"{path.relative_to(base).as_posix()}\0{hashes(path)}\0".encode())
    return digest.hexdigest()[:20]


def _tensor_digest(tensors: dict[str, torch.Tensor]) -> str:
    """sha256 over each named tensor's name, shape, dtype and bytes."""
    digest = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        digest.update(f"{name}|{tuple(t.shape)}|{t.dtype}|".encode())
        digest.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()


def target_key(target: torch.Tensor) -> str:
    """The latent key of one target: its pixel bytes, shape and dtype."""
    return _tensor_digest({"target": target})


def caption_key(caption: str) -> str:
    return hashlib.sha256(caption.encode("utf-8")).hexdigest()


@dataclass
class EntryStore:
    """One kind of entry (latents or text) under one fingerprint: atomic writes, checked reads, counts."""

    root: Path
    fingerprint: str = ""
    """The base's fingerprint for this kind of entry; each entry records it and the key it was written for."""
    hits: int = 0
    misses: int = 0
    corrupt: int = 0
    names: tuple[str, ...] = field(default=())

    def path(self, key: str) -> Path:
        return self.root / key[:2] / f"{key}.safetensors"

    def get(self, key: str) -> dict[str, torch.Tensor] | None:
        path = self.path(key)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            return None
        try:  # any unreadable entry (truncated, garbage, other tensors) is recomputed, not fatal
            header = json.loads(data[8 : 8 + int.from_bytes(data[:8], "little")])
            tensors = safetensors.torch.load(data)
            meta = header["__metadata__"]
            if set(tensors) != set(self.names) or meta["sha256"] != _tensor_digest(tensors):
                raise ValueError("contents do not match the recorded checksum")
            if meta["key"] != key or meta["fingerprint"] != self.fingerprint:
                raise ValueError("an entry written for another key or base")
        except Exception:
            self.corrupt += 1
            return None
        return tensors

    def put(self, key: str, tensors: dict[str, torch.Tensor]) -> None:
        tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
        metadata = {"sha256": _tensor_digest(tensors), "format": FORMAT, "key": key, "fingerprint": self.fingerprint}
        _atomic_write_bytes(self.path(key), safetensors.torch.save(tensors, metadata=metadata))

    def lookup(self, keys: list[str]) -> list[dict[str, torch.Tensor]] | None:
        """Every key's entry, or ``None`` if any is missing (all are then counted as misses)."""
        found = [self.get(k) for k in keys]
        if any(f is None for f in found):
            self.misses += len(keys)
            return None
        self.hits += len(keys)
        return found  # type: ignore[return-value]


class ConditioningCache:
    """The cache of one base (see the module docstring); :meth:`open` builds it from the base's parts."""

    def __init__(self, root: Path, latent_fp: str, text_fp: str):
        self.root = root
        self.latents = EntryStore(root / "latents" / latent_fp, latent_fp, names=("parameters",))
        self.text = EntryStore(root / "text" / text_fp, text_fp, names=("text", "pooled"))
        self.files_hashed = 0
        """Base files :meth:`open` read to fingerprint them (0 when every hash came from the memo)."""

    @classmethod
    def open(cls, root: str | Path, base: Any) -> ConditioningCache:
        """The cache for :class:`~easyref.base_models.BaseModels` ``base`` (loaded from a local folder)."""
        root = Path(root)
        try:
            root.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise UserError(f"train.cache_dir {root}: cannot create it ({exc}); choose a writable folder") from None
        if base.sdxl is None or not Path(base.sdxl).is_dir():
            raise UserError(f"train.cache_dir: the base {base.sdxl} is not a local folder; the cache needs one")
        hashes, sdxl, device = FileHashes(root / HASH_MEMO), Path(base.sdxl), base.device.type
        latent_fp = fingerprint(sdxl, LATENT_PARTS, base.vae.dtype, device, hashes)
        text_fp = fingerprint(sdxl, TEXT_PARTS, base.text_encoder.dtype, device, hashes)
        hashes.save()
        cache = cls(root, latent_fp, text_fp)
        cache.files_hashed = hashes.hashed
        return cache

    def counts(self) -> dict[str, int]:
        """Hits, misses and corrupt entries (recomputed) since this cache was opened, latents and text together."""
        stores = (self.latents, self.text)
        return {
            "cache_hits": sum(s.hits for s in stores),
            "cache_misses": sum(s.misses for s in stores),
            "cache_corrupt": sum(s.corrupt for s in stores),
        }


def record_cache_counts(tracker: Any, cache: ConditioningCache | None, env: Any, step: int) -> None:
    """Every rank: sum the cache counts over the ranks; rank 0 logs them as MLflow metrics and prints one line."""
    if cache is None:
        return
    from easyref.train import distributed as D

    counts = cache.counts()
    total = dict(zip(counts, D.sum_counts(list(counts.values()), env), strict=True))
    if env.is_main:
        tracker.log_metrics(total, step=step)
        print(
            f"conditioning cache {cache.root}: {total['cache_hits']} hits, {total['cache_misses']} misses"
            + (f", {total['cache_corrupt']} corrupt entries recomputed" if total["cache_corrupt"] else "")
        )
