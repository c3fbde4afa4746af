"""`mcpctl.escape.printable`: what another user or the system wrote is shown, never obeyed, by the terminal."""

from __future__ import annotations

import pytest

from mcpctl.escape import printable


@pytest.mark.parametrize("text, shown", [
    ("\x1b[2J\x1b]8;;http://evil.example/\x1b\\click", "\\x1b[2J\\x1b]8;;http://evil.example/\\x1b\\click"),
    ("a\x00b\x07c\x08d\x7f", "a\\x00b\\x07c\\x08d\\x7f"),
    ("line\nfeed\rtab\t", "line\\nfeed\\rtab\\t"),
    ("csi\x9b31m next\x85 \x80\x9f", "csi\\x9b31m next\\x85 \\x80\\x9f"),
    ("\u202eRTL\u202a\u202b\u202c\u202d", "\\u202eRTL\\u202a\\u202b\\u202c\\u202d"),
    ("\u2066iso\u2067\u2068\u2069", "\\u2066iso\\u2067\\u2068\\u2069"),
    ("\u200e\u200f\u061c", "\\u200e\\u200f\\u061c"),
    ("para\u2028\u2029", "para\\u2028\\u2029"),
    ("zero\u200bwidth\ufeff\u2060\u00ad", "zero\\u200bwidth\\ufeff\\u2060\\xad"),
    ("tag\U000e0041", "tag\\U000e0041"),
    ("\udcff not utf-8", "\\udcff not utf-8"),
], ids=["esc", "c0-del", "newline-tab", "c1", "bidi-overrides", "bidi-isolates", "marks", "separators",
        "invisible", "tag", "surrogate"])
def test_control_and_format_characters_are_shown_as_their_escapes(text: str, shown: str) -> None:
    assert printable(text) == shown


@pytest.mark.parametrize("text", [
    "plain ascii, [link=x]markup[/link] and \\x9b typed", "é à ß ñ Ω", "中文 日本語 한국어", "😀 👍🏽 👨‍👩‍👧 🇫🇷",
    "नमस्ते", "क्\u200dष", "❤\ufe0f 1\ufe0f\u20e3", "",
])
def test_ordinary_text_is_left_as_it_is(text: str) -> None:
    assert printable(text) == text


@pytest.mark.parametrize("text, shown", [
    ("gpu\u00a00", "gpu\\xa00"), ("a\u2003b\u3000c", "a\\u2003b\\u3000c"),
    ("cla\u200dude", "cla\\u200dude"), ("\u200cclaude\u200d", "\\u200cclaude\\u200d"),
    ("tool\u3164", "tool\\u3164"), ("a\u115fb\uffa0c\u2800d", "a\\u115fb\\uffa0c\\u2800d"),
    ("claude\ufe00", "claude\\ufe00"), ("c\u034flaude", "c\\u034flaude"), ("\U000e0100x", "\\U000e0100x"),
], ids=["no-break-space", "wide-spaces", "joiner-in-ascii", "joiners-at-ends", "hangul-filler", "fillers",
        "selector", "grapheme-joiner", "selector-supplement"])
def test_a_character_that_shows_nothing_cannot_make_two_names_look_the_same(text: str, shown: str) -> None:
    assert printable(text) == shown
    assert eval(f"'{shown}'") == text  # noqa: S307 - what is seen can be typed back


def test_an_escape_reads_back_as_the_string_it_shows() -> None:
    hostile = "evil\x9b31mC1\u202eRTL\x1b\n"
    assert eval(f"'{printable(hostile)}'") == hostile  # noqa: S307 - the point: what is seen can be typed back


def test_values_other_than_strings_are_shown_as_str_gives_them() -> None:
    assert (printable(None), printable(3), printable(2.5)) == ("None", "3", "2.5")


def test_an_error_message_keeps_its_lines_and_shows_the_controls_in_them(capsys: pytest.CaptureFixture[str]) -> None:
    from mcpctl.actions import fail

    assert fail("no pool named 'p\u202e\x9b'\n  looked for: here", 3) == 3
    assert capsys.readouterr().err == "mcpctl: no pool named 'p\\u202e\\x9b'\n  looked for: here\n"
