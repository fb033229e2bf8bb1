"""One module per step kind, each run by :mod:`pgdurable.worker.dispatch`.

``sql_step`` (a SQL step on its own, statement failures, the role's runner), ``remote`` (SQL
steps of a ``database =>`` instance), ``signal_step`` (signal waits), ``http_run`` (an HTTP
node as the worker runs it) over ``http_step`` (the request), ``http_body`` (the response
body) and ``http_policy`` (the egress policy, reviewable alone). Batches of SQL steps are
:mod:`pgdurable.worker.batch`.
"""
