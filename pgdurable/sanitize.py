"""One sanitiser for text that reaches an operator's terminal or a log line.

Tenants control labels, queries, results, error messages and third-party bodies; printed raw,
a newline forges a log line or a ``list`` row, and an escape sequence erases lines, sets the
window title (OSC 0) or writes the clipboard (OSC 52). :func:`visible` shows such characters
instead of sending them, with one convention everywhere (the CLI, ``top``, the text log and,
in SQL, ``df._visible`` behind ``df.explain``):

- newline, carriage return and tab become the two characters ``\\n``, ``\\r``, ``\\t``;
- every other escaped character becomes ``\\u`` and four lower-case hex digits, as a JSON or
  JavaScript string literal writes it (ESC is ``\\u001b``, DEL ``\\u007f``, CSI ``\\u009b``);
- escaped are: the C0 controls U+0000-U+001F (so ESC, and with it every CSI/OSC/DCS
  sequence: its introducer is shown and the rest is inert text), DEL U+007F, the C1 controls
  U+0080-U+009F (8-bit CSI/OSC, NEL), the line and paragraph separators U+2028/U+2029, and
  the bidirectional embeddings, overrides and isolates U+202A-U+202E and U+2066-U+2069;
- everything else is kept as it is: ordinary Unicode (accents, CJK, emoji, right-to-left
  scripts) and the backslash. The backslash is not doubled, so ordinary text, SQL and JSON
  print byte-identical; the price is that a literal ``\\n`` typed by a tenant reads the same
  as an escaped newline, which is harmless: neither starts a new line.

Because the escapes are JSON's own, JSON text stays valid JSON with the same value after
:func:`visible` (a control inside a JSON string becomes its JSON escape).

:func:`mask_userinfo` hides the password of ``scheme://user:password@`` (as
``scheme://user:***@``) in any text; :func:`for_log` applies both (the log formatters'
step: :mod:`pgdurable.log`).
"""

from __future__ import annotations

import re

__all__ = ["UNSAFE", "for_log", "mask_userinfo", "visible", "visible_lines"]

# the characters :func:`visible` escapes (the SQL twin, df._visible, uses the same class)
UNSAFE = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069]")
_SHORT = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _escape(m: re.Match[str]) -> str:
    ch = m.group()
    return _SHORT.get(ch) or f"\\u{ord(ch):04x}"


def visible(value: object) -> str:
    """``value`` as text with every control, separator and bidi override shown escaped.

    Idempotent (its output has nothing left to escape); ``None`` is the empty string.
    """
    text = "" if value is None else value if isinstance(value, str) else str(value)
    return UNSAFE.sub(_escape, text) if UNSAFE.search(text) else text


def visible_lines(text: object) -> str:
    """Multi-line text of our own (a table, a tree, a frame): each line made visible, the
    line breaks between them kept. Only for text whose line structure is ours: tenant text
    must be made visible field by field before it is joined into lines."""
    s = "" if text is None else str(text)
    return "\n".join(visible(line) for line in s.split("\n"))


# scheme://user:password@ : the password runs to the LAST '@' of the authority (as parsers
# split userinfo), which ends at '/', '?', '#', whitespace, a quote or the end; so a password
# httpx cannot parse (a space, a second '@', a control character) is masked whole. Bounded,
# so a long line cannot make the search slow. Not masked: a '/', '?' or '#' in the password
# (an RFC 3986 parser ends the authority there too) and a userinfo without a password.
_USERINFO = re.compile(
    r"(?P<head>\b[A-Za-z][A-Za-z0-9+.\-]{0,30}://[^\s:/?#@'\"<>\\]{0,256})"
    r":(?P<pw>[^/?#\r\n]{0,1024}?)@(?=[^@/?#\s'\"<>\\]*(?:[/?#\s'\"<>\\]|$))"
)


def mask_userinfo(text: str) -> str:
    """``text`` with the password of every ``scheme://user:password@`` shown as ``***``."""
    if "://" not in text:
        return text
    return _USERINFO.sub(lambda m: m.group("head") + ":***@", text)


def for_log(value: object) -> str:
    """``value`` as one safe piece of a log line: visible, then without URL passwords."""
    return mask_userinfo(visible(value))
