"""Logging: a contextvar filter stamps worker pid, instance and node on every record.

Only ``pgdurable serve`` calls :func:`setup`; the library itself never installs
handlers. Messages are lower-case, %-style, with ``extra={"event": "..."}``.
"""

from __future__ import annotations

import contextvars
import logging
import os
import sys

import orjson

instance_var: contextvars.ContextVar[str | None] = contextvars.ContextVar("instance", default=None)
node_var: contextvars.ContextVar[str | None] = contextvars.ContextVar("node", default=None)
node_type_var: contextvars.ContextVar[str | None] = contextvars.ContextVar("node_type",
                                                                           default=None)


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


class TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        ctx = f" pid={getattr(record, 'pid', '')}"
        inst = getattr(record, "instance", None)
        if inst:
            ctx += f" instance={inst}"
        node = getattr(record, "node", None)
        if node:
            ctx += f" node={node} type={getattr(record, 'node_type', '')}"
        base = f"{self.formatTime(record)} {record.levelname.lower()} {record.name}{ctx}: "
        msg = base + record.getMessage()
        if record.exc_info:
            msg += "\n" + self.formatException(record.exc_info)
        return msg


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out = {
            "ts": self.formatTime(record),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
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
            out["exc"] = self.formatException(record.exc_info)
        return orjson.dumps(out).decode()


def setup(fmt: str = "text", level: int = logging.INFO) -> None:
    """Install the stderr handler (serve only)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(ContextFilter())
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root = logging.getLogger("pgdurable")
    root.handlers[:] = [handler]
    root.setLevel(level)
    root.propagate = False
