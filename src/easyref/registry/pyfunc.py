"""The EasyRef sampler as an MLflow pyfunc model: input checks, base-model resolution, signature, requirements.

The model travels: the ``easyref`` package is bundled with it (``code_paths``), the checkpoint is an artifact, the
base models are either bundled artifacts or references resolvable anywhere (``org/name@revision`` on the Hugging Face
hub, or a URI MLflow can download), and its requirements pin the serving dependencies to the versions it was logged
with.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import io
import math
import numbers
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import mlflow
import pandas as pd

from easyref.captions import MAX_PROMPT_CHARS
from easyref.registry.config import BASE_PARTS

if TYPE_CHECKING:
    from PIL import Image

# Requests outside these bounds get HTTP 400 with a message naming the field (never a 200 with garbage or a timeout).
MAX_ROWS = 16
MAX_STEPS = 200
MAX_REFERENCES = 32
MAX_REFERENCE_B64_CHARS = 16 * 1024 * 1024
MAX_REFERENCE_PIXELS = 16_000_000
MAX_SIDE = 2048
MAX_GUIDANCE = 50.0

DEFAULT_PARAMS: dict[str, Any] = {
    "num_inference_steps": 30,
    "guidance_scale": 7.5,
    "seed": 0,
    "negative_prompt": "",
    "height": 0,
    "width": 0,
}

SERVING_PACKAGES = (
    "mlflow",
    "torch",
    "diffusers",
    "transformers",
    "tokenizers",
    "huggingface_hub",
    "safetensors",
    "accelerate",
    "peft",
    "pillow",
    "numpy",
    "pandas",
    "pyyaml",
    "tqdm",
)

MODEL_CODE = """\
# MLflow models-from-code entry point; the easyref package travels with the model (code_paths).
import mlflow

from easyref.registry.pyfunc import EasyRefModel

mlflow.models.set_model(EasyRefModel())
"""


class BadRequest(mlflow.exceptions.MlflowException):
    """A request the model refuses; the scoring server answers it with HTTP 400."""

    def __init__(self, message: str) -> None:
        from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE

        super().__init__(message, error_code=INVALID_PARAMETER_VALUE)


def encode_png(image: Image.Image) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode("ascii")


def decode_png(data: str, where: str = "image") -> Image.Image:
    from PIL import Image, UnidentifiedImageError

    if not isinstance(data, str) or len(data) > MAX_REFERENCE_B64_CHARS:
        raise BadRequest(f"{where}: expected a base64 image string of at most {MAX_REFERENCE_B64_CHARS} characters")
    try:
        with Image.open(io.BytesIO(base64.b64decode(data, validate=True))) as im:
            if im.width * im.height > MAX_REFERENCE_PIXELS:
                raise BadRequest(f"{where}: {im.width}x{im.height} is over {MAX_REFERENCE_PIXELS} pixels")
            return im.convert("RGB")
    except (ValueError, binascii.Error, UnidentifiedImageError, OSError, Image.DecompressionBombError) as exc:
        raise BadRequest(f"{where}: not a base64-encoded image ({exc})") from exc


def check_params(params: dict[str, Any]) -> dict[str, Any]:
    """``params`` over the defaults, each within its bound; :class:`BadRequest` names the first one outside."""
    p = {**DEFAULT_PARAMS, **(params or {})}
    steps, seed, guidance = p["num_inference_steps"], p["seed"], p["guidance_scale"]
    if not _is_int(steps) or not 1 <= steps <= MAX_STEPS:
        raise BadRequest(f"num_inference_steps = {steps!r}: must be an integer from 1 to {MAX_STEPS}")
    if not _is_int(seed) or not 0 <= seed < 2**63:
        raise BadRequest(f"seed = {seed!r}: must be a non-negative integer below 2**63")
    if not isinstance(guidance, numbers.Real) or not math.isfinite(guidance) or not 0 <= guidance <= MAX_GUIDANCE:
        raise BadRequest(f"guidance_scale = {guidance!r}: must be a number from 0 to {MAX_GUIDANCE}")
    for key in ("height", "width"):
        v = p[key]
        if not _is_int(v) or not (v == 0 or (64 <= v <= MAX_SIDE and v % 8 == 0)):
            raise BadRequest(f"{key} = {v!r}: must be 0 (the model's size) or a multiple of 8 from 64 to {MAX_SIDE}")
    if not isinstance(p["negative_prompt"], str) or len(p["negative_prompt"]) > MAX_PROMPT_CHARS:
        raise BadRequest(f"negative_prompt: must be a string of at most {MAX_PROMPT_CHARS} characters")
    return {**p, **{k: int(p[k]) for k in ("num_inference_steps", "seed", "height", "width")}}


def _is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def check_rows(model_input: pd.DataFrame) -> tuple[list[str], list[list[Image.Image]]]:
    """Prompts and decoded reference groups, each checked; :class:`BadRequest` names the row and field."""
    if not 1 <= len(model_input) <= MAX_ROWS:
        raise BadRequest(f"{len(model_input)} rows: send 1 to {MAX_ROWS} rows per request")
    prompts, groups = [], []
    for i, (prompt, refs) in enumerate(zip(model_input["prompt"], model_input["references"], strict=True)):
        if not isinstance(prompt, str) or len(prompt) > MAX_PROMPT_CHARS:
            raise BadRequest(f"row {i}: 'prompt' must be a string of at most {MAX_PROMPT_CHARS} characters")
        refs = list(refs) if refs is not None else []
        if not 1 <= len(refs) <= MAX_REFERENCES:
            raise BadRequest(f"row {i}: 'references' holds {len(refs)} images; give 1 to {MAX_REFERENCES} base64 PNGs")
        prompts.append(prompt)
        groups.append([decode_png(r, f"row {i}: references[{j}]") for j, r in enumerate(refs)])
    return prompts, groups


def fetch_base(ref: str, part: str) -> str:
    """A local folder for base-model reference ``ref``: a hub ``org/name@revision`` or a URI MLflow can download."""
    if "://" in ref or ref.split(":", 1)[0] in ("runs", "models"):
        return mlflow.artifacts.download_artifacts(artifact_uri=ref)
    repo, revision = ref.rsplit("@", 1)
    if part == "sdxl":
        from easyref.quiet import quiet_pil_fallback

        quiet_pil_fallback()  # before diffusers imports CLIPImageProcessor
        from diffusers import DiffusionPipeline

        return str(DiffusionPipeline.download(repo, revision=revision))
    from huggingface_hub import snapshot_download

    patterns = ["*.json", "*.safetensors", "*.txt", "*.model", "*.jinja", "*.tiktoken"]
    return snapshot_download(repo, revision=revision, allow_patterns=patterns)


def resolve_base(model_config: dict[str, Any], artifacts: dict[str, str]) -> tuple[str, str]:
    """``(sdxl, mllm)`` folders: ``$EASYREF_BASE`` (holding sdxl/ and mllm/) if set, else bundled or fetched."""
    from easyref.sampler import base_paths

    override = os.environ.get("EASYREF_BASE")
    if override:
        sdxl, mllm = base_paths(override)
        return str(sdxl), str(mllm)
    sdxl, mllm = (artifacts[p] if p in artifacts else fetch_base(model_config[p], p) for p in BASE_PARTS)
    return sdxl, mllm


class EasyRefModel(mlflow.pyfunc.PythonModel):
    """The EasyRef sampler as an MLflow pyfunc model.

    Input: a DataFrame with ``prompt`` (str) and ``references`` (list of base64 PNG strings) per row. Params:
    ``num_inference_steps``, ``guidance_scale``, ``seed``, ``negative_prompt``, ``height``/``width`` (0 = the
    model's size). Output: a DataFrame with one base64 PNG ``image`` per input row.
    """

    def load_context(self, context: Any) -> None:
        import torch

        from easyref.sampler import EasyRefSampler
        from easyref.threads import configure_cpu_threads

        configure_cpu_threads()
        sdxl, mllm = resolve_base(context.model_config, context.artifacts)
        device = "cuda" if torch.cuda.is_available() else "cpu"
        dtype = torch.bfloat16 if device == "cuda" else None
        self.sampler = EasyRefSampler.from_pretrained(
            sdxl, mllm, checkpoint=context.artifacts["checkpoint"], device=device, torch_dtype=dtype
        )

    def predict(self, context: Any, model_input: pd.DataFrame, params: dict[str, Any] | None = None) -> pd.DataFrame:
        params = check_params(params or {})
        prompts, groups = check_rows(model_input)
        images = self.sampler(
            prompts,
            groups,
            negative_prompt=params["negative_prompt"],
            num_inference_steps=params["num_inference_steps"],
            guidance_scale=float(params["guidance_scale"]),
            height=params["height"] or None,
            width=params["width"] or None,
            generator=params["seed"],
            progress=False,
        )
        return pd.DataFrame({"image": [encode_png(im) for im in images]})


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


def input_example(checkpoint: Path | None = None) -> tuple[pd.DataFrame, dict[str, Any]]:
    """Two small synthetic reference images and a prompt; one denoising step keeps validation cheap."""
    from PIL import Image, ImageDraw

    refs = []
    for colour in ((215, 30, 35), (30, 70, 210)):
        im = Image.new("RGB", (64, 64), (250, 250, 250))
        ImageDraw.Draw(im).ellipse((16, 16, 48, 48), fill=colour)
        refs.append(encode_png(im))
    frame = pd.DataFrame({"prompt": ["a shape on a plain background"], "references": [refs]})
    return frame, {"num_inference_steps": 1}


def pip_requirements() -> list[str]:
    """The serving dependencies pinned to this environment's versions (easyref itself travels as code)."""
    from importlib.metadata import PackageNotFoundError, version

    reqs = []
    for package in SERVING_PACKAGES:
        with contextlib.suppress(PackageNotFoundError):
            reqs.append(f"{package}=={version(package).split('+')[0]}")
    return reqs


def easyref_code_path() -> str:
    """The folder of the running ``easyref`` package, bundled with the model so that it loads without installing."""
    import easyref

    return str(Path(easyref.__file__).parent)
