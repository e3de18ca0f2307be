"""Writing a params.yaml section from a component's ``config: dict`` parameter.

KFP passes dict parameters as protobuf ``Struct`` values, in which every number is a double: ``{"workers": 2}``
arrives as ``{"workers": 2.0}``. The project's typed config loader rightly rejects ``2.0`` for an ``int`` field, so
integral floats are turned back into ints here (an ``int`` is accepted wherever a ``float`` is expected).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml


def restore_ints(value: Any) -> Any:
    """``2.0`` -> ``2``, recursively through mappings and lists; everything else unchanged."""
    if isinstance(value, dict):
        return {k: restore_ints(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [restore_ints(v) for v in value]
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


def write_section(directory: str | Path, section: str, config: dict[str, Any] | None) -> str:
    """Write ``{section: config}`` to ``directory/params.yaml`` and return the file's path."""
    path = Path(directory) / "params.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump({section: restore_ints(dict(config or {}))}, sort_keys=False))
    return str(path)
