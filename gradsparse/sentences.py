"""English sentences for the sentence encoders, offline: a user's text file or the Python standard
library's own documentation (``pydoc_data.topics``, present on every machine).

Splitting (deterministic, no model involved): the text is cut into paragraphs at blank lines;
paragraphs that are headings (a line of ``*``/``=``/``-`` ...) or code/tables (a line starting
with ``>>>``, ``...``, ``|`` or ``+-``) are dropped; the lines of a paragraph are joined with
spaces and split after ``.``, ``!`` or ``?`` (a closing quote or bracket may follow) when the
next word starts with a capital letter, a quote or a bracket. A sentence is kept when it has
``min_words..max_words`` words, starts with an upper-case letter, ends with ``.``/``!``/``?``
and at least 80% of its characters are letters or spaces. Duplicates are dropped, first
occurrence kept. The default text gives about 1,900 sentences.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

_HEADING = re.compile(r"\s*[*=\-~^+#]{3,}\s*")
_CODE_START = (">>>", "...", "|", "+-")
_END = re.compile(r"(?<=[.!?])[\"')\]]?\s+(?=[A-Z\"(\[])")


def default_text() -> str:
    """The standard library's ``pydoc_data.topics`` texts, in sorted topic order, as one string."""
    try:
        from pydoc_data.topics import topics
    except ImportError:  # pragma: no cover - stripped Python installs
        raise ValueError("the default text (pydoc_data.topics) is missing from this Python; pass a text file") from None
    return "\n\n".join(topics[k] for k in sorted(topics))


def _paragraphs(text: str):
    for block in re.split(r"\n\s*\n", text):
        lines = [ln for ln in block.splitlines() if ln.strip()]
        if not lines:
            continue
        if any(_HEADING.fullmatch(ln) for ln in lines):
            continue
        if any(ln.lstrip().startswith(_CODE_START) for ln in lines):
            continue
        yield " ".join(ln.strip() for ln in lines)


def split_sentences(text: str, *, min_words: int = 5, max_words: int = 60) -> list[str]:
    """The sentences of ``text`` (module docstring), duplicates removed, in order of appearance."""
    if not isinstance(text, str):
        raise ValueError(f"text: must be a str, got {type(text).__name__}")
    for name, v in (("min_words", min_words), ("max_words", max_words)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name}: must be a positive integer, got {v!r}")
    if min_words > max_words:
        raise ValueError(f"min_words ({min_words}) must be <= max_words ({max_words})")
    out, seen = [], set()
    for p in _paragraphs(text):
        for s in _END.split(p):
            s = s.strip()
            nw = len(s.split())
            if not (min_words <= nw <= max_words) or not s[0].isupper() or s[-1] not in ".!?":
                continue
            if sum(c.isalpha() or c == " " for c in s) < 0.8 * len(s):
                continue
            if s not in seen:
                seen.add(s)
                out.append(s)
    return out


def load_sentences(path: str | os.PathLike | None = None, *, min_sentences: int = 2) -> list[str]:
    """Sentences of a UTF-8 text file, or of :func:`default_text` when ``path`` is None.

    Raises ValueError when the text yields fewer than ``min_sentences`` sentences.
    """
    if path is None:
        text, where = default_text(), "the default text (pydoc_data.topics)"
    else:
        p = Path(path)
        if p.is_dir():
            raise ValueError(f"text: {p} is a folder; allowed: a UTF-8 text file")
        if not p.is_file():
            raise FileNotFoundError(f"text file {p} does not exist")
        try:
            text = p.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise ValueError(f"text: cannot read {p} as UTF-8 text ({e})") from None
        where = str(p)
    out = split_sentences(text)
    if len(out) < min_sentences:
        raise ValueError(f"text: {where} holds {len(out)} usable sentences; at least {min_sentences} needed "
                         "(sentences of 5-60 words that start with a capital and end with . ! or ?)")
    return out
