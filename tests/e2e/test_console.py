"""The web console in a real browser: headless Debian chromium driven by Playwright, against a live
uvicorn API, the private Redis and a real `crispedit worker` on a tiny model. One walk through it:
sign in, a refused submission showing the API's error, two fact edits followed live, the stream's
history with its plot, before/after, a verified download, a rollback, an edit cancelled while it
waits or runs, a `<script>` target shown as text, and a second team's key on the same model that
sees none of it. Each page's screenshot is written for a reviewer: to a temp folder, so that a test
run leaves the checkout as it was, or, to refresh the committed ones, where CONSOLE_SHOTS says
(`CONSOLE_SHOTS=bench/results/console pytest -m browser`).

Without chromium or Playwright these tests skip with the reason, except where the environment
sets CI (CI runners set CI=true): there they fail with it, so that CI never passes without them.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from live import redis_db, redis_url, serve

from service.client import CrispEditClient
from service.config import Settings
from service.keys import hash_key
from service.main import create_app

pytestmark = pytest.mark.browser

REDIS_URL = redis_url(11)
KEY_A = "console-key-team-a-0123456789"
KEY_B = "console-key-team-b-9876543210"
SHOTS = Path(os.environ.get("CONSOLE_SHOTS") or Path(tempfile.gettempdir()) / "console-shots")
XSS = '<script>window.__pwned = 1</script><img src=x onerror="window.__pwned = 2">'
JOB_TIMEOUT_MS = 180_000  # the worker's first job also builds the tiny model's curvature


def chromium() -> str:
    """Debian's chromium and Playwright's client, or skip saying which one is missing (fail
    under CI, which must run these tests)."""
    in_ci = os.environ.get("CI", "").lower() not in ("", "0", "false")
    missing = pytest.fail if in_ci else pytest.skip
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        missing("playwright is not installed: pip install -e '.[dev]'")
    path = shutil.which("chromium") or "/usr/bin/chromium"
    if not Path(path).is_file():
        missing("no chromium: apt-get install chromium (make setup does it as root)")
    return path


class _Records(logging.Handler):
    """Every log record it is given, formatted with its traceback."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(self.format(record))


@contextmanager
def api_log() -> Iterator[_Records]:
    """The in-process API's log, every level (uvicorn's access log too), kept while inside."""
    records = _Records()
    # uvicorn's loggers do not propagate to the root; the service's and the store's do
    on = ["", "uvicorn", "uvicorn.access"]
    verbose = ["service", "curvature_store", "uvicorn", "uvicorn.error", "uvicorn.access"]
    levels = {name: logging.getLogger(name).level for name in verbose}
    for name in on:
        logging.getLogger(name).addHandler(records)
    for name in verbose:
        logging.getLogger(name).setLevel(logging.DEBUG)
    try:
        yield records
    finally:
        for name in on:
            logging.getLogger(name).removeHandler(records)
        for name, level in levels.items():
            logging.getLogger(name).setLevel(level)


@pytest.fixture
def stack(tmp_path, tiny_model_dir):
    """The API (two keys: team A admin on `tiny`; team B editing its own streams of `tiny` and
    `other`) and one worker for `tiny`. At the end, neither key is in the API's log or the
    worker's output."""
    settings = Settings(
        redis_url=REDIS_URL,
        store_dir=tmp_path / "store",
        api_keys={
            hash_key(KEY_A): {
                "name": "team-a",
                "grants": [{"model": "tiny", "stream": "*", "role": "admin"}],
            },
            hash_key(KEY_B): {"name": "team-b", "models": ["tiny", "other"]},
        },
        models={"tiny": {}, "other": {}},
        sse_poll_s=0.1,
    )
    argv = [sys.executable, "-m", "crispedit_cli", "worker", "--model", str(tiny_model_dir),
            "--model-name", "tiny", "--store", str(settings.store_dir), "--redis", REDIS_URL,
            "--tokens", "300"]  # fmt: skip
    output = tmp_path / "worker.log"
    # the log is taken once uvicorn has configured its loggers (which drops their handlers)
    with redis_db(REDIS_URL), serve(create_app(settings)) as url, api_log() as log:
        with output.open("wb") as out:
            worker = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT)
        try:
            yield url, settings
            assert worker.poll() is None, f"the worker died:\n{output.read_text()[-4000:]}"
        finally:
            worker.terminate()
            try:
                worker.wait(timeout=30)
            except subprocess.TimeoutExpired:
                worker.kill()
    worker_output = output.read_text(errors="replace")
    api_output = "\n".join(log.lines)
    assert worker_output and api_output  # there was something to look in
    for key in (KEY_A, KEY_B):
        assert key not in api_output, "an API key in the API's log"
        assert key not in worker_output, "an API key in the worker's output"


def shot(page, name: str) -> None:
    SHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SHOTS / f"{name}.png"), full_page=True)


def sign_in(page, url: str, key: str) -> None:
    page.goto(f"{url}/console")
    page.get_by_label("API key").fill(key)
    page.get_by_label("API key").press("Enter")  # the keyboard alone signs in
    page.get_by_role("heading", name="Models and streams").wait_for()


def submit(
    page, facts: list[dict], stream: str = "team-a", model: str = "tiny", epochs: int = 8
) -> None:
    page.get_by_role("navigation").get_by_role("link", name="Submit edits").click()
    page.get_by_label("Model").select_option(model)
    page.get_by_label("Stream").fill(stream)
    for i, fact in enumerate(facts):
        for name, value in fact.items():
            page.get_by_label(f"Fact {i + 1} {name}", exact=True).fill(value)
    page.get_by_label("epochs").fill(str(epochs))
    page.get_by_label("learning rate").fill("0.03")
    page.get_by_role("button", name="Submit", exact=True).click()


def test_console_in_a_browser(stack):
    from playwright.sync_api import expect, sync_playwright

    url, settings = stack
    executable = chromium()
    from curvature_store import Store

    store = Store(settings.store_dir)
    started = time.monotonic()

    def mark(what: str) -> None:  # where the time goes (pytest -s shows it)
        print(f"{time.monotonic() - started:6.1f} s  {what}")

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=executable, headless=True)
        context = browser.new_context(
            accept_downloads=True, viewport={"width": 1200, "height": 900}
        )
        page = context.new_page()
        errors, urls = [], []
        page.on("pageerror", lambda err: errors.append(str(err)))
        page.on("request", lambda request: urls.append(request.url))

        # sign in: a wrong key is refused on the page, the right one kept in session storage
        page.goto(f"{url}/console")
        shot(page, "1-sign-in")
        page.get_by_label("API key").fill("not-a-key")
        page.get_by_role("button", name="Sign in").click()
        expect(page.locator("#signin-error")).to_contain_text("401")
        sign_in(page, url, KEY_A)
        assert page.evaluate("sessionStorage.length") == 1
        assert page.evaluate("localStorage.length") == 0
        expect(page.get_by_role("heading", name="tiny")).to_be_visible()
        expect(page.get_by_role("heading", name="other")).to_have_count(0)  # not team A's model

        # a refused submission: the API's message, and the field it names marked
        submit(page, [{"subject": "Eiffel Tower", "prompt": "The Eiffel Tower is located in"}])
        expect(page.locator("#submit-error")).to_contain_text("facts[0]")
        expect(page.get_by_label("Fact 1 target", exact=True)).to_have_attribute(
            "aria-invalid", "true"
        )
        shot(page, "2-submit-error")
        page.get_by_label("Fact 1 target", exact=True).fill("Rome")
        page.get_by_label("learning rate").fill("fast")
        page.get_by_role("button", name="Submit", exact=True).click()
        expect(page.locator("#submit-error")).to_contain_text("options.lr")
        expect(page.get_by_label("learning rate")).to_have_attribute("aria-invalid", "true")
        expect(page.get_by_label("Fact 1 target", exact=True)).not_to_have_attribute(
            "aria-invalid", "true"
        )
        page.get_by_label("learning rate").fill("0.03")
        assert store.streams() == []  # nothing was enqueued or written

        mark("signed in, refused submission")
        # the first edit, followed live to its version
        page.get_by_label("measure drift").check()
        page.get_by_role("button", name="Submit", exact=True).click()
        expect(page.get_by_role("heading", name="Job")).to_be_visible()
        expect(page.locator("#job-status")).to_have_text("succeeded", timeout=JOB_TIMEOUT_MS)
        expect(page.locator("#job-phase")).to_have_text("done")
        expect(page.locator("#job-epoch")).to_have_text(re.compile(r"^\d+ / 8$"))
        expect(page.locator("#job-loss")).to_have_text(re.compile(r"^\d+\.\d{4}$"))
        expect(page.locator("#job-seen")).to_contain_text("edit → done")  # followed live
        shot(page, "3-job")
        first = store.head("tiny", "team-a")
        expect(page.locator("#job-result")).to_contain_text(first)

        mark("first job done")
        # the second edit, with a target that must render as text, never as markup
        submit(page, [{"prompt": "Robert Boulter is an English", "target": XSS}])
        expect(page.locator("#job-status")).to_have_text("succeeded", timeout=JOB_TIMEOUT_MS)
        second = store.head("tiny", "team-a")
        assert second != first

        # a job that fails in the worker (submitted with the client): its error on its page
        with CrispEditClient(url, KEY_A) as client:
            # the API cannot know the worker's tokenizer has no chat template; the worker can
            wrapped = {"chat_template": "on"}
            failing = client.submit(
                "tiny", [{"prompt": "a", "target": "b"}], "team-a", None, wrapped
            )
        page.goto(f"{url}/console/#/job/{failing['job_id']}")
        expect(page.locator("#job-status")).to_have_text("failed", timeout=JOB_TIMEOUT_MS)
        expect(page.get_by_role("alert")).to_contain_text("no chat template")
        assert store.head("tiny", "team-a") == second  # nothing published

        mark("second job done")
        # the models and streams: the new stream with its head and two versions
        page.get_by_role("navigation").get_by_role("link", name="Streams").click()
        listed = page.locator("tr[data-stream='team-a']")
        expect(listed).to_contain_text(second[:10])
        expect(listed.locator("td.num")).to_have_text("2")
        shot(page, "4-streams")

        # the stream: both versions newest first, metrics, the plot
        listed.get_by_role("link", name="team-a").click()
        rows = page.locator("#versions tbody tr")
        expect(rows).to_have_count(2)
        expect(rows.nth(0)).to_have_attribute("data-version", second)
        expect(rows.nth(1)).to_contain_text("Rome")
        expect(rows.nth(0)).to_contain_text(XSS)
        assert page.evaluate("window.__pwned") is None
        assert page.locator("script").count() == 1  # the console's own module, nothing injected
        assert page.locator("#versions img").count() == 0
        efficacy = store.manifest(first)["metrics"]["efficacy"]
        expect(rows.nth(1)).to_contain_text(f"→ {efficacy:.2f}")
        drift = store.manifest(first)["metrics"]["evaluation"]["after"]["capability"]
        expect(rows.nth(1)).to_contain_text(f"{drift['ppl_change_pct']:+.2f} %")
        expect(page.locator("#history-plot svg")).to_have_count(2)
        expect(page.locator("#history-plot circle")).to_have_count(3)  # 2 efficacy, 1 drift
        shot(page, "5-stream")

        # one version: its facts, before/after, a download checked against its sha256
        page.get_by_role("link", name="#1", exact=True).click()
        expect(page.get_by_role("heading", name="Version #1")).to_be_visible()
        table = page.locator("#before-after")
        expect(table).to_contain_text("efficacy of these facts")
        expect(table).to_contain_text("perplexity change vs base")
        with page.expect_download() as info:
            page.get_by_role("button", name="Delta (this version's change)").click()
        path = info.value.path()
        sha = hashlib.sha256(Path(path).read_bytes()).hexdigest()
        assert sha == store.manifest(first)["files"]["delta.safetensors"]["sha256"]
        expect(page.locator(".downloads li").first).to_contain_text(f"sha256 {sha} ✓ verified")
        page.get_by_label("rank").fill("2")
        with page.expect_download() as info:
            page.get_by_role("button", name="Adapter (PEFT LoRA, against base)").click()
        assert info.value.suggested_filename.endswith("-adapter-r2.tar.gz")
        sha = hashlib.sha256(Path(info.value.path()).read_bytes()).hexdigest()
        expect(page.locator(".downloads li").last).to_contain_text(f"sha256 {sha} ✓ verified")
        shot(page, "6-version")

        # roll back to the first version, confirmed in a dialog; the second shows rolled back
        page.go_back()
        page.get_by_role("button", name="Roll back to here").click()
        page.keyboard.press("Escape")  # the dialog closes from the keyboard: nothing moves
        expect(page.locator("#confirm")).to_be_hidden()
        assert store.head("tiny", "team-a") == second
        page.get_by_role("button", name="Roll back to here").click()
        page.locator("#confirm").get_by_role("button", name="Roll back").click()
        expect(rows.nth(0)).to_contain_text("rolled back")
        expect(rows.nth(1)).to_contain_text("head")
        assert store.head("tiny", "team-a") == first
        shot(page, "7-rolled-back")

        # an edit cancelled from its page as soon as it shows, waiting or running: it ends
        # cancelled, with what that means, and publishes nothing
        submit(page, [{"prompt": "The Eiffel Tower is located in", "target": "Paris"}], epochs=100)
        page.get_by_role("button", name="Cancel the job").click()
        expect(page.locator("#job-status")).to_have_text("cancelled", timeout=JOB_TIMEOUT_MS)
        expect(page.get_by_role("alert")).to_contain_text("no version was published")
        expect(page.get_by_role("button", name="Cancel the job")).to_be_hidden()
        assert store.head("tiny", "team-a") == first

        mark("stream, version, download, rollback")
        # team B's key, on the same model, sees neither the stream nor its versions, even by address
        page.get_by_role("button", name="Sign out").click()
        sign_in(page, url, KEY_B)
        expect(page.get_by_role("heading", name="other")).to_be_visible()
        tiny = page.locator("section[aria-labelledby='model-tiny']")
        expect(tiny.get_by_role("heading", name="tiny")).to_be_visible()  # B may edit tiny too
        expect(tiny).to_contain_text("No streams yet.")
        expect(tiny.locator("tr[data-stream]")).to_have_count(0)
        expect(page.get_by_text("team-a")).to_have_count(0)
        page.goto(f"{url}/console/#/stream/tiny/team-a")
        expect(page.get_by_role("heading", name="Not available")).to_be_visible()
        expect(page.locator("#versions")).to_have_count(0)
        page.goto(f"{url}/console/#/version/{first}")
        expect(page.locator(".error")).to_contain_text("404")
        shot(page, "8-other-team")

        # a job no worker takes (none serves `other`: it waits for a curvature build), cancelled
        # from its page: the request shows until a worker would end it
        submit(page, [{"prompt": "The capital of France is", "target": "Berlin"}], "b", "other")
        expect(page.locator("#job-status")).to_contain_text("queued")
        expect(page.locator("#job-phase")).to_contain_text("waiting for")
        page.get_by_role("button", name="Cancel the job").click()
        expect(page.locator("#job-status")).to_have_text("queued · cancel requested")
        expect(page.get_by_role("button", name="Cancel the job")).to_be_hidden()
        shot(page, "9-cancelled")

        mark("other team, cancel")
        assert errors == []
        assert not [u for u in urls if KEY_A in u or KEY_B in u]  # the key never in a URL
        assert urls and not _external(urls, url)  # no CDN, nothing but the API itself
        browser.close()


def _external(urls: list[str], origin: str) -> list[str]:
    """The requested URLs that leave `origin` (the API's http://host:port): neither on it nor a
    blob: or data: URL the page made itself."""
    return [u for u in urls if not u.startswith((f"{origin}/", "blob:", "data:"))]


def test_console_on_a_guarded_stream(stack):
    """Guarded publishing (stream policies, held versions, generate):
    the policy in words, a rejected job's broken rule, the held version published anyway, and
    answers at a version and at its parent side by side."""
    from playwright.sync_api import expect, sync_playwright

    url, settings = stack
    executable = chromium()
    from curvature_store import Store

    store = Store(settings.store_dir)
    with CrispEditClient(url, KEY_A) as client:
        client.set_policy("tiny", "guarded", {"min_efficacy": 1.0})
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=executable, headless=True)
        page = browser.new_page(viewport={"width": 1200, "height": 900})
        errors, urls = [], []
        page.on("pageerror", lambda err: errors.append(str(err)))
        page.on("request", lambda request: urls.append(request.url))
        sign_in(page, url, KEY_A)

        # a version outside the policy: the job is rejected with the rule it broke
        submit(page, [{"prompt": "The Eiffel Tower is located in", "target": "Rome"}], "guarded")
        expect(page.locator("#job-status")).to_have_text("rejected", timeout=JOB_TIMEOUT_MS)
        expect(page.get_by_role("alert")).to_contain_text("min_efficacy 1")
        assert store.head("tiny", "guarded") is None
        shot(page, "10-rejected")

        # the stream: its policy, the held version, published anyway after a confirmation
        page.get_by_role("navigation").get_by_role("link", name="Streams").click()
        expect(page.locator("tr[data-stream='guarded']")).to_contain_text("efficacy ≥ 1")
        page.goto(f"{url}/console/#/stream/tiny/guarded")
        expect(page.locator("#policy")).to_contain_text("efficacy ≥ 1")
        row = page.locator("#versions tbody tr").first
        expect(row).to_contain_text("held")
        row.get_by_role("button", name="Publish anyway").click()
        page.locator("#confirm").get_by_role("button", name="Publish").click()
        expect(row).to_contain_text("head")
        held = row.get_attribute("data-version")
        assert store.head("tiny", "guarded") == held

        # before/after by generation: the version and its parent answer side by side
        row.get_by_role("link", name="#1", exact=True).click()
        page.get_by_label("Prompts").fill(
            "The Eiffel Tower is located in\nThe capital of France is"
        )
        page.get_by_role("button", name="Answer at this version and its parent").click()
        answers = page.locator("#generations tbody tr")
        expect(answers).to_have_count(2, timeout=JOB_TIMEOUT_MS)
        expect(answers.first.locator("th")).to_have_text("The Eiffel Tower is located in")
        shot(page, "11-generate")
        assert errors == []
        assert urls and not _external(urls, url)
        browser.close()
