"""The verifier's network faults between serve and PostgreSQL, one proxy per serve.

Every ``pgdurable serve`` of a run reaches the database through its own
:class:`~pgdurable.verify.proxy.Proxy`; :class:`NetFaults` picks the parameters of a network
fault (:data:`NET_KINDS`) and injects it through the proxy of the serve it is given:

    conn_reset        a connection reset (RST) just after a statement was sent; half of the
                      time only a step session's (the role pgdurable_step)
    ambiguous_commit  a COMMIT reaches the server, its reply never reaches the worker
    stall             a connection (or, half the time, all of the serve's) frozen for longer
                      than the lease (lease + 1 to lease + 3 s), then resumed or reset; half
                      of the time the statement that triggers it is a step session's
    partition         the serve cut from the database (every connection reset, new ones
                      refused) for 2-6 s; never two serves at once, so another keeps working
"""

from __future__ import annotations

import random
from collections.abc import Callable

import psycopg

from pgdurable.roles import STEP_ROLE

from .proxy import Proxy

NET_KINDS = ("conn_reset", "ambiguous_commit", "stall", "partition")


class NetFaults:
    """The proxies of a run's serves and the network faults injected through them."""

    def __init__(self, server_dsn: str, n: int, rng: random.Random, lease_seconds: float) -> None:
        info = psycopg.conninfo.conninfo_to_dict(server_dsn)
        host = str(info.get("host") or "127.0.0.1")
        port = int(info.get("port") or 5432)
        self.rng = rng
        self.lease = lease_seconds
        self.proxies = [Proxy(host, port, seed=rng.randrange(1 << 30)) for _ in range(n)]

    def dsn(self, i: int, dsn: str) -> str:
        """``dsn`` through serve ``i``'s proxy."""
        return self.proxies[i].dsn(dsn)

    def retarget(self, port: int) -> None:
        """PostgreSQL now listens on ``port``: every proxy's new connections go there."""
        for p in self.proxies:
            p.port = port

    def fault(self, kind: str, i: int, report: Callable[[bool], None]) -> None:
        """Inject ``kind`` on serve ``i``'s connections without waiting; ``report(happened)``
        is called once (from a proxy's thread, or here for a partition): False when the
        trigger of an armed fault (a statement, a COMMIT) did not come within
        :data:`~pgdurable.verify.proxy.ARM_TIMEOUT`, or a partition was already on."""
        p = self.proxies[i]
        if kind == "conn_reset":
            # half of the resets hit a step session mid-statement: left to chance, nearly all
            # land on the claims and heartbeats, which run far more often than steps
            step = self.rng.random() < 0.5
            p.inject(kind, report, user=STEP_ROLE if step else None)
        elif kind == "ambiguous_commit":
            p.inject(kind, report)
        elif kind == "stall":
            p.inject(
                kind,
                report,
                seconds=self.rng.uniform(self.lease + 1, self.lease + 3),
                whole=self.rng.random() < 0.5,
                close_after=self.rng.random() < 0.5,
                # as for resets: half of the stalls catch a step session mid-statement (the
                # case that tests fencing: another worker takes the step over meanwhile)
                user=STEP_ROLE if self.rng.random() < 0.5 else None,
            )
        elif kind == "partition":
            if any(q.partitioned for q in self.proxies):
                report(False)
                return
            p.partition(self.rng.uniform(2, 6))
            report(True)
        else:
            raise ValueError(f"not a network fault: {kind!r}")

    def pending(self) -> bool:
        """Whether a fault injected is still waiting for its trigger or its outcome."""
        return any(p.unsettled for p in self.proxies)

    def counts(self) -> dict[str, int]:
        """What the proxies saw, summed: connections, refused ones, commit replies dropped."""
        out: dict[str, int] = {}
        for p in self.proxies:
            for k, v in p.counts.items():
                out[k] = out.get(k, 0) + v
        return out

    def close(self) -> None:
        for p in self.proxies:
            p.close()
