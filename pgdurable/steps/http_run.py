"""An HTTP node as the worker runs it: the privilege re-check at run time (gate 0), the
node's config substituted, then the request (:func:`pgdurable.steps.http_step.run_http`,
under :mod:`pgdurable.steps.http_policy`). Holds the process's one HTTP client."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from pgdurable.errors import StepError
from pgdurable.graph._abc import LOOP, NONE, RETRY
from pgdurable.values import loads
from pgdurable.worker.instance import InstanceCtx, subst
from pgdurable.worker.task import Task


def idempotency_key(ctx: InstanceCtx, idx: int) -> str:
    """The node's ``Idempotency-Key`` (docs/decisions.md D4): ``pgdurable-<instance>-<node>``,
    the same for every attempt of the request (a crash, a df.retry attempt, a df.restart),
    with ``-<i>.<j>…`` after it (the iteration of each enclosing LOOP, outermost first) once
    one of them is past its first iteration: each loop iteration is a new logical call."""
    g = ctx.graph
    iterations: list[int] = []
    p = g.parent[idx]
    while p != NONE:
        if g.types[p] == LOOP:
            iterations.append(ctx.sched.iteration(p))
        p = g.parent[p]
    key = f"pgdurable-{ctx.instance_id}-{g.node_ids[idx]}"
    if any(i != 1 for i in iterations):
        key += "-" + ".".join(str(i) for i in reversed(iterations))
    return key


def under_retry(ctx: InstanceCtx, idx: int) -> bool:
    """The node runs inside a df.retry: a 429 (Too Many Requests) is then a failure the RETRY
    repeats after the server's Retry-After, not a result (docs/retry.md)."""
    g = ctx.graph
    p = g.parent[idx]
    while p != NONE:
        if g.types[p] == RETRY:
            return True
        p = g.parent[p]
    return False


class HttpSteps:
    """HTTP and HTTP_MULTIPART steps of one worker process."""

    def __init__(
        self,
        *,
        pool: Callable[[], Any],
        q: Callable[[str], Any],
        policy: str,
        allow: list[str],
    ) -> None:
        self.pool = pool
        self.q = q
        self.policy_text, self.allow = policy, allow
        self.client: Any = None
        self.policy: Any = None

    def open(self) -> None:
        """Build the policy and the process's one client (in the worker's event loop)."""
        try:
            from pgdurable.steps.http_step import HttpPolicy, make_client

            self.policy = HttpPolicy.from_strings(self.policy_text, self.allow)
            self.client = make_client(self.policy)
        except ImportError:  # pragma: no cover - http step not built
            self.client = None

    async def close(self) -> None:
        if self.client is not None:
            await self.client.aclose()

    async def run(self, ctx: InstanceCtx, task: Task, idx: int, multipart: bool) -> Any:
        """The node's result envelope; raises StepError for its failure."""
        from pgdurable.steps.http_step import run_http
        from pgdurable.subst import substitute_whole_value

        if self.client is None:
            raise StepError("HTTP steps are not available in this build")
        # privilege re-check at run time (gate 0): the graph may have been built without
        # calling df.http (a JSON literal) or the grant revoked since df.start
        fn = (
            "df.http_multipart(text,text,jsonb,jsonb,integer)"
            if multipart
            else "df.http(text,text,text,jsonb,integer)"
        )
        async with self.pool().connection() as conn:
            cur = await conn.execute(self.q("http_privilege"), (ctx.role_oid, ctx.role_oid, fn))
            row = await cur.fetchone()
        if not row or not row[0]:
            raise StepError(
                f"role {ctx.role_name!r} does not have EXECUTE privilege on {fn}; "
                f"grant it with df.grant_usage({ctx.role_name!r}, "
                "include_http => true)"
            )
        cfg = loads(ctx.configs[idx])  # exact: a JSON body's numbers are sent as written
        if isinstance(cfg.get("url"), str):
            cfg["url"] = subst(ctx, cfg["url"], "raw")
        if not multipart and isinstance(cfg.get("body"), str):
            cfg["body"] = subst(ctx, cfg["body"], "raw")
        if isinstance(cfg.get("headers"), dict):
            cfg["headers"] = {
                k: subst(ctx, v, "raw") if isinstance(v, str) else v
                for k, v in cfg["headers"].items()
            }
        if multipart and isinstance(cfg.get("parts"), list):
            parts = []
            for part in cfg["parts"]:
                if isinstance(part, dict):
                    part = dict(part)
                    for field in ("name", "filename"):
                        if isinstance(part.get(field), str):
                            part[field] = subst(ctx, part[field], "raw")
                    if isinstance(part.get("data_b64"), str):
                        part["data_b64"] = substitute_whole_value(
                            part["data_b64"],
                            results=ctx.named,
                            vars=ctx.vars,
                            instance_id=ctx.instance_id,
                            label=ctx.label,
                        )
                parts.append(part)
            cfg["parts"] = parts
        key = idempotency_key(ctx, idx)
        return await run_http(
            self.client,
            self.policy,
            "HTTP_MULTIPART" if multipart else "HTTP",
            cfg,
            key,
            fail_on_429=under_retry(ctx, idx),
        )
