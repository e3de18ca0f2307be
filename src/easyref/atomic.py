"""Folders that appear whole or not at all: the one writer of trained weights, checkpoints and fetched base models.

:class:`FolderWriter` (and :func:`atomic_folder`, its ``with`` form) writes ``TARGET`` like this:

1. the files go into ``.TARGET.tmp`` beside it (a stale one from a crash is removed first);
2. every file is flushed to disk (``fsync``) and its SHA-256 recorded in ``checksums.sha256`` (the ``sha256sum``
   format: ``sha256sum -c checksums.sha256`` checks a folder by hand), then the folder's entries are flushed;
3. the files are read back against those checksums, so a folder that does not verify never takes the name;
4. the old ``TARGET`` is renamed ``.TARGET.old`` (set aside, not deleted), ``.TARGET.tmp`` is renamed ``TARGET``,
   the parent folder is flushed, and only then is ``.TARGET.old`` removed.

A crash (even ``SIGKILL``) at any point leaves either the old or the new folder under ``TARGET``, or, between the two
renames, the old one complete in ``.TARGET.old``: :func:`restore_interrupted` (called by the next writer and by
:func:`easyref.model.read_checkpoint_config`) renames it back. A failed write (a full disk, a read-only folder)
removes the temp folder, leaves ``TARGET`` as it was and becomes one :class:`UserError` line saying so.

One writer per ``TARGET`` at a time is the caller's business (``easyref train`` holds the ``--out`` lock). Reading
verifies with :func:`verify_folder`. The checksums catch accidents (a torn write, a truncated copy, a hand edit),
not a writer who also rewrites ``checksums.sha256``.
"""

from __future__ import annotations

import errno
import os
import shutil
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

from easyref.data.parquet import sha256_file
from easyref.errors import UserError

if TYPE_CHECKING:
    import torch

CHECKSUMS = "checksums.sha256"


class NotVerified(UserError):
    """The files just written do not match their checksums when read back; ``TARGET`` was left as it was."""


def fsync_path(path: Path) -> None:
    """Flush a file's (or a folder's entries') data to disk, so a crash cannot leave it empty after a rename."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_checksums(folder: Path) -> None:
    """Flush every file under ``folder`` to disk and record its SHA-256 in ``folder/checksums.sha256`` (names
    relative to ``folder``, ``/``-separated), then flush every folder's entries."""
    lines, folders = [], [folder]
    for path in sorted(folder.rglob("*")):
        if path.is_dir():
            folders.append(path)
        elif path.is_file() and path != folder / CHECKSUMS:
            fsync_path(path)
            lines.append(f"{sha256_file(path)}  {path.relative_to(folder).as_posix()}\n")
    target = folder / CHECKSUMS
    target.write_text("".join(lines))
    fsync_path(target)
    for path in reversed(folders):
        fsync_path(path)


def damage(folder: Path, required: Iterable[str] = ()) -> str | None:
    """Why ``folder`` cannot be trusted (one line), or ``None`` when every recorded file matches its checksum.

    ``required``: names ``checksums.sha256`` must cover (a listing that leaves out the weights proves nothing).
    """
    listing = folder / CHECKSUMS
    if not listing.is_file():
        return f"{CHECKSUMS} is missing (an incomplete or pre-checksum folder)"
    expected: dict[str, str] = {}
    for line in listing.read_text(errors="replace").splitlines():
        digest, sep, name = line.partition("  ")
        if not sep or len(digest) != 64 or not name or name.startswith("/") or ".." in name.split("/"):
            return f"{CHECKSUMS} is malformed (line {line[:80]!r})"
        expected[name] = digest
    uncovered = sorted(set(required) - set(expected))
    if uncovered:
        return f"{CHECKSUMS} does not cover {', '.join(uncovered)}"
    for name, digest in expected.items():
        path = folder / name
        if not path.is_file():
            return f"{name} is missing"
        if sha256_file(path) != digest:
            return f"{name} does not match its recorded SHA-256 (truncated, damaged or edited)"
    return None


def verify_folder(folder: Path, required: Iterable[str] = ()) -> None:
    """Refuse (one :class:`UserError` line) a folder whose files do not match its ``checksums.sha256``.

    A folder without the listing (written before this writer existed, or assembled by hand) is accepted as it is.
    """
    if not (folder / CHECKSUMS).is_file():
        return
    problem = damage(folder, required)
    if problem is not None:
        raise UserError(
            f"{folder}: {problem}; the folder is damaged: copy it again from where it came from, or write it again"
        )


def _sibling(target: Path, suffix: str) -> Path:
    return target.with_name(f".{target.name}.{suffix}")


def restore_interrupted(target: Path) -> bool:
    """Rename ``.TARGET.old`` back to ``TARGET`` when a crash between the writer's two renames left no ``TARGET``."""
    aside = _sibling(target, "old")
    if target.exists() or not aside.is_dir() or damage(aside) is not None:
        return False
    try:
        aside.rename(target)
    except OSError:  # another process restored or wrote it first
        return False
    return True


def _failure(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.errno is not None:
        where = f" writing {Path(exc.filename).name}" if exc.filename else ""
        return f"{exc.strerror or os.strerror(exc.errno)} [{errno.errorcode.get(exc.errno, exc.errno)}]{where}"
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


class FolderWriter:
    """Writes ``target`` through a temp folder beside it (see the module's docstring).

    ``intact``: what to tell the user survives a failed write (default: the previous ``target``, when there is one).
    ``required``: file names ``checksums.sha256`` must list for the folder to verify.
    """

    def __init__(self, target: str | Path, *, intact: str | None = None, required: Iterable[str] = ()):
        self.target = Path(target)
        self.path = _sibling(self.target, "tmp")
        self.aside = _sibling(self.target, "old")
        self.intact = intact
        self.required = tuple(required)

    def start(self) -> Path:
        """A fresh, empty temp folder (after restoring an interrupted swap); returns it."""
        with self.failing_cleanly(abort=False):
            restore_interrupted(self.target)
            if self.target.exists():
                shutil.rmtree(self.aside, ignore_errors=True)  # left by a crash after the second rename
            shutil.rmtree(self.path, ignore_errors=True)
            self.path.mkdir(parents=True)
        return self.path

    def write_text(self, name: str, text: str) -> Path:
        path = self.path / name
        with open(path, "w", encoding="utf-8") as fh:
            fh.write(text)
        return path

    def save_tensors(self, name: str, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> Path:
        """safetensors' ``save_file`` into the temp folder; its I/O failures (a full disk) become ``OSError``."""
        from safetensors import SafetensorError
        from safetensors.torch import save_file

        path = self.path / name
        try:
            save_file(tensors, path, metadata=metadata)
        except SafetensorError as exc:
            raise OSError(f"{exc}".strip().splitlines()[0] if str(exc).strip() else "write failed") from exc
        return path

    def commit(self) -> Path:
        """Checksum, verify and rename the temp folder into place; returns ``target``."""
        with self.failing_cleanly():
            write_checksums(self.path)
            problem = damage(self.path, self.required)
            if problem is not None:
                raise NotVerified(
                    f"{self.target}: the folder just written fails verification ({problem}); {self._kept()}; "
                    "the disk may be failing"
                )
            shutil.rmtree(self.aside, ignore_errors=True)
            had_old = self.target.exists()
            if had_old:
                self.target.rename(self.aside)
            try:
                self.path.rename(self.target)
            except OSError:
                if had_old:
                    self.aside.rename(self.target)  # put the old folder back before saying it is intact
                raise
            fsync_path(self.target.parent)
            if had_old:
                shutil.rmtree(self.aside, ignore_errors=True)
        return self.target

    def abort(self) -> None:
        """Remove the temp folder (``target`` is left as it was)."""
        shutil.rmtree(self.path, ignore_errors=True)

    def _kept(self) -> str:
        if self.intact is not None:
            return self.intact
        if self.target.exists():
            return f"the previous {self.target.name} is intact and the partial {self.path.name} was removed"
        return f"the partial {self.path.name} was removed"

    @contextmanager
    def failing_cleanly(self, abort: bool = True) -> Iterator[None]:
        """On any error remove the temp folder (with ``abort``); an ``OSError`` becomes one :class:`UserError` line."""
        try:
            yield
        except OSError as exc:
            if abort:
                self.abort()
            raise UserError(
                f"{self.target}: cannot be written ({_failure(exc)}); {self._kept()}; free space (or make the folder "
                "writable) and run again"
            ) from exc
        except BaseException:
            if abort:
                self.abort()
            raise


@contextmanager
def atomic_folder(
    target: str | Path, *, intact: str | None = None, required: Iterable[str] = ()
) -> Iterator[FolderWriter]:
    """``with atomic_folder(TARGET) as w:`` write files with ``w.write_text`` / ``w.save_tensors`` (or into
    ``w.path``); on leaving the block the folder is checksummed, verified and renamed into place."""
    writer = FolderWriter(target, intact=intact, required=required)
    writer.start()
    with writer.failing_cleanly():
        yield writer
    writer.commit()
