"""The ``register`` section of ``params.yaml``: model name, gate rules, where base models come from, locking."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"

# MLflow refuses '/' and ':' and path-like names; quotes would break the registry's search filters.
_BAD_NAME_CHARS = re.compile(r"[/:'\"\\%\x00-\x1f\x7f]")
_HUB_REF = re.compile(r"^[\w.-]+/[\w.-]+@[\w./-]+$")
_URI = re.compile(r"^[a-z][a-z0-9+.-]*:/")
BASE_PARTS = ("sdxl", "mllm")


def check_model_name(name: str) -> str:
    """``name`` if MLflow can register it and the registry can search it; else ``ValueError`` with the fix."""
    stripped = name.strip()
    if not stripped:
        raise ValueError("model_name must not be empty; use e.g. 'easyref'")
    if stripped != name or _BAD_NAME_CHARS.search(name) or name in (".", "..") or len(name) > 256:
        raise ValueError(
            f"model_name {name!r} is not a registered-model name MLflow can store and search: no '/', ':', quotes, "
            "backslashes, '%', control characters or surrounding spaces, at most 256 characters; "
            "use e.g. 'easyref-tiny'"
        )
    return name


def check_base_ref(part: str, ref: str) -> str:
    """A base-model reference the registered model can resolve anywhere: ``org/name@revision`` or a URI."""
    if _HUB_REF.match(ref) or _URI.match(ref):
        return ref
    raise ValueError(
        f"base_models.{part} = {ref!r}: give a hub id with a pinned revision ('org/name@<commit>') or a URI "
        "(s3://..., runs:/..., models:/...); a local folder is bundled with the model instead when base_models is "
        "null"
    )


@dataclass(kw_only=True)
class GateRule:
    """One promotion condition.

    Relative (``margin``): ``challenger >= champion + margin`` (``<= champion - margin`` if lower is better); it only
    applies when there is a champion. Absolute (``min`` / ``max``): the challenger's own value must lie within the
    bounds, with or without a champion. A rule with neither bound is relative with margin 0.
    """

    metric: str
    """A key of metrics.json, e.g. ``easyref.clip_i``."""
    margin: float | None = None
    """Required improvement over the champion; negative = tolerated regression; null = no relative check."""
    higher_is_better: bool = True
    """Direction of the metric (losses: false)."""
    min: float | None = None
    """Absolute lower bound (inclusive is a failure: the value must be strictly greater)."""
    max: float | None = None
    """Absolute upper bound (the value must be strictly smaller)."""

    @property
    def relative(self) -> bool:
        return self.margin is not None or (self.min is None and self.max is None)


def _default_gate() -> list[GateRule]:
    return [GateRule(metric=f"easyref.{m}", margin=0.0) for m in ("clip_i", "clip_t", "dino_i")]


@dataclass(kw_only=True)
class RegisterConfig:
    """The ``register`` section of ``params.yaml``; command-line flags override it."""

    model_name: str = "easyref"
    """Registered model name."""
    experiment: str = "easyref-register"
    """MLflow experiment of the runs that log the models."""
    base_models: dict[str, str] | None = None
    """``{sdxl: REF, mllm: REF}`` recorded in the model, each ``org/name@revision`` or a URI; null = bundle the
    ``--base`` folder's sdxl/ and mllm/ with the model as artifacts (up to ``bundle_base_max_mb``)."""
    bundle_base_max_mb: float = 2048.0
    """Largest base folder bundled into the model; larger ones must be recorded by ``base_models``."""
    gate: list[GateRule] = field(default_factory=_default_gate)
    """Promotion rules; all must pass."""
    require_same_split: bool = True
    """Fail the gate when champion and challenger were evaluated on different splits (``split_sha256`` tags)."""
    lock_dir: str | None = None
    """Folder of the registry lock files; null = the system temp folder (serialises this host only). Point it at a
    shared volume (the pipeline's PVC) so that registrations from several hosts are serialised too."""
    lock_timeout_s: float = 600.0
    """How long to wait for another registration of the same model to finish."""

    def __post_init__(self) -> None:
        check_model_name(self.model_name)
        if self.lock_dir is not None and not self.lock_dir.strip():
            raise ValueError(
                "lock_dir is empty: name the folder of the registry lock, or null for the system temp folder (this "
                "host only)"
            )
        if self.base_models is not None:
            missing = [p for p in BASE_PARTS if p not in self.base_models]
            extra = sorted(set(self.base_models) - set(BASE_PARTS))
            if missing or extra:
                raise ValueError(f"base_models needs exactly the keys {', '.join(BASE_PARTS)} (got {extra or missing})")
            for part, ref in self.base_models.items():
                check_base_ref(part, str(ref))
        for rule in self.gate:
            if rule.min is not None and rule.max is not None and rule.min >= rule.max:
                raise ValueError(f"gate rule {rule.metric}: min {rule.min} must be below max {rule.max}")
