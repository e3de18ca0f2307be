"""Write the numbers of a stage's record as a metrics-only JSON file, for `dvc metrics show`.

  python pipelines/dvc_metrics.py data/split/split.json outputs/metrics/split.json --prefix split \\
      groups.train groups.held_in groups.held_out test_samples

Ingest's ``stats.json`` and split's ``split.json`` are records: counts next to provenance (the manifest's path and
sha256, seeds, hash thresholds, histograms). `dvc metrics show` prints every leaf of every metrics file as a column,
so those records made one unreadable row of 30 columns. The records stay stage outputs; this writes only the
selected numeric leaves (a key may name a subtree: all its numeric leaves), flattened and prefixed, in ``OUT``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any


def numeric_leaves(value: Any, path: str) -> dict[str, float | int]:
    """``{"a.b": 1, ...}``: the int/float leaves under ``value`` (booleans and strings are not metrics)."""
    if isinstance(value, dict):
        out: dict[str, float | int] = {}
        for key, item in value.items():
            out.update(numeric_leaves(item, f"{path}.{key}" if path else str(key)))
        return out
    if isinstance(value, int | float) and not isinstance(value, bool):
        return {path: value}
    return {}


def select(record: dict[str, Any], keys: list[str], prefix: str = "") -> dict[str, float | int]:
    """The numeric leaves of ``record`` under each dotted key; a key that is absent or holds no number is an error."""
    out: dict[str, float | int] = {}
    for key in keys:
        node: Any = record
        for part in key.split("."):
            if not isinstance(node, dict) or part not in node:
                raise KeyError(key)
            node = node[part]
        leaves = numeric_leaves(node, key)
        if not leaves and not isinstance(node, dict):
            raise KeyError(key)
        out.update({f"{prefix}.{k}" if prefix else k: v for k, v in leaves.items()})
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="pipelines/dvc_metrics.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("record", type=Path, help="the stage's JSON record")
    parser.add_argument("out", type=Path, help="the metrics file to write")
    parser.add_argument("keys", nargs="+", help="dotted keys (or subtrees) to keep")
    parser.add_argument("--prefix", default="", help="prefix of every metric name (e.g. the stage)")
    args = parser.parse_args(argv)
    try:
        record = json.loads(args.record.read_text())
        metrics = select(record, args.keys, args.prefix)
    except (OSError, json.JSONDecodeError) as exc:
        print(f"dvc_metrics: cannot read {args.record}: {exc}", file=sys.stderr)
        return 2
    except KeyError as exc:
        print(f"dvc_metrics: {args.record} has no number at {exc.args[0]!r}", file=sys.stderr)
        return 2
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(metrics, indent=2, sort_keys=True) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
