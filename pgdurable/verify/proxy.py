"""A TCP proxy between ``pgdurable serve`` and PostgreSQL that the verifier controls.

:class:`Proxy` listens on 127.0.0.1 (an ephemeral port) and forwards every connection to the
real server; serve gets the proxy's address in its DSN (:meth:`Proxy.dsn`). It runs an
asyncio loop in a thread of its own and reads the PostgreSQL wire protocol in both directions
(startup packet, then typed messages), so a fault can hit a precise point of a connection's
life. The faults (blocking calls from the verifier's thread; True when the fault happened):

    conn_reset        the next statement sent (a simple ``Query`` or an extended ``Execute``;
                      optionally only on connections of one role, e.g. the step sessions)
                      is forwarded, the server's bytes are dropped from then on, and both
                      sides are reset (RST: SO_LINGER 0) 0-20 ms later: the client is waiting
                      for the statement's reply, the server may be running it
    ambiguous_commit  the next COMMIT sent (a simple ``Query`` whose text starts with COMMIT,
                      or ``Parse`` of COMMIT then ``Sync``, as psycopg's pipeline mode sends
                      it) is forwarded; every server byte after it is dropped until the
                      server's ``CommandComplete`` of it (it committed), then both sides are
                      reset: the transaction committed and the client never learns it
    stall             the next statement sent is forwarded, then nothing moves on that
                      connection (or, ``whole``, on every connection of the proxy, new ones
                      included) for ``seconds``; then it resumes or is reset
    partition         every connection is reset, and new ones are accepted and reset at once,
                      for ``seconds`` (non-blocking)

TLS is not parsed: :meth:`Proxy.dsn` sets ``sslmode=disable`` and ``gssencmode=disable``.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import random
import socket
import struct
import threading
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import psycopg

SSL_REQUEST = 80877103
GSSENC_REQUEST = 80877104
ARM_TIMEOUT = 5.0  # how long an armed fault waits for its trigger
COMMIT_REPLY_TIMEOUT = 5.0  # an ambiguous commit whose reply never comes: reset anyway
_LINGER0 = struct.pack("ii", 1, 0)


@dataclass(eq=False)
class _Arm:
    """A fault waiting for its trigger on the next matching message of any connection."""

    kind: str  # "conn_reset", "ambiguous_commit", "stall"
    report: Callable[[bool], None]  # called once: whether the fault happened
    seconds: float = 0.0
    whole: bool = False
    close_after: bool = False
    user: str | None = None  # only on connections logged in as this role (None: any)
    settled: bool = False

    def settle(self, happened: bool) -> None:
        if not self.settled:
            self.settled = True
            self.report(happened)


@dataclass(eq=False)
class _Conn:
    """One proxied connection: its two streams and what the faults did to it."""

    client: asyncio.StreamWriter
    server: asyncio.StreamWriter
    flowing: asyncio.Event = field(default_factory=asyncio.Event)
    startup: bool = True  # the client has not sent its startup packet yet
    user: str = ""  # the role its startup packet names
    single_byte_reply: int = 0  # SSL/GSS requests answered by one byte, not a message
    opaque: bool = False  # TLS/GSS accepted: not parsed any more
    parsed_commit: bool = False  # a Parse of COMMIT was sent: the next Sync commits
    dropping: asyncio.Future[bool] | None = None  # ambiguous commit: server bytes dropped
    mute: bool = False  # a reset on its way: the server's bytes are dropped
    dead: bool = False


def _abort(w: asyncio.StreamWriter) -> None:
    """Close a stream with RST where the socket allows (SO_LINGER 0)."""
    sock = w.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER0)
    w.transport.abort()


def _startup_user(params: bytes) -> str:
    """The ``user`` of a startup packet's key/value pairs (NUL-separated)."""
    parts = params.split(b"\x00")
    for k, v in zip(parts[::2], parts[1::2], strict=False):
        if k == b"user":
            return v.decode(errors="replace")
    return ""


def _is_commit(text: bytes) -> bool:
    return text.lstrip().lower().startswith(b"commit")


class Proxy:
    """A controllable TCP proxy to ``host:port`` (see the module docstring); :meth:`close`."""

    def __init__(
        self, host: str, port: int, seed: int = 0, arm_timeout: float = ARM_TIMEOUT
    ) -> None:
        self.host, self.port = host, port
        self.arm_timeout = arm_timeout
        self.rng = random.Random(seed)
        self.conns: set[_Conn] = set()
        self.arms: list[_Arm] = []  # armed faults, oldest first
        self.lock = threading.Lock()
        self.unsettled = 0  # faults injected whose outcome is not known yet
        self.flowing: asyncio.Event | None = None  # whole-proxy stall when clear
        self.partitioned = False
        self.counts: Counter[str] = Counter()  # connections, commit tags seen, …
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True, name="proxy")
        self.thread.start()
        self.server: asyncio.Server = self._call(self._listen(), 10)
        self.listen_port: int = self.server.sockets[0].getsockname()[1]

    # -- the verifier's side (another thread) -----------------------------------------------
    def dsn(self, dsn: str) -> str:
        """``dsn`` through this proxy: its host and port replaced, TLS off."""
        info = psycopg.conninfo.conninfo_to_dict(dsn)
        info.update(host="127.0.0.1", port=str(self.listen_port))
        info.update(sslmode="disable", gssencmode="disable")
        info.pop("hostaddr", None)
        return psycopg.conninfo.make_conninfo(**info)  # type: ignore[arg-type]

    def _call(self, coro: Any, timeout: float) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def inject(self, kind: str, report: Callable[[bool], None], **kw: Any) -> None:
        """Arm the fault ``kind`` (``conn_reset``, ``ambiguous_commit``, ``stall`` with
        ``seconds``, ``whole``, ``close_after``) and return at once; ``report(happened)`` is
        called once, from the proxy's thread: True once it happened, False when its trigger
        did not come within ``arm_timeout`` (or a partition is on)."""

        with self.lock:
            self.unsettled += 1

        def settled(happened: bool) -> None:
            with self.lock:
                self.unsettled -= 1
            report(happened)

        def go() -> None:
            arm = _Arm(kind, settled, **kw)
            if self.partitioned:
                arm.settle(False)
                return
            self.arms.append(arm)

            def expire() -> None:
                if arm in self.arms:
                    self.arms.remove(arm)
                    arm.settle(False)

            self.loop.call_later(self.arm_timeout, expire)

        self.loop.call_soon_threadsafe(go)

    def _wait(self, kind: str, **kw: Any) -> bool:
        done: concurrent.futures.Future[bool] = concurrent.futures.Future()
        self.inject(kind, done.set_result, **kw)
        return done.result(self.arm_timeout + COMMIT_REPLY_TIMEOUT + 5)

    def conn_reset(self) -> bool:
        """Reset the connection of the next statement sent, just after forwarding it."""
        return self._wait("conn_reset")

    def ambiguous_commit(self) -> bool:
        """Let the next COMMIT reach the server, drop its reply, reset: True once the server
        said COMMIT (a transaction that rolled back instead does not count)."""
        return self._wait("ambiguous_commit")

    def stall(self, seconds: float, *, whole: bool, close_after: bool) -> bool:
        """Freeze the next statement's connection (``whole``: every connection) for
        ``seconds`` once it is forwarded, then resume it or (``close_after``) reset it.
        Returns once the stall started."""
        return self._wait("stall", seconds=seconds, whole=whole, close_after=close_after)

    def partition(self, seconds: float) -> None:
        """Reset every connection and refuse new ones for ``seconds`` (returns at once)."""

        def go() -> None:
            self.partitioned = True
            for c in list(self.conns):
                self._kill(c)

            def heal() -> None:
                self.partitioned = False

            self.loop.call_later(seconds, heal)

        self.loop.call_soon_threadsafe(go)

    def close(self) -> None:
        async def stop() -> None:
            self.server.close()
            for c in list(self.conns):
                self._kill(c)

        with contextlib.suppress(Exception):
            self._call(stop(), 10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=10)
        if not self.thread.is_alive():
            self.loop.close()

    # -- the loop's side --------------------------------------------------------------------
    async def _listen(self) -> asyncio.Server:
        self.flowing = asyncio.Event()
        self.flowing.set()
        return await asyncio.start_server(self._serve, "127.0.0.1", 0)

    def _flowing(self) -> bool:
        return self.flowing is None or self.flowing.is_set()

    def _kill(self, c: _Conn) -> None:
        if c.dead:
            return
        c.dead = True
        _abort(c.client)
        _abort(c.server)
        c.flowing.set()  # pumps waiting on a stall wake up and see the dead connection
        if c.dropping is not None and not c.dropping.done():
            c.dropping.set_result(False)
        self.conns.discard(c)

    async def _serve(self, cr: asyncio.StreamReader, cw: asyncio.StreamWriter) -> None:
        if self.partitioned:
            _abort(cw)
            self.counts["refused"] += 1
            return
        try:
            if self.host.startswith("/"):
                sr, sw = await asyncio.wait_for(
                    asyncio.open_unix_connection(f"{self.host}/.s.PGSQL.{self.port}"), 5
                )
            else:
                sr, sw = await asyncio.wait_for(asyncio.open_connection(self.host, self.port), 5)
        except (OSError, TimeoutError):
            _abort(cw)
            return
        c = _Conn(cw, sw)
        c.flowing.set()
        self.conns.add(c)
        self.counts["connections"] += 1
        up = asyncio.ensure_future(self._pump(c, cr, sw, True))
        down = asyncio.ensure_future(self._pump(c, sr, cw, False))
        try:
            await asyncio.wait([up, down], return_when=asyncio.FIRST_COMPLETED)
        finally:
            for t in (up, down):
                t.cancel()
            if not c.dead:
                c.dead = True
                self.conns.discard(c)
                for w in (cw, sw):
                    with contextlib.suppress(Exception):
                        w.close()

    async def _pump(
        self, c: _Conn, r: asyncio.StreamReader, w: asyncio.StreamWriter, upstream: bool
    ) -> None:
        buf = bytearray()
        with contextlib.suppress(OSError, ConnectionError):
            while not c.dead:
                data = await r.read(65536)
                if not data:
                    return
                buf += data
                while True:
                    out, after = self._frames(c, buf, upstream)
                    while not (c.flowing.is_set() and self._flowing()):
                        await c.flowing.wait()
                        if self.flowing is not None:
                            await self.flowing.wait()
                    if c.dead:
                        return
                    if out:
                        w.write(out)
                        await w.drain()
                    for act in after:
                        act()
                    if not after or not buf:
                        break  # else the messages after a fault's trigger, now

    def _frames(self, c: _Conn, buf: bytearray, upstream: bool) -> tuple[bytes, list[Any]]:
        """Split ``buf``'s complete messages off: (the bytes to forward now, the actions to
        take once they are forwarded). An incomplete message stays in ``buf``."""
        out = bytearray()
        if c.opaque:
            out += buf
            buf.clear()
            return bytes(out), []
        after: list[Any] = []
        off = 0
        n = len(buf)
        while True:
            if not upstream and c.single_byte_reply:
                if off >= n:
                    break
                c.single_byte_reply -= 1
                if buf[off] in b"SG":
                    c.opaque = True  # TLS/GSS from here on
                out += buf[off : off + 1]
                off += 1
                if c.opaque:
                    out += buf[off:]
                    off = n
                    break
                continue
            if upstream and c.startup:
                if n - off < 8:
                    break
                size = int.from_bytes(buf[off : off + 4], "big")
                if n - off < size:
                    break
                code = int.from_bytes(buf[off + 4 : off + 8], "big")
                if code in (SSL_REQUEST, GSSENC_REQUEST):
                    c.single_byte_reply += 1
                else:
                    c.startup = False
                    c.user = _startup_user(bytes(buf[off + 8 : off + size]))
                out += buf[off : off + size]
                off += size
                continue
            if n - off < 5:
                break
            kind = bytes(buf[off : off + 1])
            size = 1 + int.from_bytes(buf[off + 1 : off + 5], "big")
            if n - off < size:
                break
            msg = bytes(buf[off : off + size])
            off += size
            if upstream:
                out += msg
                act = self._client_message(c, kind, msg)
                if act is not None:
                    after.append(act)
                    break  # what follows waits for the fault (a stalled connection)
            elif c.dropping is not None:
                # an ambiguous commit: nothing more reaches the client; its CommandComplete
                # says the server has committed (or rolled back): reset both sides
                tag = msg[5:].rstrip(b"\x00") if kind == b"C" else b""
                if tag in (b"COMMIT", b"ROLLBACK"):
                    self.counts[f"commit reply {tag.decode(errors='replace')}"] += 1
                    fut = c.dropping
                    if not fut.done():
                        fut.set_result(tag == b"COMMIT")
                    self._kill(c)
                    off = n
                    break
            elif not c.mute:
                out += msg
        del buf[:off]
        return bytes(out), after

    def _client_message(self, c: _Conn, kind: bytes, msg: bytes) -> Any:
        """The fault an armed trigger fires on this client message, as an action to run once
        the message is forwarded (None: nothing)."""
        commit = False
        if kind == b"Q":
            commit = _is_commit(msg[5:])
        elif kind == b"P":
            body = msg[5:]
            name_end = body.index(b"\x00")
            # a COMMIT anywhere in a pipeline commits at its Sync, whatever follows it (the
            # worker sends a batch's checkpoint call, COMMIT and session reset together)
            c.parsed_commit = c.parsed_commit or _is_commit(body[name_end + 1 :])
        elif kind == b"S" and c.parsed_commit:
            c.parsed_commit = False
            commit = True
        if c.dead or c.dropping is not None:
            return None
        statement = kind in (b"Q", b"E")
        for arm in self.arms:
            if arm.kind == "ambiguous_commit" and commit:
                self.arms.remove(arm)
                # from now on the server's bytes are dropped (replies to messages before the
                # COMMIT too, in a pipeline: the client learns nothing more)
                self._cut_after_commit(c, arm)
                return lambda: None
            if arm.user is not None and arm.user != c.user:
                continue
            if arm.kind == "conn_reset" and statement:
                self.arms.remove(arm)
                return lambda: self._reset_soon(c, arm)
            if arm.kind == "stall" and statement:
                self.arms.remove(arm)
                return lambda: self._stall(c, arm)
        return None

    def _reset_soon(self, c: _Conn, arm: _Arm) -> None:
        c.mute = True  # the client waits for the statement's reply, which never comes
        self.loop.call_later(self.rng.uniform(0, 0.02), self._kill, c)
        arm.settle(True)

    def _cut_after_commit(self, c: _Conn, arm: _Arm) -> None:
        fut: asyncio.Future[bool] = self.loop.create_future()
        c.dropping = fut

        fut.add_done_callback(lambda f: arm.settle(f.result()))
        self.loop.call_later(COMMIT_REPLY_TIMEOUT, self._kill, c)

    def _stall(self, c: _Conn, arm: _Arm) -> None:
        gate = self.flowing if arm.whole else c.flowing
        assert gate is not None
        gate.clear()
        self.counts["stalls"] += 1

        def release() -> None:
            if arm.close_after:
                for x in list(self.conns) if arm.whole else [c]:
                    self._kill(x)
            gate.set()

        self.loop.call_later(arm.seconds, release)
        arm.settle(True)
