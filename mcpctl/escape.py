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
- A character that shows nothing or only a blank (a space other than ASCII's,
  a Hangul filler, a joiner beside ASCII, a variation selector after a
  letter) is escaped too: 'claude' and 'cla\\u200dude' are two tool ids, and
  look it.
- Output a script consumes (an allocation's id on stdout, `--env`, `--json`)
  stays exact: it never goes through here.
- Rich markup is not handled here: mcpctl's Rich console reads no markup
  (`mcpctl.render`). Standard library only, and cheap: the allocate path
  imports this module.
"""

from __future__ import annotations

_JOINERS = frozenset("\u200c\u200d")
"""Zero-width (non-)joiners: emoji sequences and many scripts need them between their characters, and they
reorder nothing; beside ASCII (or at either end) they only hide a difference, and are shown escaped."""
_BLANK = frozenset("\u034f\u115f\u1160\u17b4\u17b5\u180b\u180c\u180d\u180e\u180f\u2800\u3164\uffa0")
"""Characters Python counts printable that show nothing (fillers, the combining grapheme joiner, Mongolian
selectors, the blank braille pattern): 'a\u3164b' would look like 'ab', or 'a b'."""
_SELECTORS = frozenset("\ufe00\ufe01\ufe02\ufe03\ufe04\ufe05\ufe06\ufe07\ufe08\ufe09\ufe0a\ufe0b\ufe0c\ufe0d\ufe0e\ufe0f")
"""Variation selectors: an emoji's presentation after emoji and the keycap bases, invisible after other ASCII
(and so are U+E0100-U+E01EF, the supplement: every printable character from U+E0100 up is one of them)."""
_SUPPLEMENT = "\U000e0100"
_KEYCAPS = frozenset("0123456789#*")
_SHOWS_NOTHING = _BLANK | _SELECTORS


def printable(text: object) -> str:
    """`text` with every control character (C0, DEL, C1), bidi embedding, override or isolate, line or paragraph
    separator, space other than ASCII's, lone surrogate and other invisible character shown as its escape:
    'a\\x1b[2J' for a, ESC, [2J; so no character that shows nothing makes two names look the same (letters of
    other scripts that look like Latin ones still can). `None` and other values are shown as `str` gives them."""
    text = str(text)
    if text.isprintable() and (text.isascii() or (_SHOWS_NOTHING.isdisjoint(text) and max(text) < _SUPPLEMENT)):
        return text
    last = len(text) - 1
    shown = []
    for index, char in enumerate(text):
        if char in _JOINERS:
            hide = index == 0 or index == last or text[index - 1].isascii() or text[index + 1].isascii()
        elif char in _SELECTORS or _SUPPLEMENT <= char <= "\U000e01ef":
            hide = index == 0 or (text[index - 1].isascii() and text[index - 1] not in _KEYCAPS)
        else:
            hide = char in _BLANK or (not char.isprintable() and _hidden(char))
        shown.append(_escape(char) if hide else char)
    return "".join(shown)


def _escape(char: str) -> str:
    """`char` as Python escapes it in a string literal ('\\x1b', '\\u202e', '\\n')."""
    escaped = repr(char)[1:-1]
    if escaped != char:
        return escaped
    code = ord(char)  # one Python shows as it is (printable): a blank or a selector
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}"


def _hidden(char: str) -> bool:
    """Whether `char`, one Python does not count printable, acts on the terminal or on the text around it, or
    shows as a blank like a space, instead of showing itself."""
    if char.isascii() or "\x80" <= char <= "\x9f":
        return True
    import unicodedata

    return unicodedata.category(char) in ("Cc", "Cf", "Cs", "Zl", "Zp", "Zs")
