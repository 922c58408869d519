"""The dashboard in a real browser: headless Chromium (Debian's `chromium`, driven by
Playwright with `executable_path`: Playwright's own download cannot run here), in front of
a real stack of 3 demo_app instances behind the balancer.

Set UPDATE_DASHBOARD_SCREENSHOT=1 to also copy the screenshot taken under load to
docs/dashboard.png (the one the README shows).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from playwright.sync_api import Browser, ConsoleMessage, Dialog, Page, sync_playwright

from balancer.datapath._backend import backend_id
from balancer.datapath._pins import handle
from redis_plumbing import RedisServer
from tests.balancer.test_supervisor import cluster, demo_app_command, stub_command
from tests.helpers import free_port, wait_for
from tests.processes import Process, balancer, demo_app_args

# Without these, Chromium on a machine with no network stalls on its background services.
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
FAST_HEALTH = (
    *("--health-path", "/readyz", "--health-interval", "0.2"),
    *("--health-timeout", "0.2", "--health-fall", "2"),
)
TOKEN = "browser-test-token-0123"
STEP = 10_000  # milliseconds for one thing to show on the page (a tick is one second)
DOCS = Path(__file__).resolve().parents[2] / "docs" / "dashboard.png"


def chromium() -> str:
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if path is None:
        pytest.fail(
            "Chromium is not installed: run scripts/install as root (it installs Debian's "
            "`chromium`), or `apt-get install chromium`"
        )
    return path


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(
            executable_path=chromium(), args=CHROMIUM_ARGS, timeout=30_000
        )
        try:
            yield launched
        finally:
            launched.close()


class Stack:
    def __init__(self, apps: list[Process], lb: Process, admin: str) -> None:
        self.apps = apps
        self.lb = lb
        self.admin = admin

    def backends(self) -> dict[str, dict[str, Any]]:
        body = httpx.get(self.admin + "/backends", timeout=5).json()
        return {b["url"]: b for b in body["backends"]}


@pytest.fixture(scope="module")
def stack(redis_server: RedisServer) -> Iterator[Stack]:
    """3 demo_app instances in hybrid mode (a session survives its instance, so it can be
    seen moving) behind the balancer, which reports on their Redis."""
    with contextlib.ExitStack() as stack:
        apps = []
        for i in range(1, 4):  # started together, waited for one by one: 3x quicker
            port = free_port()
            args = demo_app_args(port, f"app{i}", "hybrid", redis_server.url)
            app = Process(args, f"http://127.0.0.1:{port}")
            stack.callback(app.terminate)
            apps.append(app)
        for app in apps:
            app.wait_ready()
        urls = [app.url for app in apps]
        extra = ["--sticky", "cookie:sid", "--dashboard-mode", "hybrid", *FAST_HEALTH]
        extra += ["--dashboard-redis", redis_server.url]
        lb, admin = stack.enter_context(balancer(urls, *extra))
        assert admin is not None
        yield Stack(apps, lb, admin)


class Watched:
    """A page, with the console errors, page errors and dialogs seen on it."""

    def __init__(self, page: Page) -> None:
        self.page = page
        self.errors: list[str] = []
        self.dialogs: list[str] = []
        page.on("console", self._console)
        page.on("pageerror", lambda error: self.errors.append(f"pageerror: {error}"))
        page.on("dialog", self._dialog)

    def _console(self, message: ConsoleMessage) -> None:
        if message.type == "error":
            self.errors.append(message.text)

    def _dialog(self, dialog: Dialog) -> None:
        self.dialogs.append(dialog.message)
        dialog.dismiss()

    def row(self, url: str) -> Any:
        return self.page.locator(f'tr[data-backend-id="{backend_id(url)}"]')

    def wait_state(self, url: str, state: str) -> None:
        self.page.wait_for_selector(
            f'tr[data-backend-id="{backend_id(url)}"][data-state="{state}"]', timeout=STEP
        )

    def confirm(self) -> None:
        self.page.locator("#confirm").wait_for(state="visible", timeout=STEP)
        self.page.click("#confirm-ok")


@pytest.fixture
def watched(browser: Browser) -> Iterator[Watched]:
    context = browser.new_context(viewport={"width": 1400, "height": 860})
    try:
        yield Watched(context.new_page())
    finally:
        context.close()


def open_dashboard(watched: Watched, admin: str, rows: int) -> None:
    watched.page.goto(admin + "/", timeout=STEP)
    wait_for(lambda: watched.page.locator("tr[data-backend-id]").count() == rows, 10, "rows")


def test_loads_with_no_console_errors_and_lists_the_backends_up(
    stack: Stack, watched: Watched
) -> None:
    open_dashboard(watched, stack.admin, 3)
    for app in stack.apps:
        watched.wait_state(app.url, "up")
        assert watched.row(app.url).locator(".state-text").inner_text() == "UP"
    page = watched.page
    page.wait_for_selector("#live.ok", timeout=STEP)
    assert page.inner_text("#mode") == "hybrid"
    wait_for(lambda: page.inner_text("#redis").startswith("reachable"), 5, "Redis reachable")
    assert page.inner_text("#sticky") == "cookie:sid"
    assert watched.errors == []


def test_a_backend_named_with_html_shows_as_text(stack: Stack, watched: Watched) -> None:
    evil = "http://<img src=x onerror=alert(1)>:80"
    open_dashboard(watched, stack.admin, 3)
    page = watched.page
    try:
        # Added through the page's own form: a confirmation, then the outcome.
        page.fill("#add-url", evil)
        page.click("#add-form button[type=submit]")
        assert page.inner_text("#confirm-text") == f"Add the backend {evil}?"
        watched.confirm()
        page.wait_for_selector('#outcome[data-ok="true"]', timeout=STEP)
        assert "201" in page.inner_text("#outcome")
        assert evil in stack.backends()
        wait_for(lambda: watched.row(evil).count() == 1, 10, "its row")
        assert watched.row(evil).locator(".name").inner_text() == evil  # the markup, as text
        assert page.locator("#backends img").count() == 0
        # Its events (added, then down) carry the name too: text there as well.
        page.wait_for_selector('#events li[data-event="backend_added"]', timeout=STEP)
        assert evil in page.inner_text('#events li[data-event="backend_added"]')
        assert page.locator("#events img, #outcome img, #legend img").count() == 0
        assert watched.dialogs == []  # alert(1) never ran
        # Removed by its button.
        watched.row(evil).locator("button.remove").click()
        watched.confirm()
        wait_for(lambda: watched.row(evil).count() == 0, 10, "its row to go")
        assert evil not in stack.backends()
    finally:
        httpx.delete(
            f"{stack.admin}/backends/{backend_id('http://<img src=x onerror=alert(1)>:80')}"
        )


def session_on(stack: Stack, client: httpx.Client) -> tuple[str, int]:
    """One request of `client`'s session: the URL of the instance that answered, its count."""
    answer = client.post(stack.lb.url + "/api/counter").json()
    return stack.apps[int(answer["instance"].removeprefix("app")) - 1].url, answer["count"]


def test_drain_and_enable_buttons(stack: Stack, watched: Watched) -> None:
    open_dashboard(watched, stack.admin, 3)
    page = watched.page
    with httpx.Client(timeout=5) as client:
        url, _ = session_on(stack, client)  # a session pinned to the backend drained below
        sessions = watched.row(url).locator(".sessions")
        wait_for(lambda: sessions.get_attribute("data-pinned") not in (None, "", "0"), 5, "pins")
        watched.row(url).locator("button.drain").click()
        assert "Drain" in page.inner_text("#confirm-text")
        # It offers keep (checked: the balancer's --drain-sessions), move and now.
        choices = page.locator("#confirm-choices input")
        assert [choices.nth(i).get_attribute("value") for i in range(3)] == ["keep", "move", "now"]
        assert page.locator("#confirm-choices input:checked").get_attribute("value") == "keep"
        watched.confirm()
        watched.wait_state(url, "draining")
        assert stack.backends()[url]["state"] == "draining"  # the admin API agrees
        outcome = page.locator("#outcome")
        outcome.wait_for(state="visible", timeout=STEP)
        assert "200" in outcome.inner_text()
        assert outcome.get_attribute("data-ok") == "true"
        # The row says it keeps its sessions, for how long, and how many are still active.
        reason = watched.row(url).locator(".reason")
        wait_for(lambda: reason.inner_text().startswith("keeping sessions · "), 5, "the reason")
        assert stack.backends()[url]["keep_pinned"] is True
        wait_for(lambda: sessions.get_attribute("data-active") not in (None, ""), 5, "active")
        assert int(sessions.get_attribute("data-active") or 0) >= 1
        assert "active" in sessions.inner_text()
        # The pinned client still reaches it while it drains.
        assert session_on(stack, client)[0] == url
        # The same button now ends the drain at once: DRAINED, and why.
        watched.row(url).locator("button.drain").click()
        assert "End the drain" in page.inner_text("#confirm-text")
        assert page.locator("#confirm-choices").is_hidden()
        watched.confirm()
        watched.wait_state(url, "drained")
        wait_for(lambda: reason.inner_text() == "ended: now", 5, "the drained reason")
        assert stack.backends()[url]["drained_reason"] == "now"
        assert watched.row(url).locator("button.drain").is_disabled()
        watched.row(url).locator("button.enable").click()
        watched.confirm()
        watched.wait_state(url, "up")
        # A drain that moves its sessions, picked in the dialog: with nothing in flight it
        # ends at once ("empty").
        watched.row(url).locator("button.drain").click()
        page.check('#confirm-choices input[value="move"]')
        watched.confirm()
        watched.wait_state(url, "drained")
        wait_for(lambda: reason.inner_text() == "ended: empty", 5, "the drained reason")
    # Cancel does nothing; enable brings it back.
    watched.row(url).locator("button.enable").click()
    watched.page.click("#confirm-cancel")
    assert stack.backends()[url]["state"] == "drained"
    watched.row(url).locator("button.enable").click()
    watched.confirm()
    watched.wait_state(url, "up")
    assert stack.backends()[url]["state"] == "up"
    assert watched.errors == []


def test_the_sessions_view_moves_and_forgets_one_session(stack: Stack, watched: Watched) -> None:
    open_dashboard(watched, stack.admin, 3)
    page = watched.page
    with httpx.Client(timeout=5) as client:
        url, count = session_on(stack, client)
        name = handle(str(client.cookies["sid"]).encode())
        ups = [a.url for a in stack.apps if stack.backends()[a.url]["state"] == "up"]
        target = next(u for u in ups if u != url)
        view = watched.row(url).locator("button.view-sessions")
        wait_for(lambda: not view.is_disabled(), 5, "the sessions button")
        view.click()
        dialog = page.locator("#sessions-dialog")
        dialog.wait_for(state="visible", timeout=STEP)
        mine = page.locator(f'#sessions-list tr[data-session="{name}"]')
        mine.wait_for(timeout=STEP)
        assert "pinned to" in page.inner_text("#sessions-title")
        assert str(client.cookies["sid"]) not in page.inner_text("#sessions-dialog")  # a digest
        mine.locator("select.move-target").select_option(backend_id(target))
        mine.locator("button.move-session").click()
        page.wait_for_selector('#outcome[data-ok="true"]', timeout=STEP)
        assert "moves to" in page.inner_text("#outcome")
        page.click("#sessions-close")
        # Its next request lands there, and in hybrid mode the session goes on (its count).
        assert session_on(stack, client) == (target, count + 1)
        page.wait_for_selector('#events li[data-event="session_moved"]', timeout=STEP)
        # Forgotten from the target's list: placed anew on its next request.
        watched.row(target).locator("button.view-sessions").click()
        mine.wait_for(timeout=STEP)
        mine.locator("button.forget-session").click()
        wait_for(lambda: "forgotten" in page.inner_text("#outcome"), 5, "the outcome")
        page.click("#sessions-close")
        assert session_on(stack, client)[1] == count + 2  # placed anew, the session kept
        page.wait_for_selector('#events li[data-event="session_forgotten"]', timeout=STEP)
    assert watched.errors == []


LONG_TASKS = """
window.__longTasks = [];
new PerformanceObserver((list) => {
  for (const entry of list.getEntries()) window.__longTasks.push(entry.duration);
}).observe({ type: "longtask" });
"""


def test_stays_responsive_with_50_backends_and_1000_events_a_minute(
    stack: Stack, watched: Watched
) -> None:
    # 47 more backends on ports nobody listens on: DOWN at once, each with its events.
    ports: set[int] = set()
    while len(ports) < 47:  # free_port() may hand out the same port twice
        ports.add(free_port())
    extra = [f"http://127.0.0.1:{port}" for port in sorted(ports)]
    with httpx.Client(base_url=stack.admin, timeout=5) as admin:
        try:
            for url in extra:
                assert admin.post("/backends", json={"url": url}).status_code == 201
            open_dashboard(watched, stack.admin, 50)
            page = watched.page
            page.evaluate(LONG_TASKS)
            # Drain and enable the real backends for 4 s, ~20 events a second: 1,200 a minute.
            first = page.inner_text("#event-count")
            began = time.monotonic()
            sent = 0
            while time.monotonic() - began < 4.0:
                for app in stack.apps:
                    ident = backend_id(app.url)
                    admin.post(f"/backends/{ident}/drain")
                    admin.post(f"/backends/{ident}/enable")
                    sent += 2
                time.sleep(0.25)  # the rate of the burst, not a wait for a condition
            wait_for(lambda: page.inner_text("#event-count") != first, 5, "the events")
            page.wait_for_function(
                "() => document.querySelectorAll('#events li[data-event=backend_enabled]')"
                f".length >= {sent // 2}",
                timeout=STEP,
            )
            tasks: list[float] = page.evaluate("window.__longTasks")
            assert page.locator("tr[data-backend-id]").count() == 50
            assert page.locator("#events li").count() <= 300  # the list stays bounded
            # Responsive: no task (over 50 ms, as the browser reports them) blocked the page
            # for long once it had loaded; none at all is usual (measured: none).
            assert max(tasks, default=0) < 200, tasks
            assert sum(tasks) < 600, tasks
            assert watched.errors == []
        finally:
            for url in extra:
                admin.delete(f"/backends/{backend_id(url)}")


class Load:
    """Clients with sessions hitting the balancer from threads until stopped."""

    def __init__(self, url: str, clients: int = 12, threads: int = 3) -> None:
        self.url = url
        self.stop = threading.Event()
        self.answered = 0
        self._threads = [
            threading.Thread(target=self._run, args=(clients // threads,), daemon=True)
            for _ in range(threads)
        ]

    def _run(self, clients: int) -> None:
        sessions = [httpx.Client(timeout=2) for _ in range(clients)]
        try:
            while not self.stop.is_set():
                for client in sessions:
                    with contextlib.suppress(httpx.HTTPError):
                        client.post(self.url + "/api/counter")
                        self.answered += 1
        finally:
            for client in sessions:
                client.close()

    def __enter__(self) -> Load:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for thread in self._threads:
            thread.join(10)


def test_killing_an_instance_turns_its_row_down_and_shows_events(
    stack: Stack, watched: Watched, tmp_path: Path
) -> None:
    open_dashboard(watched, stack.admin, 3)
    page = watched.page
    victim = stack.apps[1]
    docs = bool(os.environ.get("UPDATE_DASHBOARD_SCREENSHOT"))
    with Load(stack.lb.url) as load:
        wait_for(lambda: load.answered > 50, 15, "the load to start")
        if docs:
            time.sleep(20)  # not a wait for a condition: 20 s of chart to show
        wait_for(lambda: page.inner_text("#total-rps") not in ("0.0", "…"), 5, "requests/s")
        victim.popen.send_signal(signal.SIGKILL)
        began = time.monotonic()
        watched.wait_state(victim.url, "down")
        took = time.monotonic() - began
        page.wait_for_selector('#events li[data-event="backend_state"]', timeout=STEP)
        page.wait_for_selector('#events li[data-event="sessions_moved"]', timeout=STEP)
        if docs:
            time.sleep(8)  # the chart after the failover, for the picture
        shot = tmp_path / "dashboard.png"
        page.set_viewport_size({"width": 1400, "height": 400})
        page.screenshot(path=str(shot), full_page=True)  # the page, without blank below
    assert took < 3.0, f"DOWN showed {took:.1f} s after the kill"
    assert "DOWN" in watched.row(victim.url).locator(".state").inner_text()
    assert shot.stat().st_size > 10_000
    if docs:
        shutil.copyfile(shot, DOCS)
    assert watched.errors == []


def test_the_page_asks_for_the_token_once_and_sends_it_in_a_header(
    stack: Stack, watched: Watched
) -> None:
    urls = [stack.apps[0].url]
    with balancer(urls, "--admin-token", TOKEN, *FAST_HEALTH) as (_, admin):
        assert admin is not None
        requests: list[tuple[str, str | None]] = []
        watched.page.on(
            "request", lambda r: requests.append((r.url, r.headers.get("authorization")))
        )
        watched.page.goto(admin + "/", timeout=STEP)
        dialog = watched.page.locator("#token-dialog")
        dialog.wait_for(state="visible", timeout=STEP)
        watched.page.fill("#token-input", TOKEN)
        watched.page.click("#token-ok")
        watched.wait_state(urls[0], "up")
        streams = [(u, auth) for u, auth in requests if u.endswith("/dashboard/stream")]
        assert streams[-1][1] == f"Bearer {TOKEN}"
        assert not any(TOKEN in u for u, _ in requests)  # never in a URL
        assert watched.page.context.cookies() == []  # nor in a cookie
        # An action sends it too.
        watched.row(urls[0]).locator("button.drain").click()
        watched.confirm()
        watched.wait_state(urls[0], "draining")
        # The only console errors: the 401 of the first, tokenless, stream request.
        assert all("401" in error for error in watched.errors), watched.errors


def test_a_crashed_worker_shows_its_restart_count_going_up(
    watched: Watched, tmp_path: Path
) -> None:
    with cluster(tmp_path, 2, demo_app_command(), *FAST_HEALTH) as running:
        open_dashboard(watched, running.admin, 2)
        page = watched.page
        page.wait_for_selector("#workers-panel:not([hidden])", timeout=STEP)
        workers = running.workers()
        pid = workers[0]["pid"]
        restarts = page.locator('#workers tr[data-worker-index="0"] .restarts')
        assert restarts.inner_text() == "0"
        os.kill(pid, signal.SIGKILL)
        wait_for(lambda: restarts.inner_text() == "1", 15, "the restart count to go up")
        page.wait_for_selector('#events li[data-event="worker_crashed"]', timeout=STEP)
        page.wait_for_selector('#events li[data-event="worker_restarted"]', timeout=STEP)
        assert str(pid) not in page.inner_text('#workers tr[data-worker-index="0"] .pid')
        # Scale up by one: the button asks, the API answers 202 with the new count.
        page.click("#scale-up")
        watched.confirm()
        page.wait_for_selector('#outcome[data-ok="true"]', timeout=STEP)
        assert "desired 3" in page.inner_text("#outcome")
        assert httpx.get(running.admin + "/workers", timeout=5).json()["desired"] == 3
        assert watched.errors == []


def test_the_workers_panel_shows_the_autoscaling_range_and_load(
    watched: Watched, tmp_path: Path
) -> None:
    with cluster(tmp_path, 1, stub_command(), "--spawn", "1:3", *FAST_HEALTH) as running:
        open_dashboard(watched, running.admin, 1)
        page = watched.page
        page.wait_for_selector("#workers-panel:not([hidden])", timeout=STEP)
        wait_for(lambda: "in flight per worker" in page.inner_text("#desired"), 10, "the load")
        text = page.inner_text("#desired")
        assert text.startswith("desired 1 of 1..3 (autoscaling: ")
        assert text.endswith("in flight per worker, target 4)")
        assert watched.errors == []
