"""Headless Chromium (Debian's /usr/bin/chromium, driven by Playwright) against real `stepimage serve` processes.

Two servers start together at the beginning of the session, as in tests/e2e: an open one (no keys), which most
tests use, and a keyed one for the key prompt. Each test gets a fresh browser context (its own sessionStorage and
clipboard permission), and fails if the page logged an error or broke its Content-Security-Policy.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import pytest

from tests.e2e.conftest import ServerProcess, free_port, launch, wait_ready

CHROMIUM = Path(os.environ.get("STEPIMAGE_CHROMIUM", "/usr/bin/chromium"))
# What Debian's Chromium needs to run headless as root in a container, and nothing that reaches the network:
# no sandbox (root), no GPU process, no background fetches (component updates, sync, first-run pages).
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
# Small extra sizes keep each image a fraction of a second on the tiny CPU model.
SMALL = "128x128"
KEY = "browser-test-key"
OPEN_MAX_QUEUE = 2
DESKTOP = {"width": 1366, "height": 900}
PHONE = {"width": 390, "height": 844}


@pytest.fixture(scope="session")
def chromium_path() -> Path:
    if not CHROMIUM.exists():
        message = f"{CHROMIUM} is missing: install Debian's chromium (apt-get install -y chromium); .ci/run does"
        # In CI a missing browser is a missing install step, not a reason to skip.
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return CHROMIUM


@pytest.fixture(scope="session")
def browser_servers(request, tmp_path_factory: pytest.TempPathFactory, chromium_path) -> dict[str, ServerProcess]:
    tmp = tmp_path_factory.mktemp("browser")
    ports = [free_port()]
    while len(ports) < 2:
        port = free_port()
        if port not in ports:
            ports.append(port)

    def start(name: str, port: int, *args: str) -> ServerProcess:
        common = ["--backend", "tiny", "--host", "127.0.0.1", "--no-warmup", "--extra-size", SMALL]
        server = launch(name, port, [*common, "--port", str(port), "--storage-dir", str(tmp / name), *args], tmp)
        request.addfinalizer(server.stop)
        _running.append(server)
        return server

    # A short queue on the open server lets a test fill it and see the page explain the 429.
    return {
        "open": start("open", ports[0], "--max-queue", str(OPEN_MAX_QUEUE)),
        "keyed": start("keyed", ports[1], "--api-key", KEY),
    }


_running: list[ServerProcess] = []


def pytest_runtest_teardown(item: pytest.Item, nextitem: pytest.Item | None) -> None:
    # The servers exist for the tests in this directory: stop them once the last of those is done instead of
    # keeping two idle model processes through the rest of the session.
    if nextitem is None or Path(__file__).parent not in Path(nextitem.path).parents:
        while _running:
            _running.pop().stop()


@pytest.fixture(scope="session")
def open_server(browser_servers) -> ServerProcess:
    wait_ready(browser_servers["open"])
    return browser_servers["open"]


@pytest.fixture(scope="session")
def keyed_server(browser_servers) -> ServerProcess:
    wait_ready(browser_servers["keyed"])
    return browser_servers["keyed"]


@pytest.fixture(scope="module")
def browser(chromium_path):
    from playwright.sync_api import sync_playwright

    # Per module, not per session: Playwright's sync API keeps an event loop running in this thread while it is
    # open, which would break tests elsewhere that call asyncio.run().
    with sync_playwright() as playwright:
        # launch() gives Chromium a fresh temporary user-data-dir of its own each time.
        chromium = playwright.chromium.launch(executable_path=str(chromium_path), headless=True, args=CHROMIUM_ARGS)
        try:
            yield chromium
        finally:
            chromium.close()


class PageProblems:
    """Console errors and CSP violations a page reported; a test may expect some failed loads (HTTP 4xx)."""

    def __init__(self) -> None:
        self.messages: list[str] = []
        self.expected_http_errors = False

    def unexpected(self) -> list[str]:
        # Chromium logs "Failed to load resource: ... status of 400" for every 4xx answer, which is what the
        # tests of error messages provoke on purpose.
        return [
            text
            for text in self.messages
            if not (self.expected_http_errors and text.startswith("Failed to load resource"))
        ]


@pytest.fixture
def page_problems() -> PageProblems:
    return PageProblems()


def _new_page(browser, viewport, problems: PageProblems):
    from tests.browser.helpers import RECORD_FORMS

    context = browser.new_context(viewport=viewport, permissions=["clipboard-read", "clipboard-write"])
    context.add_init_script(RECORD_FORMS)
    page = context.new_page()
    page.on("console", lambda message: message.type == "error" and problems.messages.append(message.text))
    page.on("pageerror", lambda error: problems.messages.append(f"uncaught: {error}"))
    page.set_default_timeout(30_000)
    return context, page


def open_playground(page, base_url: str) -> None:
    """Load the page and wait until it has read the server's description (its form is then complete)."""
    page.goto(base_url + "/")
    # Locator waits run in Playwright's own isolated world: a string predicate (wait_for_function) would be eval'd
    # in the page, which its Content-Security-Policy rightly forbids.
    page.locator("#model-status", has_text=re.compile(r"^Model ")).wait_for()


@pytest.fixture
def page(browser, open_server, page_problems):
    """A desktop-sized page on the open server's playground, loaded and ready."""
    context, page = _new_page(browser, DESKTOP, page_problems)
    open_playground(page, open_server.base_url)
    yield page
    context.close()
    assert not page_problems.unexpected(), page_problems.unexpected()


@pytest.fixture
def new_page(browser, page_problems):
    """Pages of any size on any server; each in its own context, closed afterwards."""
    contexts = []

    def make(base_url: str, viewport=DESKTOP):
        context, page = _new_page(browser, viewport, page_problems)
        contexts.append(context)
        open_playground(page, base_url)
        return page

    yield make
    for context in contexts:
        context.close()
    assert not page_problems.unexpected(), page_problems.unexpected()


@pytest.fixture(scope="session")
def curl() -> str | None:
    return shutil.which("curl")
