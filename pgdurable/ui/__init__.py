"""``pgdurable ui``: the operational web dashboard (runs, a run's graph, actions, system).

- :mod:`.app`: the ASGI application (Starlette), its request guard (Host, token, CSRF,
  security headers), :class:`UiConfig` and :func:`serve_forever` (uvicorn);
- :mod:`.views`: the pages and the actions (HTML forms posting back);
- :mod:`.data`: every read and action, as ``df`` API calls on the dashboard's own login;
- :mod:`.svg`: the server-rendered graph (a layered tree layout) and the per-minute chart;
- :mod:`.launch`: a detached dashboard beside the embedded PostgreSQL (``make demo``);
- ``templates/`` (Jinja2, autoescaped) and ``static/`` (the one stylesheet and script).

The web libraries (starlette, uvicorn, jinja2) are the ``ui`` extra; importing this package
does not import them.
"""

from __future__ import annotations

__all__: list[str] = []
