"""The progress page in a real browser: Debian's chromium, headless, driven by Playwright.

The API server's app (plugin mounted, auth manager and middlewares in place) is served by
uvicorn on 127.0.0.1; the browser logs in the way the UI does (the ``_token`` cookie) and
loads the page of a job mid-run. The numbers are read from the DOM. The screenshot is saved
under the test's temporary directory, and to ``docs/ui-screenshot.png`` with
``ANTBATCH_UPDATE_SCREENSHOT=1``.

Skips, saying why, when chromium (``apt-get install -y chromium``; ``.ci/run`` installs it) or
the ``playwright`` package is missing; no browser is ever downloaded.
"""

from __future__ import annotations

import contextlib
import os
import pathlib
import shutil
import socket
import threading
from typing import TYPE_CHECKING
from urllib.parse import urlencode

import pytest

from tests.airflow.plugins.conftest import token
from tests.conftest import REPO_ROOT
from tests.progress_jobs import QUARANTINE_REASON, SHARDS, mid_run

if TYPE_CHECKING:
    from collections.abc import Iterator

    from fastapi import FastAPI
    from playwright.sync_api import Browser, Page

    from tests.airflow.plugins.conftest import ProgressRun

pytestmark = [pytest.mark.airflow, pytest.mark.slow]
CHROMIUM = "/usr/bin/chromium"
SCREENSHOT = REPO_ROOT / "docs" / "ui-screenshot.png"


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    if not os.access(CHROMIUM, os.X_OK):
        pytest.skip(f"no {CHROMIUM}: install Debian's chromium (apt-get install -y chromium) to run the browser test")
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install playwright)")
    with sync_api.sync_playwright() as playwright:
        # --no-sandbox: chromium's sandbox cannot start as root in a container.
        browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox"])
        yield browser
        browser.close()


@pytest.fixture(scope="module")
def server(api_app: FastAPI) -> Iterator[str]:
    """The API server app under uvicorn on a free loopback port; yields its base URL."""
    import uvicorn

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    host, port = sock.getsockname()
    uv = uvicorn.Server(uvicorn.Config(api_app, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=uv.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        for _ in range(600):
            if uv.started:
                break
            threading.Event().wait(0.05)
        assert uv.started, "uvicorn did not start in 30 s"
        yield f"http://{host}:{port}"
    finally:
        uv.should_exit = True
        thread.join(10)
        sock.close()


def _open(browser: Browser, base: str, query: dict[str, str], *, logged_in: bool = True) -> Page:
    context = browser.new_context(viewport={"width": 1100, "height": 900})
    if logged_in:
        context.add_cookies([{"name": "_token", "value": token(), "url": base}])
    page = context.new_page()
    page.goto(f"{base}/antbatch/job?{urlencode({**query, 'interval': '0.5'})}")
    return page


def _text(page: Page, element_id: str) -> str:
    return page.locator(f"#{element_id}").inner_text()


def test_the_page_shows_a_running_jobs_numbers(
    browser: Browser, server: str, progress_run: ProgressRun, tmp_path: pathlib.Path
) -> None:
    progress_run.job.heartbeat()  # the held shard's lease stays live
    query = {"dag_id": progress_run.dag_id, "run_id": progress_run.run_id, "task_id": "job.wait_for_shards"}
    page = _open(browser, server, query)
    page.wait_for_selector("body[data-loaded=true]", timeout=20_000)
    assert (_text(page, "committed"), _text(page, "planned"), _text(page, "quarantined")) == ("3", str(SHARDS), "2")
    assert (_text(page, "n-leased"), _text(page, "n-pending"), _text(page, "n-failed")) == ("1", "4", "0")
    assert _text(page, "state") == "running" and _text(page, "error") == ""
    workers = page.locator("#workers tbody tr")
    assert workers.count() == 1 and "worker-0" in workers.inner_text() and "STALE" not in workers.inner_text()
    assert QUARANTINE_REASON in page.locator("#quarantine tbody").inner_text()
    assert page.locator("#chart rect").count() >= 1
    assert page.locator("#bar .committed").get_attribute("style") == "width: 37.5%;"
    shot = tmp_path / "ui-screenshot.png"
    page.screenshot(path=str(shot), full_page=True)
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    if os.environ.get("ANTBATCH_UPDATE_SCREENSHOT") == "1":
        shutil.copyfile(shot, SCREENSHOT)
    page.context.close()


def test_the_page_follows_the_job_to_its_end(browser: Browser, server: str, tmp_path: pathlib.Path) -> None:
    job = mid_run(tmp_path)
    page = _open(browser, server, {"plan_uri": job.plan_uri})
    page.wait_for_selector("body[data-loaded=true]", timeout=20_000)
    assert _text(page, "committed") == "3"
    for i in range(3, SHARDS):
        job.commit(i)
    job.heartbeat("finished")
    page.wait_for_function(f"document.getElementById('committed').textContent === '{SHARDS}'", timeout=20_000)
    page.wait_for_function("document.getElementById('state').textContent === 'succeeded'", timeout=20_000)
    assert "(final)" in _text(page, "updated")
    page.context.close()


def test_without_a_login_the_page_is_refused(browser: Browser, server: str) -> None:
    context = browser.new_context()
    with contextlib.closing(context):
        response = context.new_page().goto(f"{server}/antbatch/job?plan_uri=x")
        assert response is not None and response.status == 401
