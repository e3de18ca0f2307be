"""The promotion gate: absolute bounds and comparisons with ``@champion``, and the compare-and-set move of the alias."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from easyref.errors import UserError
from easyref.registry.config import GateRule, RegisterConfig

if TYPE_CHECKING:
    from mlflow import MlflowClient
    from mlflow.entities.model_registry import ModelVersion

CHALLENGER, CHAMPION = "challenger", "champion"
METRIC_PREFIX = "metric."


def _fmt(value: float | None) -> str:
    """Four decimals, or three significant digits for small values (a gain bound of 1.9e-05 is not 0.0000)."""
    if value is None:
        return "missing"
    return f"{value:.4f}" if value == 0 or abs(value) >= 0.001 else f"{value:.2e}"


@dataclass
class GateLine:
    metric: str
    challenger: float | None
    champion: float | None
    margin: float
    passed: bool
    note: str = ""
    key: str = ""
    """Tag suffix (``gate.<key>``); the metric name unless one metric has several lines."""

    def __post_init__(self) -> None:
        self.key = self.key or self.metric

    def describe(self) -> str:
        verdict = "pass" if self.passed else "FAIL"
        if self.note:
            return f"{self.note} -> {verdict}"
        return (
            f"{self.metric}: challenger {_fmt(self.challenger)} vs champion {_fmt(self.champion)} "
            f"(margin {self.margin:+.4f}) -> {verdict}"
        )


def _absolute(rule: GateRule, value: float | None) -> GateLine:
    bounds = []
    if rule.min is not None:
        bounds.append((f"> {_fmt(rule.min)}", value is not None and value > rule.min))
    if rule.max is not None:
        bounds.append((f"< {_fmt(rule.max)}", value is not None and value < rule.max))
    passed = all(ok for _, ok in bounds)
    note = f"{rule.metric}: {_fmt(value)} must be {' and '.join(text for text, _ in bounds)}"
    return GateLine(rule.metric, value, None, 0.0, passed, note=note, key=f"{rule.metric}.bounds")


def evaluate_gate(
    challenger: dict[str, float], champion: dict[str, float] | None, rules: list[GateRule]
) -> list[GateLine]:
    """One line per check: absolute bounds always, comparisons only with a champion; a missing metric fails."""
    lines = []
    for rule in rules:
        new = challenger.get(rule.metric)
        if rule.min is not None or rule.max is not None:
            lines.append(_absolute(rule, new))
        if not rule.relative or champion is None:
            continue
        old, margin = champion.get(rule.metric), rule.margin or 0.0
        if new is None or old is None:
            passed = False
        elif rule.higher_is_better:
            passed = new >= old + margin
        else:
            passed = new <= old - margin
        lines.append(GateLine(rule.metric, new, old, margin, passed))
    return lines


def version_metrics(version: ModelVersion) -> dict[str, float]:
    return {k[len(METRIC_PREFIX) :]: float(v) for k, v in version.tags.items() if k.startswith(METRIC_PREFIX)}


@dataclass
class Registration:
    """What :func:`easyref.registry.register` did."""

    version: str
    created: bool
    promoted: bool | None = None
    decision: str = ""
    lines: list[GateLine] = field(default_factory=list)


def alias_version(client: MlflowClient, name: str, alias: str) -> ModelVersion | None:
    from mlflow.exceptions import MlflowException

    try:
        return client.get_model_version_by_alias(name, alias)
    except MlflowException as exc:
        if exc.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE", "NOT_FOUND"):
            return None
        raise


def _record_decision(
    client: MlflowClient, name: str, version: str, decision: str, champion: str | None, lines: list[GateLine]
) -> None:
    tags = {
        "gate.decision": decision,
        "gate.champion_version": champion or "none",
        "gate.time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    tags.update({f"gate.{line.key}": line.describe() for line in lines})
    for key, value in tags.items():
        client.set_model_version_tag(name, version, key, value)


def _decide(version: ModelVersion, champion: ModelVersion | None, config: RegisterConfig) -> tuple[str, list[GateLine]]:
    lines = evaluate_gate(version_metrics(version), champion and version_metrics(champion), config.gate)
    if champion is not None and config.require_same_split:
        split_old, split_new = champion.tags.get("eval.split_sha256"), version.tags.get("eval.split_sha256")
        if split_old != split_new:
            note = f"evaluated on split {split_new} vs champion's {split_old}"
            lines.append(GateLine("same_split", None, None, 0.0, False, note=note))
    failed = [line for line in lines if not line.passed]
    against = "no champion yet" if champion is None else f"vs champion v{champion.version}"
    if not failed:
        return (f"promoted: {against}" if champion is None else f"promoted {against}"), lines
    why = "; ".join(line.describe() for line in failed)
    return (f"rejected ({against}): {why}" if champion is None else f"rejected {against}"), lines


def promote(
    client: MlflowClient, name: str, version: ModelVersion, config: RegisterConfig, attempts: int = 3
) -> Registration:
    """Move ``champion`` to ``version`` if the gate passes against the current champion (compare-and-set).

    The champion is read, the gate evaluated, the champion read again (a change means another registration moved it:
    compare again), the decision recorded on the version, the alias set, and read back once more: a champion moved
    by a writer that had not seen this one (a registration outside the shared lock) is reported, not hidden.
    """
    for _ in range(attempts):
        champion = alias_version(client, name, CHAMPION)
        if champion is not None and str(champion.version) == str(version.version):
            return Registration(str(version.version), False, True, "already champion")
        decision, lines = _decide(version, champion, config)
        current = alias_version(client, name, CHAMPION)
        if (current and str(current.version)) != (champion and str(champion.version)):
            continue  # someone moved champion while we compared: compare again
        _record_decision(client, name, version.version, decision, champion and str(champion.version), lines)
        promoted = decision.startswith("promoted")
        if promoted:
            client.set_registered_model_alias(name, CHAMPION, version.version)
            after = alias_version(client, name, CHAMPION)
            if after is not None and str(after.version) != str(version.version):
                if after.tags.get("gate.champion_version") != str(version.version):
                    raise UserError(
                        f"{name}: v{after.version} replaced @champion v{version.version} without comparing with it "
                        "(a registration that does not share register.lock_dir); re-run `easyref register ... "
                        "--promote` for both checkpoints"
                    )
        return Registration(str(version.version), False, promoted, decision, lines)
    raise UserError(f"{name}: @champion kept changing during promotion; re-run `easyref register ... --promote`")
