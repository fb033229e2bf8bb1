"""Step runners that need no database: each takes a substituted node config, returns its result.

``http_step`` runs ``HTTP`` and ``HTTP_MULTIPART`` nodes (SPEC §3.8, D4, D12); SQL steps live with
the worker because they run inside its checkpoint transaction.
"""
