"""Logging: a contextvar filter stamps worker pid, instance and node on every record.

Only ``pgdurable serve`` calls :func:`setup`; the library itself never installs
handlers. Messages are lower-case, %-style, with ``extra={"event": "..."}``.

Log values carry tenants' text (step errors, third-party bodies, URLs), so the formatters,
not the call sites, make every record safe (:mod:`pgdurable.sanitize`):

- text: one record is one line. The message (the template with every interpolated value),
  each context field, and each line of a traceback's exception messages show control
  characters, separators and bidi overrides escaped (``\\n``, ``\\u001b``, ...): a newline or
  terminal escape in a tenant's exception cannot start a forged line or reach the terminal.
  Traceback lines stay lines (the frames are ours); the messages inside them are escaped;
- JSON: already one line with controls escaped by JSON; DEL, C1 controls, separators and
  bidi overrides are written as JSON ``\\u`` escapes too (the decoded values are unchanged);
- both: the password of any ``scheme://user:password@`` is shown as ``***``.
"""

from __future__ import annotations

import contextvars
import logging
import os
import sys
import traceback
from types import TracebackType

import orjson

from .sanitize import for_log, mask_userinfo, visible

instance_var: contextvars.ContextVar[str | None] = contextvars.ContextVar("instance", default=None)
node_var: contextvars.ContextVar[str | None] = contextvars.ContextVar("node", default=None)
node_type_var: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "node_type", default=None
)


class ContextFilter(logging.Filter):
    """Adds ``pid``, ``instance``, ``node`` and ``node_type`` attributes to records."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.pid = os.getpid()
        record.instance = instance_var.get()
        record.node = node_var.get()
        record.node_type = node_type_var.get()
        if not hasattr(record, "event"):
            record.event = None
        return True


def _escape_messages(te: traceback.TracebackException) -> None:
    """Escape the exception messages and notes of ``te`` and of every exception chained to it
    or grouped in it, in place, so a message's line breaks cannot become traceback lines."""
    todo, seen = [te], set()
    while todo:
        t = todo.pop()
        if id(t) in seen:
            continue
        seen.add(id(t))
        # the formatted message (str(exc)); CPython 3.11-3.13 keep it here
        if isinstance(getattr(t, "_str", None), str):
            t._str = visible(t._str)  # type: ignore[attr-defined]
        if isinstance(getattr(t, "msg", None), str):  # SyntaxError's message
            t.msg = visible(t.msg)
        notes = getattr(t, "__notes__", None)
        if isinstance(notes, list | tuple):
            t.__notes__ = [visible(n) for n in notes]
        todo += [c for c in (t.__cause__, t.__context__) if c is not None]
        todo += list(getattr(t, "exceptions", None) or ())


ExcInfo = tuple[type[BaseException], BaseException, TracebackType | None] | tuple[None, None, None]


def format_exception(ei: ExcInfo) -> str:
    """A traceback whose every line is safe to print: messages escaped (no line breaks of
    theirs), each line made visible, URL passwords masked."""
    if ei[0] is None:
        return "NoneType: None"
    te = traceback.TracebackException(ei[0], ei[1], ei[2], compact=True)
    _escape_messages(te)
    text = "".join(te.format()).rstrip("\n")
    return "\n".join(for_log(line) for line in text.split("\n"))


def _message(record: logging.LogRecord) -> str:
    """``record.getMessage()``; a template whose arguments do not fit is shown as data instead
    of failing (logging's handleError would print the raw arguments to stderr)."""
    try:
        return record.getMessage()
    except Exception:
        return f"{record.msg!r} % {record.args!r} (the arguments do not fit the message)"


class TextFormatter(logging.Formatter):
    """``<time> <level> <logger> pid=… [instance=…] [node=… type=…]: <message>``, one line per
    record (plus the lines of a traceback), every value escaped (module docstring)."""

    def format(self, record: logging.LogRecord) -> str:
        ctx = f" pid={for_log(getattr(record, 'pid', ''))}"
        inst = getattr(record, "instance", None)
        if inst:
            ctx += f" instance={for_log(inst)}"
        node = getattr(record, "node", None)
        if node:
            ctx += f" node={for_log(node)} type={for_log(getattr(record, 'node_type', ''))}"
        base = (
            f"{self.formatTime(record)} {for_log(record.levelname.lower())} "
            f"{for_log(record.name)}{ctx}: "
        )
        msg = base + for_log(_message(record))
        if record.exc_info:
            msg += "\n" + self.formatException(record.exc_info)
        return msg

    def formatException(self, ei: ExcInfo) -> str:
        return format_exception(ei)


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out = {
            "ts": self.formatTime(record),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": mask_userinfo(_message(record)),
            "event": getattr(record, "event", None),
            "pid": getattr(record, "pid", None),
            "instance": getattr(record, "instance", None),
            "node": getattr(record, "node", None),
            "node_type": getattr(record, "node_type", None),
        }
        for key in ("sqlstate", "attempt", "duration_ms"):
            if hasattr(record, key):
                out[key] = getattr(record, key)
        if record.exc_info:
            out["exc"] = mask_userinfo(self.formatException(record.exc_info))
        # orjson escapes C0 controls; the rest of the unsafe class becomes JSON \u escapes
        # (they can only occur inside JSON strings, so the document decodes to the same value)
        return visible(orjson.dumps(out, default=str).decode())


def setup(fmt: str = "text", level: int = logging.INFO) -> None:
    """Install the stderr handler (serve only).

    The libraries' own warnings (asyncio's "Task exception was never retrieved", psycopg's
    pool, httpx) go through the same formatter: unless something configured the root logger,
    it gets this handler too, instead of logging's last-resort handler, which prints messages
    raw.
    """
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(ContextFilter())
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root = logging.getLogger("pgdurable")
    root.handlers[:] = [handler]
    root.setLevel(level)
    root.propagate = False
    top = logging.getLogger()
    if not top.handlers or all(getattr(h, "_pgdurable", False) for h in top.handlers):
        handler._pgdurable = True  # type: ignore[attr-defined]
        top.handlers[:] = [handler]
