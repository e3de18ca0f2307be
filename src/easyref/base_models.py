"""The base models: downloaded from the Hugging Face Hub at pinned revisions, and loaded once (:class:`BaseModels`).

Downloading (``easyref base-models``, below) fills the project's model layout from the hub.

``params.yaml`` names each part of the layout under ``profile.real_models``: a hub repository, a **commit** (never
a branch, so the same command gives the same bytes next year), the files to fetch (glob patterns; safetensors only)
and optionally a ``variant`` (``fp16``): where the repository has ``X.fp16.safetensors`` beside ``X.safetensors``,
only the variant is fetched, and it is laid out under the plain name so the library's ``from_pretrained`` calls
load it unchanged. The result is the layout ``easyref tiny-models`` writes::

  OUT/sdxl/  OUT/mllm/  OUT/clip/  OUT/dino/  OUT/ip_adapter/

Downloads go to ``OUT/.hub/<part>/`` (``huggingface_hub.snapshot_download`` with a local folder) and are then
hard-linked into place. An interrupted run is resumed by running the same command again: files already complete
are checked (one HEAD request each) and not fetched again, and a connection dropped in the middle of a file is
resumed with an HTTP range request. ``HF_ENDPOINT`` points at a mirror, ``HF_TOKEN`` at your credentials.

Nothing is trusted beyond the pinned commit: every fetched file is checked against the hash the hub's listing
records for that commit (the LFS SHA-256 for weights, the git blob id for the rest); a file with other bytes is
deleted and the run stops in one line (the next run fetches it again). A listed file name that would lead out of
the download folder (``../``, absolute) stops the run before anything is fetched, naming the file.

  easyref base-models --profile real --out models/real
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from easyref.atomic import atomic_folder
from easyref.config import from_dict, load_yaml
from easyref.errors import UserError
from easyref.locking import FolderLocked, output_lock

HELP = "download the real base models at pinned hub revisions (resumable)"
PARTS = ("sdxl", "mllm", "clip", "dino", "ip_adapter")
STAMP = ".complete"


@dataclass(kw_only=True)
class HubModel:
    """One part of the model layout, fetched from a hub repository."""

    repo: str
    """Hub repository id, e.g. ``stabilityai/stable-diffusion-xl-base-1.0``."""
    revision: str
    """The commit to fetch (40 hex digits), quoted in YAML (an all-digit hash would otherwise read as a number)."""
    files: list[str] = field(default_factory=list)
    """Glob patterns of the files to fetch (``*.safetensors``, ``unet/*.json``); weights must be safetensors."""
    variant: str = ""
    """Prefer ``X.<variant>.safetensors`` over ``X.safetensors`` where both exist (e.g. ``fp16``)."""

    def __post_init__(self) -> None:
        if len(self.revision) != 40 or any(c not in "0123456789abcdef" for c in self.revision):
            raise ValueError(f"revision must be a full commit hash (40 hex digits), got {self.revision!r}")
        if not self.files:
            raise ValueError("files must list at least one pattern")
        for pattern in self.files:
            if pattern.endswith((".bin", ".pt", ".pth", ".ckpt", ".msgpack", ".h5")):
                raise ValueError(f"files: {pattern!r} is not safetensors; only safetensors weights are fetched")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--profile", default="real", choices=("real",), help="which models (only 'real')")
    parser.add_argument("--out", type=Path, default=Path("models/real"), help="output folder (default models/real)")
    parser.add_argument(
        "--params", type=Path, default=Path("params.yaml"), help="parameters file (profile.real_models)"
    )
    parser.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated subset of {', '.join(PARTS)}")
    parser.add_argument("--workers", type=int, default=8, help="parallel downloads per part (default 8)")


def load_real_models(params: Path) -> dict[str, HubModel]:
    section = (load_yaml(params).get("profile") or {}).get("real_models")
    where = f"{params}: profile.real_models"
    if not isinstance(section, dict):
        raise UserError(f"{where}: missing; add a mapping of {', '.join(PARTS)} to {{repo, revision, files}}")
    unknown = sorted(set(section) - set(PARTS))
    if unknown:
        raise UserError(f"{where}: unknown part(s) {', '.join(unknown)}; valid parts: {', '.join(PARTS)}")
    return {name: from_dict(HubModel, value, f"{where}.{name}") for name, value in section.items()}


def select_files(repo_files: list[str], model: HubModel) -> dict[str, str]:
    """``{file in the repository: path in the layout}`` for the files ``model`` asks for."""
    wanted = [f for f in repo_files if any(fnmatch.fnmatchcase(f, p) for p in model.files)]
    wanted = [f for f in wanted if not f.endswith((".bin", ".pt", ".pth", ".ckpt", ".msgpack", ".h5"))]
    chosen: dict[str, str] = {}
    marker = f".{model.variant}.safetensors" if model.variant else None
    for name in wanted:
        if marker and name.endswith(marker):
            chosen[name] = name[: -len(marker)] + ".safetensors"
        elif marker and name.endswith(".safetensors") and name[: -len(".safetensors")] + marker in wanted:
            continue  # the variant of this file is fetched instead
        else:
            chosen.setdefault(name, name)
    return chosen


def fetch_part(name: str, model: HubModel, out: Path, workers: int = 8) -> Path:
    """Download one part into ``out/.hub/name`` and link it into ``out/name``; returns ``out/name``."""
    from huggingface_hub import snapshot_download

    target, staging = out / name, out / ".hub" / name
    record = {"repo": model.repo, "revision": model.revision, "files": model.files, "variant": model.variant}
    if (target / STAMP).is_file() and json.loads((target / STAMP).read_text()) == record:
        return target
    listing = repo_listing(name, model)
    files = select_files(sorted(listing), model)
    if not files:
        raise UserError(f"{name}: none of the files {model.files} exist in {model.repo}@{model.revision[:12]}")
    snapshot_download(
        model.repo, revision=model.revision, local_dir=staging, allow_patterns=sorted(files), max_workers=workers
    )
    for source in sorted(files):
        verify_file(name, model, staging / source, listing[source])
    with atomic_folder(target, required=(STAMP,)) as writer:
        for source, dest in files.items():
            path = writer.path / dest
            path.parent.mkdir(parents=True, exist_ok=True)
            try:
                os.link(staging / source, path)
            except OSError:  # another file system: copy
                shutil.copy2(staging / source, path)
        writer.write_text(STAMP, json.dumps(record) + "\n")
    return target


def repo_listing(name: str, model: HubModel) -> dict[str, Any]:
    """``{path: RepoFile}`` of the files at the pinned revision, with the hashes the hub records (``lfs.sha256`` for
    LFS files, the git blob id for the others); a name that would lead out of the download folder is refused."""
    from huggingface_hub import HfApi, RepoFile

    listing = {
        entry.path: entry
        for entry in HfApi().list_repo_tree(model.repo, revision=model.revision, recursive=True)
        if isinstance(entry, RepoFile)
    }
    for path in sorted(listing):
        segments = path.replace("\\", "/").split("/")
        if path.startswith("/") or "\0" in path or any(s in ("", ".", "..") for s in segments):
            raise UserError(
                f"{name}: {model.repo}@{model.revision[:12]} lists a file named {path!r}, which would lead out of the "
                f"download folder; nothing was fetched (check the repository, and HF_ENDPOINT if you use a mirror)"
            )
    return listing


def verify_file(name: str, model: HubModel, path: Path, entry: Any) -> None:
    """Refuse a downloaded file whose bytes differ from the hub's recorded hash (the revision is a commit, so the
    record is fixed); the file is deleted, so that the next run fetches it again."""
    import hashlib

    from easyref.data.parquet import sha256_file

    if entry.lfs is not None:
        kind, expected, got = "sha256", str(entry.lfs.sha256), sha256_file(path)
    else:  # a git blob id: sha1 over "blob <size>\0" + the bytes
        digest = hashlib.sha1(b"blob %d\0" % path.stat().st_size, usedforsecurity=False)
        with open(path, "rb") as f:
            while chunk := f.read(1 << 20):
                digest.update(chunk)
        kind, expected, got = "git blob id", str(entry.blob_id), digest.hexdigest()
    if got != expected:
        path.unlink()
        raise UserError(
            f"{name}: {entry.path} of {model.repo}@{model.revision[:12]} has {kind} {got}, but the hub records "
            f"{expected}; the file was deleted: run the same command again (if it repeats, the hub, a mirror or a "
            f"proxy serves other bytes than the commit holds)"
        )


def run(args: argparse.Namespace) -> int:
    models = load_real_models(args.params)
    parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    bad = [p for p in parts if p not in models]
    if bad:
        raise UserError(f"--parts: {', '.join(bad)} not in {args.params}: profile.real_models ({', '.join(models)})")
    import httpx2
    from huggingface_hub import constants
    from huggingface_hub.errors import HfHubHTTPError, RepositoryNotFoundError, RevisionNotFoundError

    try:
        with output_lock(args.out, "easyref base-models"):
            for name in parts:
                model = models[name]
                print(f"{name}: {model.repo}@{model.revision[:12]}", flush=True)
                try:
                    fetch_part(name, model, args.out, args.workers)
                except (RepositoryNotFoundError, RevisionNotFoundError) as exc:
                    raise UserError(
                        f"{args.params}: profile.real_models.{name}: {model.repo}@{model.revision} not found on "
                        f"{constants.ENDPOINT} ({type(exc).__name__}); fix repo / revision (or set HF_TOKEN)"
                    ) from None
            (args.out / STAMP).write_text(json.dumps({n: models[n].revision for n in parts}) + "\n")
    except FolderLocked as exc:
        raise UserError(str(exc)) from None
    except (HfHubHTTPError, httpx2.HTTPError, OSError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"download stopped: {first}; run the same command again to resume") from None
    print(f"base models in {args.out}: {', '.join(parts)}")
    return 0


# -- loading: one bundle of the frozen base parts ---------------------------------------------------------------------

PIPELINE_OPTIONS = ("force_zeros_for_empty_prompt", "add_watermarker")
"""Keys of an SDXL ``model_index.json`` that configure the pipeline itself rather than name a component."""


@dataclass(eq=False)
class BaseModels:
    """The frozen base parts the sampler, the trainer and the evaluator share, loaded once and placed once.

    SDXL's VAE, both text encoders and their tokenizers, its noise schedule (``noise_scheduler``: DDPM, for
    training noise; ``sample_scheduler``: DDIM, for sampling; both from the base's ``scheduler_config.json``) and the
    MLLM's :class:`~easyref.model.ReferenceProcessor`. :meth:`load` reads them from an SDXL folder (or hub id) and an
    MLLM folder and puts every module on one device in one dtype, frozen and in eval mode. The trained parts (the
    UNet with its adapter, the MLLM) belong to :class:`~easyref.model.EasyRef`; :meth:`pipeline` wraps these parts
    and a given UNet in a ``StableDiffusionXLPipeline`` without loading anything, and :meth:`load_unet` gives a
    plain base UNet to a baseline that needs one.
    """

    vae: Any
    text_encoder: Any
    text_encoder_2: Any
    tokenizer: Any
    tokenizer_2: Any
    scheduler_config: dict[str, Any]
    processor: Any = None
    """The reference processor (``None`` for a consumer that reads no references, e.g. an SDXL baseline)."""
    sdxl: str | Path | None = None
    """Where the SDXL parts came from (for :meth:`load_unet`)."""
    torch_dtype: Any = None
    """The dtype the parts were loaded in (``None``: as stored); :meth:`load_unet` uses it too."""
    pipeline_options: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        from diffusers import DDIMScheduler, DDPMScheduler

        for module in (self.vae, self.text_encoder, self.text_encoder_2):
            module.requires_grad_(False).eval()
        self.noise_scheduler = DDPMScheduler.from_config(self.scheduler_config)
        self.sample_scheduler = DDIMScheduler.from_config(self.scheduler_config)
        self.text = self.pipeline(unet=None)
        """A pipeline without UNet, for ``encode_prompt`` and the image post-processing."""

    @classmethod
    def load(
        cls,
        sdxl: str | Path,
        mllm: str | Path | None = None,
        model_config: Any = None,
        *,
        device: str | Any = "cpu",
        torch_dtype: Any = None,
    ) -> BaseModels:
        """Load the parts from ``sdxl`` (and the reference processor from ``mllm`` with ``model_config``'s pixel
        limits, instruction and aggregation) onto ``device`` in ``torch_dtype`` (``None``: as stored)."""
        from easyref.quiet import quiet_pil_fallback

        quiet_pil_fallback()  # before diffusers imports CLIPImageProcessor
        from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionXLPipeline
        from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

        from easyref.model import ModelConfig, ReferenceProcessor, base_model_errors

        with base_model_errors("base VAE", Path(sdxl) / "vae"):
            vae = AutoencoderKL.from_pretrained(sdxl, subfolder="vae", torch_dtype=torch_dtype)
        with base_model_errors("base text encoders", sdxl):
            encoders = [
                CLIPTextModel.from_pretrained(sdxl, subfolder="text_encoder", torch_dtype=torch_dtype),
                CLIPTextModelWithProjection.from_pretrained(sdxl, subfolder="text_encoder_2", torch_dtype=torch_dtype),
            ]
            tokenizers = [CLIPTokenizer.from_pretrained(sdxl, subfolder=f) for f in ("tokenizer", "tokenizer_2")]
        index = StableDiffusionXLPipeline.load_config(sdxl)
        processor = None
        if mllm is not None:
            processor = ReferenceProcessor.from_pretrained(mllm, model_config or ModelConfig())
        return cls(
            vae=vae.to(device),
            text_encoder=encoders[0].to(device),
            text_encoder_2=encoders[1].to(device),
            tokenizer=tokenizers[0],
            tokenizer_2=tokenizers[1],
            scheduler_config=DDPMScheduler.load_config(sdxl, subfolder="scheduler"),
            processor=processor,
            sdxl=sdxl,
            torch_dtype=torch_dtype,
            pipeline_options={k: index[k] for k in PIPELINE_OPTIONS if k in index},
        )

    @property
    def device(self) -> Any:
        return self.vae.device

    @property
    def vae_scale_factor(self) -> int:
        return self.text.vae_scale_factor

    def pipeline(self, unet: Any, scheduler: Any = None, **parts: Any) -> Any:
        """A ``StableDiffusionXLPipeline`` over these parts and ``unet`` (``scheduler``: default the DDIM one;
        ``parts``: e.g. ``feature_extractor``); nothing is loaded or copied."""
        from easyref.quiet import quiet_pil_fallback

        quiet_pil_fallback()  # before diffusers imports CLIPImageProcessor
        from diffusers import StableDiffusionXLPipeline

        return StableDiffusionXLPipeline(
            vae=self.vae,
            text_encoder=self.text_encoder,
            text_encoder_2=self.text_encoder_2,
            tokenizer=self.tokenizer,
            tokenizer_2=self.tokenizer_2,
            unet=unet,
            scheduler=scheduler or self.sample_scheduler,
            **{**self.pipeline_options, **parts},
        )

    def load_unet(self) -> Any:
        """A fresh base UNet from :attr:`sdxl`, on the bundle's device and dtype (for a baseline; EasyRef's UNet is
        built by :func:`~easyref.model.load_model`)."""
        from diffusers import UNet2DConditionModel

        from easyref.model import base_model_errors

        if self.sdxl is None:
            raise ValueError("this bundle was not loaded from a folder; pass a UNet instead")
        with base_model_errors("base UNet", Path(self.sdxl) / "unet"):
            unet = UNet2DConditionModel.from_pretrained(self.sdxl, subfolder="unet", torch_dtype=self.torch_dtype)
        return unet.to(self.device)

    def encode_prompt(self, prompts: list[str], **kw: Any) -> tuple[Any, Any, Any, Any]:
        """SDXL's prompt encoding (both text encoders), as ``StableDiffusionXLPipeline.encode_prompt``."""
        return self.text.encode_prompt(prompt=prompts, device=self.device, **kw)
