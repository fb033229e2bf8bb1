"""pgdurable: durable execution for PostgreSQL, compatible with pg_durable's ``df`` API.

Workflows are SQL graph values built with the ``df`` DSL and started with
``SELECT df.start(...)``; ``pgdurable serve`` runs and checkpoints every step.
This package only sets its logger's level; ``pgdurable serve`` installs handlers.
"""

from __future__ import annotations

import logging

__version__ = "0.1.0"
DF_API_LEVEL = "0.2.6"

logging.getLogger("pgdurable").addHandler(logging.NullHandler())
