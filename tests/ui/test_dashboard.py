"""``pgdurable ui`` driven through a real headless browser against a running ``serve``.

Set-up per server (module scope, so the whole module costs one database, one serve, three
dashboards and one browser per server; about 30 s each):

- a fresh database (cloned from the harness's template) and two tenant roles, alice and bob;
- ``pgdurable serve --ui-port`` (as pgdurable_service) running alice's dashboard in one of
  its own children (**A**);
- ``pgdurable ui`` as bob (**B**), and ``pgdurable ui --read-only --token …`` as alice
  (**R**);
- Debian's chromium + chromedriver (``make browser`` installs them; ``make test`` runs it),
  driven by selenium, headless.

It runs on every discovered server (PG 18 embedded and PG 15): the dashboard reads through
the df API, whose functions and row-level security are the server's.

Screenshots of the runs list and of a run page go to the pytest tmp dir (and the run page's
to docs/img/ui-run.png, the README's picture, with PGDURABLE_UPDATE_SCREENSHOTS=1); both are
decoded (stdlib zlib) and must show many colours, so a blank or unstyled page fails.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import shutil
import socket
import struct
import subprocess
import sys
import time
import uuid
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest
from psycopg import sql

from tests import fix_db
from tests.acceptance.conftest import ROOT, Serve
from tests.fix_db import TEMPLATE_DB, Server

webdriver = pytest.importorskip("selenium.webdriver", reason="the test extra installs selenium")
from selenium.common.exceptions import (  # noqa: E402
    NoAlertPresentException,
    StaleElementReferenceException,
)
from selenium.webdriver.common.by import By  # noqa: E402

TOKEN = "ui-test-token-" + uuid.uuid4().hex
HOSTILE_LABEL = "<img src=x onerror=\"window.__pwned='label'\">"
HOSTILE_SQL = "select '<script>window.__pwned=''query''</script>' as x"
WAIT = 30.0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Env:
    db: fix_db.TestDB
    alice: str
    bob: str
    a: str  # base URLs of the three dashboards
    b: str
    r: str
    driver: Any
    shots: Path
    serve: Serve

    def conn(self, role: str) -> psycopg.Connection[tuple[object, ...]]:
        return self.db.connect(role)

    def start(self, expr: str, label: str | None = None, role: str | None = None) -> str:
        with self.conn(role or self.alice) as c:
            row = c.execute(f"select df.start({expr}, %s)".encode(), (label,)).fetchone()
        assert row is not None
        return str(row[0])

    def status(self, iid: str) -> str | None:
        with self.conn(self.alice) as c:
            row = c.execute("select df.status(%s)", (iid,)).fetchone()
        return None if row is None else row[0]  # type: ignore[return-value]

    def await_(self, iid: str, timeout: int = 30) -> str:
        with self.conn(self.alice) as c:
            row = c.execute("select df.await_instance(%s, %s)", (iid, timeout)).fetchone()
        assert row is not None
        return str(row[0])

    def wait_node_running(self, iid: str, node_type: str) -> None:
        until(
            lambda: any(r[0] == node_type and r[1] == "running" for r in self.nodes(iid)),
            f"a running {node_type} node in {iid}",
            self,
        )

    def nodes(self, iid: str) -> list[tuple[Any, ...]]:
        with self.conn(self.alice) as c:
            return c.execute(
                "select node_type, coalesce(inferred_status, status), node_id, "
                "query from df.instance_nodes(%s)",
                (iid,),
            ).fetchall()


def until(cond: Callable[[], Any], what: str, env: Env | None = None, timeout: float = WAIT) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            got = cond()
        except StaleElementReferenceException:  # the live region was redrawn under us: again
            got = None
        if got:
            return got
        time.sleep(0.1)
    raise AssertionError(
        f"timed out waiting for {what}" + (f"\nserve log:\n{env.serve.log()}" if env else "")
    )


def _wait_http(url: str, proc: subprocess.Popen[bytes] | None, log: Path) -> None:
    deadline = time.monotonic() + WAIT
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"{url} exited:\n{log.read_text(errors='replace')}")
        try:
            if httpx.get(url + "healthz", timeout=2).status_code in (200, 401):
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise AssertionError(f"{url} did not answer:\n{log.read_text(errors='replace')}")


def _browser() -> Any:
    chromium = shutil.which("chromium")
    driver_path = shutil.which("chromedriver")
    if not chromium or not driver_path:
        pytest.fail(
            "chromium and chromedriver are missing: `make browser` installs them "
            "(`make test` does it first)"
        )
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = chromium
    for arg in (
        "--headless=new",
        "--no-sandbox",
        "--disable-dev-shm-usage",
        "--disable-gpu",
        "--window-size=1400,1000",
        "--hide-scrollbars",
        "--force-device-scale-factor=1",
        "--no-first-run",
        "--disable-extensions",
        "--disable-background-networking",
    ):
        opts.add_argument(arg)
    return webdriver.Chrome(service=Service(driver_path), options=opts)


@pytest.fixture(scope="module")
def env(server: Server, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    tmp = tmp_path_factory.mktemp(f"ui-{server.name}")
    name = f"t_{uuid.uuid4().hex[:12]}"
    strategy = sql.SQL(" strategy file_copy") if server.version >= 15 else sql.SQL("")
    with psycopg.connect(server.install_dsn("postgres"), autocommit=True) as conn:
        conn.execute(
            sql.SQL("create database {} template {}{}").format(
                sql.Identifier(name), sql.Identifier(TEMPLATE_DB), strategy
            )
        )
    db = fix_db.TestDB(server, name)
    procs: list[subprocess.Popen[bytes]] = []
    serve: Serve | None = None
    driver = None
    try:
        alice, bob = db.create_role("ui_alice"), db.create_role("ui_bob")
        pa, pb, pr = _free_port(), _free_port(), _free_port()
        serve = Serve(
            db,
            {"PGDURABLE_SERVE_UI_PORT": str(pa), "PGDURABLE_UI_DSN": db.dsn_as(alice)},
            log_path=tmp / "serve.log",
        ).start()
        for port, role, extra in ((pb, bob, []), (pr, alice, ["--read-only"])):
            env = dict(os.environ, PGDURABLE_UI_DSN=db.dsn_as(role))
            if extra:
                env["PGDURABLE_UI_TOKEN"] = TOKEN
            log = tmp / f"ui-{port}.log"
            with log.open("ab") as out:
                procs.append(
                    subprocess.Popen(
                        [sys.executable, "-m", "pgdurable", "ui", "--port", str(port), *extra],
                        env=env,
                        stdout=out,
                        stderr=subprocess.STDOUT,
                        cwd=ROOT,
                    )
                )
            _wait_http(f"http://127.0.0.1:{port}/", procs[-1], log)
        _wait_http(f"http://127.0.0.1:{pa}/", None, tmp / "serve.log")
        driver = _browser()
        driver.set_page_load_timeout(WAIT)
        yield Env(
            db,
            alice,
            bob,
            f"http://127.0.0.1:{pa}/",
            f"http://127.0.0.1:{pb}/",
            f"http://127.0.0.1:{pr}/",
            driver,
            tmp,
            serve,
        )
    finally:
        if driver is not None:
            driver.quit()
        for p in procs:
            p.terminate()
        for p in procs:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        if serve is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                serve.stop(timeout=30)
            serve.cleanup()
        with psycopg.connect(server.admin_dsn, autocommit=True) as conn:
            conn.execute(
                sql.SQL("drop database if exists {} with (force)").format(sql.Identifier(name))
            )
            for role in db.roles:
                with contextlib.suppress(psycopg.Error):
                    conn.execute(sql.SQL("drop role if exists {}").format(sql.Identifier(role)))


def _css(driver: Any, selector: str) -> list[Any]:
    return driver.find_elements(By.CSS_SELECTOR, selector)


def _wait_css(env: Env, selector: str, what: str = "") -> Any:
    return until(lambda: _css(env.driver, selector), what or selector, env)[0]


def _click(env: Env, selector: str) -> None:
    """Click the element ``selector`` once it is there; the live region may be redrawn
    between finding and clicking (then the new element is clicked)."""

    def attempt() -> bool:
        try:
            _wait_css(env, selector).click()
        except StaleElementReferenceException:
            return False
        return True

    until(attempt, f"a click on {selector}", env)


def _no_script_ran(driver: Any) -> None:
    assert driver.execute_script("return window.__pwned === undefined"), driver.execute_script(
        "return window.__pwned"
    )
    with pytest.raises(NoAlertPresentException):
        driver.switch_to.alert.text  # noqa: B018


# -- PNG check (stdlib only) ------------------------------------------------------------


def png_colours(data: bytes) -> int:
    """Distinct pixel colours of an 8-bit RGB/RGBA PNG (non-interlaced), decoded with zlib."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    pos, idat, width = 8, b"", 0
    height = depth = ctype = 0
    while pos < len(data):
        length, kind = struct.unpack(">I4s", data[pos : pos + 8])
        chunk = data[pos + 8 : pos + 8 + length]
        if kind == b"IHDR":
            width, height, depth, ctype = struct.unpack(">IIBB", chunk[:10])
        elif kind == b"IDAT":
            idat += chunk
        pos += 12 + length
    assert depth == 8, depth
    assert ctype in (2, 6), ctype
    bpp = 3 if ctype == 2 else 4
    raw = zlib.decompress(idat)
    stride = width * bpp
    prev = bytearray(stride)
    colours: set[bytes] = set()
    for y in range(height):
        f = raw[y * (stride + 1)]
        line = bytearray(raw[y * (stride + 1) + 1 : (y + 1) * (stride + 1)])
        for i in range(stride):
            a = line[i - bpp] if i >= bpp else 0
            b = prev[i]
            c = prev[i - bpp] if i >= bpp else 0
            if f == 1:
                line[i] = (line[i] + a) & 0xFF
            elif f == 2:
                line[i] = (line[i] + b) & 0xFF
            elif f == 3:
                line[i] = (line[i] + (a + b) // 2) & 0xFF
            elif f == 4:
                p = a + b - c
                pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
                line[i] = (line[i] + (a if pa <= pb and pa <= pc else b if pb <= pc else c)) & 0xFF
        if y % 4 == 0:  # every 4th row is plenty to tell a page from a blank
            colours.update(bytes(line[i : i + 3]) for i in range(0, stride, bpp * 2))
        prev = line
    return len(colours)


def _shot(env: Env, name: str) -> bytes:
    path = env.shots / name
    assert env.driver.save_screenshot(str(path))
    data = path.read_bytes()
    n = png_colours(data)
    assert n > 40, f"{name} looks blank: {n} distinct colours"
    return data


# -- the tests ---------------------------------------------------------------------------


def test_png_colours_tells_blank_from_page() -> None:
    # a 4x2 RGB image, one colour: the decoder must report 1 (the check above needs > 40)
    row = b"\x00" + b"\xff\xff\xff" * 4
    ihdr = struct.pack(">IIBBBBB", 4, 2, 8, 2, 0, 0, 0)

    def chunk(kind: bytes, body: bytes) -> bytes:
        return (
            struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
        )

    png = (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(row * 2))
        + chunk(b"IEND", b"")
    )
    assert png_colours(png) == 1


def test_list_shows_a_started_run_grouped_by_label(env: Env) -> None:
    label = f"nightly-{uuid.uuid4().hex[:6]}"
    first = env.start("df.sql('select 1')", label)
    env.await_(first)
    second = env.start("df.sleep(600)", label)
    d = env.driver
    d.get(env.a)
    row = _wait_css(env, f'tr.run[data-run="{second}"]')
    assert row.get_attribute("data-status") in ("pending", "running")
    group = d.find_element(By.CSS_SELECTOR, f'section.group[data-label="{label}"]')
    assert group.find_element(By.CSS_SELECTOR, "h2 .label-text").text == label
    # newest first, and the strip has one coloured cell per run
    runs = [r.get_attribute("data-run") for r in group.find_elements(By.CSS_SELECTOR, "tr.run")]
    assert runs == [second, first]
    cells = group.find_elements(By.CSS_SELECTOR, ".strip a.cell")
    assert [c.get_attribute("href").rsplit("/", 1)[1] for c in cells] == [second, first]
    assert "st-completed" in cells[1].get_attribute("class").split()
    # filters: by label (exact), by status
    d.get(env.a + f"?label={label}&status=completed")
    _wait_css(env, f'tr.run[data-run="{first}"]')
    assert not _css(d, f'tr.run[data-run="{second}"]')
    d.get(env.a + f"?label={label}")
    _wait_css(env, f'tr.run[data-run="{second}"]')
    d.execute_script("document.getElementById('live').dataset.marker = 'loaded once'")
    with env.conn(env.alice) as c:
        c.execute("select df.cancel(%s)", (second,))
    # the list updates by itself (polling): the cancelled run's status shows, no reload
    until(
        lambda: _css(d, f'tr.run[data-run="{second}"][data-status="cancelled"]'),
        "the list to show the run cancelled",
        env,
    )
    assert (
        d.execute_script("return document.getElementById('live').dataset.marker") == "loaded once"
    )
    d.get(env.a)
    _wait_css(env, "tr.run")
    _shot(env, "ui-list.png")


_COUNT_POLLS = """
window.__polls = [];
const original = window.fetch;
window.fetch = function () {
  window.__polls.push([performance.now(), document.visibilityState]);
  return original.apply(this, arguments);
};
"""


def test_polling_backs_off_pauses_in_hidden_tabs_and_stops_for_finished_runs(env: Env) -> None:
    label = f"quiet-{uuid.uuid4().hex[:6]}"
    iid = env.start("df.sql('select 1')", label)
    assert env.await_(iid) == "completed"
    d = env.driver
    d.get(env.a + f"?label={label}")
    _wait_css(env, f'tr.run[data-run="{iid}"]')
    d.execute_script(_COUNT_POLLS)
    time.sleep(5)
    polls = d.execute_script("return window.__polls")
    # nothing changes: 1 s, then 1.5 s, 2.25 s, … apart (every second would be 5)
    assert 2 <= len(polls) <= 4, polls
    gaps = [b[0] - a[0] for a, b in itertools.pairwise(polls)]
    assert all(g2 > g1 for g1, g2 in itertools.pairwise(gaps)), gaps
    # a hidden tab does not poll (a fresh page would at 1 s and 2.5 s); shown again, it
    # polls at once
    d.get(env.a + f"?label={label}")
    _wait_css(env, f'tr.run[data-run="{iid}"]')
    d.execute_script(_COUNT_POLLS)
    first = d.current_window_handle
    d.switch_to.new_window("tab")
    time.sleep(3)
    d.close()
    d.switch_to.window(first)
    polls = until(lambda: d.execute_script("return window.__polls"), "a poll once shown", env)
    assert all(state == "visible" for _, state in polls), polls
    # a finished run's page does not poll at all
    d.get(env.a + f"runs/{iid}")
    d.execute_script(_COUNT_POLLS)
    time.sleep(2.5)
    assert d.execute_script("return window.__polls") == []


def test_list_pages_by_cursor(env: Env) -> None:
    label = f"paged-{uuid.uuid4().hex[:6]}"
    with env.conn(env.alice) as c:
        ids = [
            str(c.execute("select df.start(df.sleep(600), %s)", (label,)).fetchone()[0])  # type: ignore[index]
            for _ in range(52)
        ]
        for iid in ids:  # one per transaction (a workflow's cancel takes its row lock)
            c.execute("select df.cancel(%s)", (iid,))
    d = env.driver
    d.get(env.a + f"?label={label}")
    first = [r.get_attribute("data-run") for r in _css(d, "tr.run")]
    assert first == ids[::-1][:50]
    d.find_element(By.ID, "older").click()
    until(lambda: "after=" in d.current_url, "the second page", env)
    second = [r.get_attribute("data-run") for r in _css(d, "tr.run")]
    assert second == ids[::-1][50:]
    assert not _css(d, "#older")
    d.find_element(By.ID, "newest").click()
    until(lambda: "after=" not in d.current_url, "the first page again", env)


def test_run_page_draws_the_graph_with_status_colours(env: Env) -> None:
    iid = env.start(
        """df.sql('select 1 as n') |=> 'one'
        ~> ((df.sql('select $one + 1 as two') |=> 'two') & df.sql('select 3'))
        ~> df.if(df.sql('select $two > 1'), df.sql('select ''then arm'''),
                 df.sql('select ''else arm'''))
        ~> (df.sql('select 4') | df.sleep(30))""",
        "graph",
    )
    assert env.await_(iid) == "completed"
    want = {str(r[2]): str(r[1]) for r in env.nodes(iid)}
    d = env.driver
    d.get(env.a + f"runs/{iid}")
    nodes = _css(d, "svg.graph g.node")
    assert {n.get_attribute("data-node"): n.get_attribute("data-status") for n in nodes} == want
    for n in nodes:
        assert f"st-{want[n.get_attribute('data-node')]}" in n.get_attribute("class").split()
    assert "skipped" in want.values()
    assert "completed" in want.values()
    # THENs are circles on the arrows of their chain, the other composites frames
    types = [str(r[0]) for r in env.nodes(iid)]
    assert len(_css(d, "svg.graph g.node.t-THEN > circle")) == types.count("THEN")
    for t in ("JOIN", "IF", "RACE"):
        assert len(_css(d, f"svg.graph g.node.t-{t}.frame > rect")) == types.count(t)
    assert _css(d, "svg.graph text.role-winner")
    # the race's winner is marked, and the abandoned sleep is not a winner
    assert len(_css(d, "svg.graph g.node.winner")) == 1
    # a node opens its query and result
    nid = next(str(r[2]) for r in env.nodes(iid) if r[3] == "select 1 as n")
    d.find_element(By.CSS_SELECTOR, f'svg.graph g.node[data-node="{nid}"]').click()
    until(lambda: f"node={nid}" in d.current_url, "the node's page", env)
    assert d.find_element(By.ID, "node-query").text == "select 1 as n"
    assert '"n": 1' in d.find_element(By.ID, "node-result").text
    assert f"runs/{iid}/nodes/{nid}/result.json" in d.find_element(
        By.CSS_SELECTOR, "#node a.dl"
    ).get_attribute("href")
    assert "st-completed" in d.find_element(By.CSS_SELECTOR, "#run-status").get_attribute("class")
    _shot(env, "ui-run.png")


def test_readme_screenshot(env: Env) -> None:
    """The README's picture: a run with a join, a condition (one arm skipped) and a race,
    one step still waiting, its SIGNAL node selected."""
    iid = env.start(
        """df.sql('select count(*) as n from generate_series(1, 250)') |=> 'orders'
        ~> ((df.sql('select $orders.n * 10 as total') |=> 'sum')
            & df.sql('select now() as checked_at'))
        ~> df.if(df.sql('select $sum.total > 100'),
                 df.sql('select ''big batch'' as verdict'),
                 df.sql('select ''small batch'' as verdict'))
        ~> (df.sql('select pg_sleep(0.2)') | df.sleep(60))
        ~> df.wait_for_signal('approve', 3600)
        ~> df.sql('update orders set status = ''approved''')""",
        "nightly-orders",
    )
    env.wait_node_running(iid, "SIGNAL")
    sig = next(str(r[2]) for r in env.nodes(iid) if r[0] == "SIGNAL")
    d = env.driver
    d.get(env.a + f"runs/{iid}?node={sig}")
    _wait_css(env, "form.approve")
    d.set_window_size(1400, 1320)  # the whole graph, down to the waiting signal
    try:
        data = _shot(env, "ui-run-readme.png")
    finally:
        d.set_window_size(1400, 1000)
    # the README's picture is refreshed on request only (a test run leaves the tree clean)
    if os.environ.get("PGDURABLE_UPDATE_SCREENSHOTS") == "1":
        (ROOT / "docs" / "img").mkdir(parents=True, exist_ok=True)
        (ROOT / "docs" / "img" / "ui-run.png").write_bytes(data)
    with env.conn(env.alice) as c:
        c.execute("select df.cancel(%s)", (iid,))


def test_signal_from_the_page_completes_an_approval(env: Env) -> None:
    iid = env.start("df.wait_for_signal('approve', 600) ~> 'select 1'", "approval")
    d = env.driver
    d.get(env.a + f"runs/{iid}")  # perhaps before the wait began: the page updates itself
    _wait_css(env, "form.approve button", "the Approve button")

    def signal_name() -> str | None:
        try:  # the live region may be redrawn between finding the element and reading it
            return d.find_element(By.CSS_SELECTOR, ".wait").get_attribute("data-signal")
        except StaleElementReferenceException:
            return None

    until(lambda: signal_name() == "approve", "the wait to name its signal", env)
    _click(env, "form.approve button")
    until(lambda: "done=signalled" in d.current_url, "the redirect after the signal", env)
    assert d.find_element(By.ID, "flash").text == "Signal sent."
    assert env.await_(iid) == "completed"
    until(
        lambda: d.find_element(By.ID, "run-status").text == "completed",
        "the page to show the run completed (live update)",
        env,
    )
    sig = next(str(r[2]) for r in env.nodes(iid) if r[0] == "SIGNAL")
    with env.conn(env.alice) as c:
        res = c.execute(
            "select result from df.instance_nodes(%s) where node_id = %s", (iid, sig)
        ).fetchone()
    assert res is not None
    assert '"approved": true' in str(res[0])
    assert not _css(d, "#actions")  # a finished run has nothing to act on


def test_signal_with_a_json_payload_and_a_bad_one(env: Env) -> None:
    iid = env.start(
        "df.wait_for_signal('payment', 600) |=> 'p'"
        " ~> df.sql('select ($p.data)::jsonb ->> ''amount'' as amount')",
        "pay",
    )
    env.wait_node_running(iid, "SIGNAL")
    d = env.driver
    d.get(env.a + f"runs/{iid}")
    form = _wait_css(env, 'form.signal textarea[name="data"]')
    assert not _css(d, "form.approve")  # not an approval: no one-click approve
    form.clear()
    form.send_keys("{not json")
    d.find_element(By.CSS_SELECTOR, '.wait form.signal button[type="submit"]').click()
    _wait_css(env, "#error")
    assert d.find_element(By.CSS_SELECTOR, "#error h1").text == "signal data is not JSON"
    assert env.status(iid) == "running"
    d.get(env.a + f"runs/{iid}")
    form = _wait_css(env, 'form.signal textarea[name="data"]')
    form.clear()
    form.send_keys('{"amount": 42}')
    d.find_element(By.CSS_SELECTOR, '.wait form.signal button[type="submit"]').click()
    assert env.await_(iid) == "completed"
    with env.conn(env.alice) as c:
        assert c.execute(
            "select df.result(%s)::jsonb -> 'rows' -> 0 ->> 'amount'", (iid,)
        ).fetchone() == ("42",)


def test_cancel_from_the_page(env: Env) -> None:
    iid = env.start("df.sleep(600) ~> 'select 1'", "to-cancel")
    d = env.driver
    d.get(env.a + f"runs/{iid}")
    _click(env, "details.cancel summary")
    reason = d.find_element(By.CSS_SELECTOR, '#cancel-form input[name="reason"]')
    reason.clear()
    reason.send_keys("stopped by the UI test")
    d.find_element(By.CSS_SELECTOR, '#cancel-form button[type="submit"]').click()
    until(lambda: "done=cancelled" in d.current_url, "the redirect after cancel", env)
    assert env.await_(iid) == "cancelled"
    until(
        lambda: d.find_element(By.ID, "run-status").text == "cancelled",
        "the page to show the run cancelled",
        env,
    )
    # a finished run's page stops polling
    until(
        lambda: d.find_element(By.ID, "live").get_attribute("data-final") == "1",
        "the page to stop polling",
        env,
    )


def test_restart_a_failed_run_from_the_page(env: Env) -> None:
    """A step fails on a missing table; the table is made; the page's restart button runs the
    rest of the workflow: the run completes, its completed step did not run again (a counter
    table), and the page lists both runs, the first with its error."""
    with env.db.connect() as c:
        c.execute("create table public.ui_hits (tag text)")
        c.execute(
            sql.SQL("grant select, insert on public.ui_hits to {}").format(
                sql.Identifier(env.alice)
            )
        )
    iid = env.start(
        "df.sql('insert into public.ui_hits values (''a'')')"
        " ~> df.sql('insert into public.ui_late values (1)')",
        "to-restart",
    )
    assert env.await_(iid) == "failed"
    d = env.driver
    d.get(env.a + f"runs/{iid}")
    assert d.find_element(By.CSS_SELECTOR, "#run-error .sqlstate").text == "42P01"
    assert not _css(d, "#runs"), "one run: no run history yet"
    with env.db.connect() as c:
        c.execute("create table public.ui_late (x int)")
        c.execute(sql.SQL("grant insert on public.ui_late to {}").format(sql.Identifier(env.alice)))
    _click(env, '#restart-form button[name="restart"]')
    until(lambda: "done=restarted" in d.current_url, "the redirect after restart", env)
    assert env.await_(iid) == "completed"
    until(
        lambda: d.find_element(By.ID, "run-status").text == "completed",
        "the page to show the run completed",
        env,
    )
    runs = until(lambda: _css(d, "#runs tr.run-row"), "the page's run history", env)
    assert [(r.get_attribute("data-run"), r.get_attribute("data-status")) for r in runs] == [
        ("1", "failed"),
        ("2", "completed"),
    ]
    first = runs[0].find_element(By.CSS_SELECTOR, ".run-error").text
    assert "42P01" in first
    assert "ui_late" in first
    assert not _css(d, "#restart-form")
    assert not _css(d, "#run-error")
    with env.db.connect() as c:
        assert c.execute("select count(*) from public.ui_hits").fetchone() == (1,)
        assert c.execute("select count(*) from public.ui_late").fetchone() == (1,)


def test_a_large_result_is_cut_with_a_download(env: Env) -> None:
    iid = env.start("df.sql('select repeat(''x'', 200000) as big')", "large")
    assert env.await_(iid) == "completed"
    d = env.driver
    d.get(env.a + f"runs/{iid}")
    assert d.find_element(By.ID, "live").get_attribute("data-final") == "1"
    assert "bytes: the first" in d.find_element(By.ID, "run-result-cut").text
    shown = d.find_element(By.CSS_SELECTOR, "#run-result pre").get_attribute("textContent")
    assert len(shown) < 70_000
    full = httpx.get(env.a + f"runs/{iid}/result.json")
    assert full.status_code == 200
    assert full.headers["content-disposition"] == f'attachment; filename="{iid}-result.json"'
    assert full.json()["rows"][0]["big"] == "x" * 200_000


def test_start_a_run_from_the_page(env: Env) -> None:
    d = env.driver
    d.get(env.a + "new")
    d.find_element(By.CSS_SELECTOR, 'textarea[name="expr"]').send_keys(
        "df.sql('select 20 + 1 as x') |=> 'x' ~> df.sql('select $x * 2 as y')"
    )
    d.find_element(By.CSS_SELECTOR, 'input[name="label"]').send_keys("from-the-page")
    d.find_element(By.CSS_SELECTOR, 'button[name="start"]').click()
    until(lambda: "done=started" in d.current_url, "the new run's page", env)
    iid = d.current_url.split("/runs/")[1][:8]
    assert env.await_(iid) == "completed"
    with env.conn(env.alice) as c:
        row = c.execute(
            "select label, submitted_by::text, df.result(id)::jsonb -> 'rows' -> 0"
            " ->> 'y' from df.instances where id = %s",
            (iid,),
        ).fetchone()
    assert row == ("from-the-page", env.alice, "42")
    # an expression that writes is refused: it is evaluated in a read-only transaction
    d.get(env.a + "new")
    d.find_element(By.CSS_SELECTOR, 'textarea[name="expr"]').send_keys(
        "(select df.sql('select 1') from (select nextval('ui_no_such_seq')) s)"
    )
    d.find_element(By.CSS_SELECTOR, 'button[name="start"]').click()
    problem = _wait_css(env, "#problem")
    assert "could not start the run" in problem.text
    # a failed run shows its error and SQLSTATE; restart is offered only where df.restart
    # exists (schema version 5 on; test_restart_a_failed_run_from_the_page uses it)
    failed = env.start("df.sql('select 1/0')", "fails")
    assert env.await_(failed) == "failed"
    d.get(env.a + f"runs/{failed}")
    assert d.find_element(By.CSS_SELECTOR, "#run-error .sqlstate").text == "22012"
    assert "division by zero" in d.find_element(By.CSS_SELECTOR, "#run-error pre").text
    with env.conn(env.alice) as c:
        has_restart = c.execute("select to_regprocedure('df.restart(text)') is not null").fetchone()
    assert bool(_css(d, "#restart-form")) == bool(has_restart and has_restart[0])


def _session(base: str, headers: dict[str, str] | None = None) -> tuple[httpx.Client, str]:
    """An HTTP client with the dashboard's cookies and the CSRF token of its forms."""
    client = httpx.Client(base_url=base, follow_redirects=False, timeout=10, headers=headers or {})
    client.get("/")
    token = client.cookies.get("pgdurable_ui_csrf")
    assert token
    return client, token


def test_a_second_role_sees_and_touches_nothing_of_the_first(env: Env) -> None:
    iid = env.start("df.sleep(600) ~> 'select 1'", "alice-only")
    d = env.driver
    d.get(env.b)
    _wait_css(env, "#live")
    assert d.find_element(By.CSS_SELECTOR, ".who .role").text == env.bob
    assert not _css(d, "tr.run"), "bob sees alice's runs"
    assert _css(d, "#no-runs")
    d.get(env.b + f"runs/{iid}")
    assert "not found" in d.find_element(By.CSS_SELECTOR, "#error h1").text
    d.get(env.b + "system")
    assert d.find_element(By.CSS_SELECTOR, '#counts td[data-status="running"]').text == "0"
    # forms posted straight at bob's dashboard with a valid CSRF token: df refuses them
    client, token = _session(env.b)
    with contextlib.closing(client):
        for path, form in (
            (f"/runs/{iid}/cancel", {"reason": "bob"}),
            (f"/runs/{iid}/signal", {"name": "x", "data": "{}"}),
        ):
            r = client.post(path, data={"csrf": token, **form})
            assert r.status_code == 404, (path, r.status_code, r.text[:300])
            assert "Instance not found or access denied" in r.text
        assert client.get(f"/runs/{iid}/result.json").status_code == 404
    assert env.status(iid) == "running"
    with env.conn(env.alice) as c:
        c.execute("select df.cancel(%s)", (iid,))


def test_csrf_is_checked_on_every_post(env: Env) -> None:
    iid = env.start("df.sleep(600) ~> 'select 1'", "csrf")
    r = httpx.get(env.a)
    cookie = r.headers["set-cookie"]
    assert "SameSite=Strict" in cookie
    assert "HttpOnly" in cookie
    client, token = _session(env.a)
    with contextlib.closing(client):
        cases = [
            ({"reason": "no token"}, {}),
            ({"reason": "wrong", "csrf": "x" * 43}, {}),
            ({"reason": "cross-site", "csrf": token}, {"origin": "http://evil.example"}),
        ]
        for form, headers in cases:
            r = client.post(f"/runs/{iid}/cancel", data=form, headers=headers)
            assert r.status_code == 403, (form, r.status_code)
        # the same form without the cookie (a cross-site request carries none)
        bare = httpx.post(env.a + f"runs/{iid}/cancel", data={"csrf": token, "reason": "x"})
        assert bare.status_code == 403
        assert client.post("/new", data={"expr": "'select 1'"}).status_code == 403
        assert env.status(iid) == "running"
        r = client.post(f"/runs/{iid}/cancel", data={"csrf": token, "reason": "with token"})
        assert r.status_code == 303
        assert r.headers["location"] == f"/runs/{iid}?done=cancelled"
    assert env.await_(iid) == "cancelled"


def test_read_only_hides_and_refuses_actions_and_the_token_guards_it(env: Env) -> None:
    iid = env.start("df.wait_for_signal('approve', 600) ~> 'select 1'", "read-only")
    env.wait_node_running(iid, "SIGNAL")
    # the token: without it nothing is served, static files included
    for path in ("", f"runs/{iid}", "static/ui.css", "system"):
        assert httpx.get(env.r + path).status_code == 401, path
    bearer = {"authorization": f"Bearer {TOKEN}"}
    assert httpx.get(env.r, headers=bearer).status_code == 200
    # ?token= sets the session cookie and redirects to the same local path without it,
    # never to another host
    r = httpx.get(env.r + f"/evil.example/x?token={TOKEN}&a=1")
    assert r.status_code == 303
    assert r.headers["location"] == "/evil.example/x?a=1"
    r = httpx.get(env.r + f"?token=wrong-{TOKEN}")
    assert r.status_code == 401
    d = env.driver
    d.get(env.r + f"runs/{iid}?token={TOKEN}")
    until(lambda: d.current_url.endswith(f"/runs/{iid}"), "the redirect without the token", env)
    assert d.find_element(By.ID, "read-only").text == "read-only"
    assert d.find_element(By.ID, "run-status").text == "running"
    assert not _css(d, "form[method=post]")
    assert not _css(d, "#actions")
    assert not _css(d, 'a[href="/new"]')
    client, token = _session(env.r, bearer)
    with contextlib.closing(client):
        for path, form in (
            (f"/runs/{iid}/cancel", {"reason": "ro"}),
            (f"/runs/{iid}/signal", {"name": "approve", "data": "{}"}),
            ("/new", {"expr": "'select 1'"}),
        ):
            r = client.post(path, data={"csrf": token, **form})
            assert r.status_code == 403, (path, r.status_code)
            assert "read-only" in r.text
        assert client.get("/new").status_code == 403
    assert env.status(iid) == "running"
    with env.conn(env.alice) as c:
        c.execute("select df.cancel(%s)", (iid,))


def test_hostile_labels_and_queries_render_as_text(env: Env) -> None:
    literal = "'" + HOSTILE_SQL.replace("'", "''") + "'"
    iid = env.start(f"df.sql({literal}) |=> 'x'", HOSTILE_LABEL)
    assert env.await_(iid) == "completed"
    d = env.driver
    d.get(env.a)
    group = _wait_css(env, "section.group .label-text", "the hostile label")
    labels = [e.text for e in _css(d, "section.group .label-text")]
    assert HOSTILE_LABEL in labels
    assert not _css(d, "section.group img"), "the label became markup"
    _no_script_ran(d)
    assert group is not None
    nid = next(str(r[2]) for r in env.nodes(iid) if r[0] == "SQL")
    d.get(env.a + f"runs/{iid}?node={nid}")
    assert d.find_element(By.ID, "run-label").text == HOSTILE_LABEL
    assert d.find_element(By.ID, "node-query").text == HOSTILE_SQL
    assert "<script>" in d.find_element(By.ID, "node-result").text
    assert not _css(d, "main script"), "a result became a script element"
    # in the SVG too: the query is text of a <text> element, not markup
    svg_text = d.find_element(By.CSS_SELECTOR, f'g.node[data-node="{nid}"] text.n-label')
    assert "<script>" in svg_text.get_attribute("textContent")
    _no_script_ran(d)


def test_headers_and_the_system_page(env: Env) -> None:
    r = httpx.get(env.a + "system")
    csp = r.headers["content-security-policy"]
    assert "script-src 'self'" in csp
    assert "frame-ancestors 'none'" in csp
    assert "unsafe-inline" not in csp
    assert r.headers["x-frame-options"] == "DENY"
    assert r.headers["x-content-type-options"] == "nosniff"
    # a page asked for under another host name (DNS rebinding) is refused
    assert httpx.get(env.a, headers={"host": "evil.example"}).status_code == 400
    d = env.driver
    d.get(env.a + "system")
    kinds = {e.text for e in _css(d, "#workers tr.worker td:nth-child(3)")}
    assert {"worker", "supervisor"} <= kinds
    completed = int(d.find_element(By.CSS_SELECTOR, '#counts td[data-status="completed"]').text)
    assert completed >= 1
    assert _css(d, "#chart svg.chart rect.bar.st-completed")
    assert _css(d, "#slowest tbody tr")
    # everything on the page came from /static: no request left the host
    srcs = d.execute_script("return performance.getEntriesByType('resource').map(e => e.name)")
    assert srcs
    assert all(s.startswith(env.a) for s in srcs), srcs


def _cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("PGDURABLE_")}
    return subprocess.run(
        [sys.executable, "-m", "pgdurable", *args],
        env=clean | (env or {}),
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
    )


def test_logins_that_cannot_serve_a_dashboard_are_refused_by_name(env: Env) -> None:
    nogrant = env.db.create_role("ui_nogrant", grant=False)
    port = str(_free_port())
    cases = [
        (
            ["ui", "--dsn", env.db.service_dsn, "--port", port],
            {},
            "pgdurable_service must not be that role",
        ),
        (
            ["ui", "--dsn", env.db.dsn_as(nogrant), "--port", port],
            {},
            f"select df.grant_usage('{nogrant}')",
        ),
        (
            ["ui", "--dsn", env.db.dsn_as(env.alice), "--port", port, "--token", "short"],
            {},
            "at least 16 characters",
        ),
        # serve --ui-port logs in as pgdurable_service: the dashboard needs a tenant's login
        (
            ["serve", "--workers", "1"],
            {"PGDURABLE_DSN": env.db.service_dsn, "PGDURABLE_SERVE_UI_PORT": port},
            "--ui-dsn / PGDURABLE_UI_DSN",
        ),
    ]
    for args, extra, want in cases:
        got = _cli(*args, env=extra)
        assert got.returncode == 1, (args, got.stdout, got.stderr)
        assert want in got.stderr, (args, got.stderr)
    # a port in use is named, not a traceback
    busy = env.a.rsplit(":", 1)[1].strip("/")
    got = _cli("ui", "--dsn", env.db.dsn_as(env.alice), "--port", busy)
    assert got.returncode == 1
    assert f"port {busy} on 127.0.0.1 is in use" in got.stderr


def test_the_demo_dashboard_runs_detached_and_stops(env: Env, tmp_path: Path) -> None:
    from pgdurable.ui.launch import start_detached, stop_detached

    url = start_detached(env.db.dsn_as(env.alice), tmp_path, port=_free_port())
    pid = int((tmp_path / "ui.pid").read_text().split()[0])
    try:
        page = httpx.get(url).text
        assert f'<b class="role">{env.alice}</b>' in page
    finally:
        assert stop_detached(tmp_path)
    assert not (tmp_path / "ui.pid").exists()
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    with pytest.raises(httpx.ConnectError):
        httpx.get(url)
    assert not stop_detached(tmp_path)  # nothing left to stop


def _listener(pids: list[int], port: int) -> int | None:
    import psutil

    for pid in pids:
        try:
            conns = psutil.Process(pid).net_connections(kind="tcp")
        except psutil.Error:
            continue
        if any(c.status == psutil.CONN_LISTEN and c.laddr.port == port for c in conns):
            return pid
    return None


def test_serve_supervises_its_dashboard(env: Env, tmp_path: Path) -> None:
    """serve --ui-port runs the dashboard in a child of its own: restarted when it dies,
    gone when the supervisor is killed."""
    port = _free_port()
    s = Serve(
        env.db,
        {
            "PGDURABLE_SERVE_UI_PORT": str(port),
            "PGDURABLE_WORKERS": "1",
            "PGDURABLE_UI_DSN": env.db.dsn_as(env.alice),
        },
        log_path=tmp_path / "serve.log",
    ).start()
    url = f"http://127.0.0.1:{port}/"
    kids: list[int] = []
    try:
        _wait_http(url, s.proc, tmp_path / "serve.log")
        first = until(lambda: _listener(s.workers(), port), "the dashboard child", env)
        os.kill(first, 9)
        _wait_http(url, s.proc, tmp_path / "serve.log")
        second = _listener(s.workers(), port)
        assert second not in (None, first)
        assert f'<b class="role">{env.alice}</b>' in httpx.get(url).text
        assert s.proc is not None
        kids = s.workers()
        os.kill(s.proc.pid, 9)  # the supervisor only: its children notice on their own
        s.proc.wait()
        import psutil

        until(
            lambda: (
                not psutil.pid_exists(second)
                or psutil.Process(second).status() == psutil.STATUS_ZOMBIE
            ),
            "the orphaned dashboard to exit",
            env,
            timeout=20,
        )
    finally:
        s.cleanup()
        for pid in kids:  # the orphaned worker drains by itself; no need to wait for it
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, 9)
