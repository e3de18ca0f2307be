"""Where a source may read: paths confined to the source's folder and the allowed roots.

A leaf of ``easyref.data``: the source readers (:mod:`easyref.data.sources`) and the caption files they read
(:mod:`easyref.data.caption_files`) both check paths with it.
"""

from __future__ import annotations

from pathlib import Path

from easyref.data.reasons import Reason, Rejection


def inside(real_roots: tuple[Path, ...], real_path: Path) -> bool:
    return any(real_path == root or root in real_path.parents for root in real_roots)


def escape(uri: str) -> Rejection:
    return Rejection(
        Reason.PATH_ESCAPE,
        f"{uri} leads out of the source's folder (an absolute, file://, ../ path or a symlink); copy the file in or "
        f"pass --allow-root with a folder that holds it",
    )
