"""Captions cut to what the SDXL text encoders read, on purpose and counted.

Both CLIP text encoders of SDXL read 77 tokens (start and end tokens included). Given a longer caption, diffusers
cuts it itself and logs one "truncated because CLIP can only handle 77 tokens" warning per caption (hundreds in a
demo run). Every place that hands captions to ``encode_prompt`` or an SDXL pipeline (training, generation,
evaluation and its baselines) passes them through :class:`CaptionFit` first: a caption that does not fit is cut at
the last whole word that fits both tokenizers (inside a word only when the first word alone is too long), so the
encoders see what they would have seen, no warning is logged, and the fit counts what it cut. Training records the
count as the MLflow metric ``captions_truncated``, evaluation as ``captions_truncated`` in ``evaluation.json``; each
prints one summary line.
"""

from __future__ import annotations

import re
import weakref
from collections.abc import Callable, Sequence
from typing import Any

_CACHE_LIMIT = 100_000
MAX_PROMPT_CHARS = 2000
"""The longest prompt (and negative prompt) a request takes, in characters: serving (``easyref.registry.pyfunc``)
answers 400 past it and ``easyref generate`` exits 2. The MLLM reads the whole prompt, so its cost grows with the
length (a 100 KB prompt took 171 s of a 7 s generation); 2000 characters is far past what the text encoders read."""
_SHARED: weakref.WeakKeyDictionary[Any, CaptionFit] = weakref.WeakKeyDictionary()


class CaptionFit:
    """Cuts captions to the shortest token limit of ``tokenizers`` and counts the captions it cut."""

    def __init__(self, tokenizers: Sequence[Any]):
        self.tokenizers = [t for t in tokenizers if t is not None]
        self.seen = 0
        """Captions passed through :meth:`__call__`."""
        self.cut = 0
        """Of them, how many were cut."""
        self._fitted: dict[str, str] = {}

    @classmethod
    def for_pipeline(cls, pipe: Any) -> CaptionFit:
        """A new fit (with its own counts) for the tokenizers of an SDXL pipeline."""
        return cls([getattr(pipe, "tokenizer", None), getattr(pipe, "tokenizer_2", None)])

    @classmethod
    def shared(cls, pipe: Any) -> CaptionFit:
        """The one fit of ``pipe``: every caller that generates with this pipeline adds to the same counts."""
        fit = _SHARED.get(pipe)
        if fit is None:
            fit = _SHARED[pipe] = cls.for_pipeline(pipe)
        return fit

    @property
    def limit(self) -> int:
        """The smallest ``model_max_length`` of the tokenizers (77 for SDXL)."""
        return min((int(t.model_max_length) for t in self.tokenizers), default=0)

    def fits(self, text: str) -> bool:
        """Whether every tokenizer reads all of ``text`` (start and end tokens included)."""
        return all(
            len(t(text, add_special_tokens=True, verbose=False)["input_ids"]) <= t.model_max_length
            for t in self.tokenizers
        )

    def fit(self, text: str) -> str:
        """``text`` if it fits, else its longest prefix that fits (at a word boundary when there is one)."""
        if text in self._fitted:
            return self._fitted[text]
        fitted = text if self.fits(text) else _cut(text, self.fits)
        if len(self._fitted) >= _CACHE_LIMIT:
            self._fitted.clear()
        self._fitted[text] = fitted
        return fitted

    def __call__(self, captions: Sequence[str]) -> list[str]:
        """Each caption fitted; counts how many were cut."""
        out = [self.fit(c) for c in captions]
        self.seen += len(out)
        self.cut += sum(a != b for a, b in zip(captions, out, strict=True))
        return out

    def count_long(self, captions: Sequence[str]) -> int:
        """How many of ``captions`` are longer than the encoders read (nothing is counted on the fit)."""
        return sum(self.fit(c) != c for c in captions)

    def summary(self, what: str = "captions") -> str | None:
        """One line about what was cut, or None if nothing was."""
        if not self.cut:
            return None
        return (
            f"{what}: {self.cut} of {self.seen} were longer than the text encoders' {self.limit} tokens and were cut "
            f"at the last whole word that fits"
        )


def _cut(text: str, fits: Callable[[str], bool]) -> str:
    """The longest prefix of ``text`` that ``fits``: whole words first, characters of the first word otherwise."""
    words = [m.end() for m in re.finditer(r"\S+", text)]
    best = _longest(text, words, fits)
    if best is None:
        best = _longest(text, list(range(1, words[0] if words else len(text))), fits)
    return "" if best is None else best


def _longest(text: str, ends: list[int], fits: Callable[[str], bool]) -> str | None:
    """Binary search for the longest ``text[:end]`` that fits (token counts grow with the prefix)."""
    lo, hi, best = 0, len(ends) - 1, None
    while lo <= hi:
        mid = (lo + hi) // 2
        if fits(text[: ends[mid]]):
            best, lo = text[: ends[mid]], mid + 1
        else:
            hi = mid - 1
    return best
