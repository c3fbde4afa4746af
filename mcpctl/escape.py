"""Strings from the daemon made safe to show on a terminal.

Rules:
- Any string mcpctl did not write itself (tool and execution ids, resource,
  pool and budget names, labels, units, alert and event details, process
  names, mount points, Slurm's messages, error messages quoting them) goes
  through `printable` before a person's terminal sees it. Other users and the
  system choose them: a raw ESC, an 8-bit CSI (U+009B) or a right-to-left
  override could rewrite the screen or reorder what it shows.
- Each such character is shown as Python writes it in a string (`\\x1b`,
  `\\x9b`, `\\u202e`, `\\n`), so what is seen can be typed back; ordinary text,
  accented letters, CJK and emoji, is left as it is.
- Output a script consumes (an allocation's id on stdout, `--env`, `--json`)
  stays exact: it never goes through here.
- Rich markup is not handled here: mcpctl's Rich console reads no markup
  (`mcpctl.render`). Standard library only, and cheap: the allocate path
  imports this module.
"""

from __future__ import annotations

_JOINERS = frozenset("\u200c\u200d")
"""Zero-width (non-)joiners: emoji sequences and many scripts need them, and they reorder nothing."""


def printable(text: object) -> str:
    """`text` with every control character (C0, DEL, C1), bidi embedding, override or isolate, line or paragraph
    separator, lone surrogate and other invisible format character shown as its escape: 'a\\x1b[2J' for a, ESC,
    [2J. `None` and other values are shown as `str` gives them."""
    text = str(text)
    if text.isprintable():
        return text
    return "".join(char if char.isprintable() or not _hidden(char) else repr(char)[1:-1]
                   for char in text)


def _hidden(char: str) -> bool:
    """Whether `char` acts on the terminal or on the text around it instead of showing itself."""
    if char.isascii() or "\x80" <= char <= "\x9f":
        return True
    import unicodedata

    return unicodedata.category(char) in ("Cc", "Cf", "Cs", "Zl", "Zp") and char not in _JOINERS
