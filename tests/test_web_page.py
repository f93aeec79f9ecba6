"""The chat page in a real headless browser (Debian's chromium + chromedriver, driven by selenium)
against a real lamabus service with its embedded broker, WebSocket listener and bundled model.

The service runs in a thread of its own with its own event loop, since selenium blocks; the
tests talk to it through :meth:`ServiceThread.call`. Every wait is a WebDriverWait condition
on the page's stable hooks (``data-testid``, ``data-role``, ``data-state``).
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import threading
import urllib.request
import uuid
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Coroutine, Iterator, TypeVar

import pytest

from bus.node.app import LamabusService
from bus.config import Settings
from bus.node.publisher import MSG_ID

T = TypeVar("T")

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"
#: Set to a path (e.g. docs/chat-page.png) to keep the screenshot of the conversation there.
SCREENSHOT_ENV = "LAMABUS_WEB_SCREENSHOT"
WAIT = 90.0  # the bundled model on two busy cores; a condition that holds returns at once

try:
    from selenium import webdriver
    from selenium.common.exceptions import StaleElementReferenceException
    from selenium.webdriver.chrome.service import Service as ChromeService
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait
except ImportError:  # pragma: no cover - the dev extras install it
    webdriver = None  # type: ignore[assignment]

_missing = [what for what, ok in (
    ("the selenium package (pip install -e '.[dev]')", webdriver is not None),
    (f"chromium ({CHROMIUM}; apt-get install chromium, as .ci/run does)", os.access(CHROMIUM, os.X_OK)),
    (f"chromedriver ({CHROMEDRIVER}; apt-get install chromium-driver, as .ci/run does)",
     os.access(CHROMEDRIVER, os.X_OK)),
) if not ok]
_why = "browser tests need " + ", ".join(_missing)
# CI installs the browser (.ci/run): there, a missing one is a failure, never a skip.
needs_browser = pytest.mark.skipif(bool(_missing) and not os.environ.get("CI"), reason=_why)


# ---------------------------------------------------------------------------------- the service


class ServiceThread:
    """A LamabusService in a thread with its own event loop (selenium blocks the caller's)."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.loop = asyncio.new_event_loop()
        self.svc: LamabusService | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._stop: asyncio.Event | None = None
        self._thread = threading.Thread(target=self._run, name="lamabus-service", daemon=True)

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        try:
            self.loop.run_until_complete(self._main())
        except BaseException as exc:  # reported to the test by start()
            self._error = exc
        finally:
            self._ready.set()
            self.loop.run_until_complete(self.loop.shutdown_asyncgens())
            self.loop.run_until_complete(self.loop.shutdown_default_executor())
            self.loop.close()

    async def _main(self) -> None:
        self._stop = asyncio.Event()
        async with LamabusService(self.settings) as svc:
            self.svc = svc
            self._ready.set()
            await self._stop.wait()

    def start(self) -> LamabusService:
        self._thread.start()
        self._ready.wait(120)
        if self._error is not None:
            raise self._error
        assert self.svc is not None, "the service did not start in time"
        return self.svc

    def call(self, coro: Coroutine[Any, Any, T], timeout: float = 60.0) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def stop(self) -> None:
        if self._stop is not None and not self.loop.is_closed():
            self.loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(60)
        assert not self._thread.is_alive(), "the service did not stop"
        if self._error is not None:
            raise self._error


@pytest.fixture(scope="module")
def lamabus(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServiceThread]:
    if _missing:
        if os.environ.get("CI"):
            pytest.fail(_why)
        pytest.skip(_why)
    data = tmp_path_factory.mktemp("web") / "data"
    settings = Settings(data_dir=str(data), embedded_port=0, embedded_ws_port=0, web="127.0.0.1:0")
    thread = ServiceThread(settings)
    svc = thread.start()
    try:
        assert svc.web is not None and svc.embedded is not None and svc.embedded.ws_url
        assert settings.web_url_file.read_text().strip() == svc.web.url
        yield thread
    finally:
        thread.stop()
    assert not settings.web_url_file.exists()


async def _api(svc: LamabusService, endpoint: str, payload: dict[str, Any]) -> dict[str, Any]:
    assert svc.nc is not None
    reply = await svc.nc.request(f"{svc.settings.prefix}.api.{endpoint}", json.dumps(payload).encode(), timeout=30)
    assert not (reply.headers or {}).get("Nats-Service-Error-Code"), reply.data
    return json.loads(reply.data)


@pytest.fixture(scope="module")
def model(lamabus: ServiceThread) -> dict[str, Any]:
    """The bundled model, with no stop sequence so that a long reply really is long."""
    svc = lamabus.svc
    assert svc is not None
    models = lamabus.call(_api(svc, "models.list", {}))
    model_id = models["activeModelId"]
    assert model_id, models
    reply = lamabus.call(_api(svc, "models.update", {"modelId": model_id, "generation": {"stop": [],
                                                                                         "temperature": 0.0}}))
    return reply["model"]


# ---------------------------------------------------------------------------------- the browser


@pytest.fixture(scope="module")
def driver(lamabus: ServiceThread, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage", "--window-size=1280,860",
                 f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}"):
        options.add_argument(flag)
    browser = webdriver.Chrome(service=ChromeService(executable_path=CHROMEDRIVER), options=options)
    try:
        yield browser
    finally:
        browser.quit()


def wait(driver: Any, condition: Any, message: str, timeout: float = WAIT) -> Any:
    # The page re-renders its lists as events arrive: an element found a moment ago may be replaced before it
    # is read (stale). That is not an answer: look again, until the condition holds or the time is up.
    return WebDriverWait(driver, timeout, poll_frequency=0.1,
                         ignored_exceptions=(StaleElementReferenceException,)).until(condition, message)


MESSAGES_JS = """
return [...document.querySelectorAll('[data-testid="message"]')].map(e => ({
  id: e.dataset.id || null, requestId: e.dataset.requestId || null, role: e.dataset.role, state: e.dataset.state,
  text: (e.querySelector('.content') || e.querySelector('.body')).textContent,
  note: (e.querySelector('[data-testid="reply-note"]') || {}).textContent || '',
  stats: Object.fromEntries([...e.querySelectorAll('.stat')].map(s => [s.dataset.stat, s.lastChild.textContent])),
}));
"""


def messages(driver: Any) -> list[dict[str, Any]]:
    return driver.execute_script(MESSAGES_JS)


def open_topic(driver: Any, lamabus: ServiceThread, topic: str) -> None:
    """Open ``topic`` logged in with the token ``serve`` prints (``#token=...&topic=...``)."""
    svc = lamabus.svc
    assert svc is not None and svc.web is not None and svc.web.login_url
    driver.get(f"{svc.web.login_url}&topic={topic}")
    wait(driver, lambda d: d.find_element(By.CSS_SELECTOR, '[data-testid="connection-status"]')
         .get_attribute("data-state") == "connected", "the page did not connect")
    wait(driver, lambda d: d.execute_script("return document.body.dataset.ready === 'true' && "
                                            "document.body.dataset.history === 'loaded'"),
         "the page did not load the topic")


def send(driver: Any, text: str) -> None:
    box = driver.find_element(By.CSS_SELECTOR, '[data-testid="message-input"]')
    box.clear()
    box.send_keys(text)
    driver.find_element(By.CSS_SELECTOR, '[data-testid="send-button"]').click()


def set_field(driver: Any, testid: str, value: str) -> None:
    field = driver.find_element(By.CSS_SELECTOR, f'[data-testid="{testid}"]')
    field.clear()
    if value:
        field.send_keys(value)
    driver.execute_script("arguments[0].dispatchEvent(new Event('change'))", field)


def reply_in_state(state: str, index: int = -1) -> Any:
    def condition(d: Any) -> list[dict[str, Any]] | bool:
        ms = messages(d)
        replies = [m for m in ms if m["role"] == "assistant"]
        return ms if replies and replies[index]["state"] == state else False
    return condition


def new_topic() -> str:
    return f"web-{uuid.uuid4().hex[:10]}"


# ---------------------------------------------------------------------------------- the cases


@needs_browser
@pytest.mark.model
def test_send_a_message_and_watch_the_reply_stream_to_done(driver, lamabus, model):
    topic = new_topic()
    open_topic(driver, lamabus, topic)
    set_field(driver, "max-tokens-input", "24")
    # Tokens arrive one by one: the reply is seen streaming before it is done.
    send(driver, "Say hello to the browser.")
    wait(driver, lambda d: any(m["role"] == "assistant" and m["state"] == "streaming" and m["text"]
                               for m in messages(d)), "no streamed token was shown")
    ms = wait(driver, reply_in_state("done"), "the reply did not reach done")
    assert [m["role"] for m in ms] == ["user", "assistant"]
    user, reply = ms
    assert user["text"] == "Say hello to the browser." and user["state"] == "done"
    assert reply["text"].strip() and reply["requestId"] == user["id"]
    # Per-reply figures from generation.completed; maxTokens went with the message.
    stats = wait(driver, lambda d: messages(d)[1]["stats"] or False, "no reply stats")
    assert stats["model"] == model["id"]
    assert stats["finish"] in ("stop", "length") and 0 < int(stats["tokens"]) <= 24
    assert stats["finish"] == "stop" or stats["tokens"] == "24"
    params = driver.find_element(By.CSS_SELECTOR, '[data-testid="message"][data-role="user"] .params').text
    assert params == "maxTokens=24"
    assert float(stats["tok/s"]) > 0 and stats["TTFT"].endswith("ms") and "cached" in stats
    # The topic was created by its first message and is listed.
    wait(driver, lambda d: d.find_elements(By.CSS_SELECTOR, f'[data-testid="topic-list"] [data-topic="{topic}"]'),
         "the topic is not in the topic list")
    set_field(driver, "max-tokens-input", "")


@needs_browser
@pytest.mark.model
def test_stop_a_long_reply_keeps_its_partial_text(driver, lamabus, model):
    topic = new_topic()
    open_topic(driver, lamabus, topic)
    set_field(driver, "max-tokens-input", "1500")
    send(driver, "Count from 1 to 1000, one number per line.")
    wait(driver, lambda d: any(m["role"] == "assistant" and m["state"] == "streaming" and len(m["text"]) > 10
                               for m in messages(d)), "the long reply did not start streaming")
    stop = driver.find_element(By.CSS_SELECTOR, '[data-testid="stop-button"]')
    assert stop.is_enabled()
    stop.click()
    ms = wait(driver, reply_in_state("cancelled"), "the reply was not cancelled")
    reply = ms[-1]
    assert len(reply["text"]) > 10, reply
    assert "stopped" in reply["note"]
    wait(driver, lambda d: not d.find_element(By.CSS_SELECTOR, '[data-testid="stop-button"]').is_enabled(),
         "the stop button stays enabled with nothing running")
    set_field(driver, "max-tokens-input", "")
    # Still there after a reload (from JetStream's generation.cancelled).
    driver.refresh()
    open_topic(driver, lamabus, topic)
    ms2 = wait(driver, reply_in_state("cancelled"), "the cancelled reply is not in the history")
    assert ms2[-1]["text"].strip() == reply["text"].strip()


@needs_browser
@pytest.mark.model
def test_reload_shows_the_history_once(driver, lamabus, model):
    topic = new_topic()
    open_topic(driver, lamabus, topic)
    set_field(driver, "max-tokens-input", "12")
    send(driver, "First question.")
    wait(driver, reply_in_state("done", 0), "first reply not done")
    send(driver, "Second question.")
    before = wait(driver, lambda d: (len(ms := messages(d)) == 4 and ms[3]["state"] == "done" and ms[3]["stats"]
                                     and ms), "second reply not done")
    set_field(driver, "max-tokens-input", "")
    driver.refresh()
    open_topic(driver, lamabus, topic)
    after = wait(driver, lambda d: (len(ms := messages(d)) >= 4 and all(m["stats"] for m in ms[1::2]) and ms),
                 "the history was not shown")
    assert len(after) == 4, after
    assert [(m["role"], m["state"], m["text"].strip()) for m in after] == \
        [(m["role"], m["state"], m["text"].strip()) for m in before]
    assert after[1]["stats"] == before[1]["stats"]
    assert len({m["id"] for m in after}) == 4


XSS = ('<img src=x onerror="window.__xss=1"> <script>window.__xss=2</script> '
       '<a href="javascript:window.__xss=3">link</a> [click](javascript:window.__xss=4) **bold**\n\n'
       '```html\n<script>window.__xss=5</script>\n```')


@needs_browser
@pytest.mark.model
def test_model_output_with_html_is_shown_as_text_and_never_runs(driver, lamabus, model):
    topic = new_topic()
    open_topic(driver, lamabus, topic)
    svc = lamabus.svc
    assert svc is not None and svc.nc is not None
    ai = {"type": "chat.message", "id": f"xss-{uuid.uuid4().hex}", "topic": topic, "authorId": model["personId"],
          "text": XSS, "sentAt": datetime.now(timezone.utc).isoformat(), "modelId": model["id"]}

    async def post() -> None:
        assert svc.nc is not None
        await svc.nc.jetstream().publish(f"lama.topic.{topic}.msg", json.dumps(ai).encode(), headers={MSG_ID: ai["id"]})

    lamabus.call(post())
    ms = wait(driver, lambda d: (ms := messages(d)) and ms, "the AI-authored message did not show")
    assert len(ms) == 1 and ms[0]["role"] == "assistant" and ms[0]["state"] == "done"
    text = ms[0]["text"]
    assert '<img src=x onerror="window.__xss=1">' in text
    assert "<script>window.__xss=2</script>" in text
    assert "<script>window.__xss=5</script>" in text  # inside the rendered code block
    content = driver.find_element(By.CSS_SELECTOR, '[data-testid="message"] .content')
    assert content.find_elements(By.CSS_SELECTOR, "img, script, iframe") == []
    assert content.find_element(By.CSS_SELECTOR, "strong").text == "bold"
    assert content.find_element(By.CSS_SELECTOR, "pre code").text == "<script>window.__xss=5</script>"
    assert all(not (a.get_attribute("href") or "").startswith("javascript:")
               for a in content.find_elements(By.CSS_SELECTOR, "a"))
    # A person typing the same: shown as text too, and lamabus answers it.
    set_field(driver, "max-tokens-input", "8")
    send(driver, '<img src=y onerror="window.__xss=6"><script>window.__xss=7</script>')
    ms = wait(driver, reply_in_state("done"), "the reply to the HTML message did not finish")
    assert ms[1]["role"] == "user" and "<script>window.__xss=7</script>" in ms[1]["text"]
    set_field(driver, "max-tokens-input", "")
    assert driver.find_elements(By.CSS_SELECTOR, '#messages img, #messages script') == []
    assert driver.execute_script("return window.__xss === undefined")


@needs_browser
@pytest.mark.model
def test_thinking_is_shown_apart_and_collapsible(driver, lamabus, model):
    """A thinking model's stream, played on the topic's subjects (the bundled model does not think)."""
    topic = new_topic()
    open_topic(driver, lamabus, topic)
    svc = lamabus.svc
    assert svc is not None
    request_id, ai = f"think-{uuid.uuid4().hex}", model["personId"]
    base = {"topic": topic, "authorId": ai, "requestId": request_id}

    async def play(*events: tuple[str, dict[str, Any]]) -> None:
        assert svc.nc is not None
        js = svc.nc.jetstream()
        for kind, event in events:
            data = json.dumps(event).encode()
            if kind == "tok":
                await svc.nc.publish(f"lama.topic.{topic}.tok", data)
            else:
                await js.publish(f"lama.topic.{topic}.evt", data)
        await svc.nc.flush()

    lamabus.call(play(
        ("evt", {"type": "generation.started", **base, "modelId": model["id"], "queuePosition": 2}),
    ))
    wait(driver, lambda d: "queued: 2 ahead" in (messages(d) or [{}])[-1].get("note", ""), "no queue position")
    lamabus.call(play(
        ("tok", {"type": "generation.token", **base, "seq": 0, "text": "Let me see", "channel": "thinking"}),
        ("tok", {"type": "generation.token", **base, "seq": 1, "text": " <b>how</b>.", "channel": "thinking"}),
        ("tok", {"type": "generation.token", **base, "seq": 1, "text": " <b>how</b>.", "channel": "thinking"}),
        ("tok", {"type": "generation.token", **base, "seq": 2, "text": "The answer", "channel": "content"}),
    ))
    wait(driver, lambda d: (m := messages(d)[-1])["text"] == "The answer" and m["state"] == "streaming",
         "the streamed content is not shown")
    thinking = driver.find_element(By.CSS_SELECTOR, '[data-testid="thinking"]')
    assert thinking.is_displayed() and thinking.get_attribute("open") is None  # collapsed at first
    thinking.find_element(By.TAG_NAME, "summary").click()
    wait(driver, lambda d: thinking.find_element(By.CSS_SELECTOR, ".thinking-body").text == "Let me see <b>how</b>.",
         "the thinking text is not shown (once) when opened")
    lamabus.call(play(("evt", {
        "type": "generation.completed", **base, "messageId": f"reply-{request_id}", "modelId": model["id"],
        "text": "The answer is 42.", "thinking": "Let me see <b>how</b>.", "tokens": 7, "finishReason": "stop",
        "timing": {"startTime": 0, "endTime": 1000, "elapsedTime": 1000, "tokensPerSecond": 7.0,
                   "timeToFirstToken": 120.0, "queueTime": 5.0},
        "usage": {"promptTokens": 20, "completionTokens": 7, "totalTokens": 27, "cachedTokens": 16}})))
    reply = wait(driver, reply_in_state("done"), "the reply did not finish")[-1]
    assert reply["text"] == "The answer is 42."
    assert reply["stats"] == {"model": model["id"], "tok/s": "7.0", "TTFT": "120 ms", "finish": "stop",
                              "tokens": "7", "cached": "16", "queued": "5 ms"}


ANALYSIS_JS = """
const a = document.querySelector('[data-testid="topic-analysis"]');
return {hidden: a.hidden, title: a.querySelector('[data-testid="analysis-title"]').textContent,
        language: a.querySelector('[data-testid="analysis-language"]').textContent,
        keywords: [...a.querySelectorAll('[data-testid="analysis-keywords"] li')].map(li => li.textContent),
        summary: a.querySelector('[data-testid="analysis-summary"]').textContent,
        elements: a.querySelectorAll('b, i, script, img').length};
"""


@needs_browser
@pytest.mark.model
def test_the_topic_analysis_is_shown_as_text(driver, lamabus, model):
    """A topic.analysed on the topic (live), and a topic's recorded analysis (topics.get): model output, as text."""
    from wire.records import TopicAnalysis

    svc = lamabus.svc
    assert svc is not None and svc.registry is not None
    topic = new_topic()
    open_topic(driver, lamabus, topic)
    assert driver.execute_script(ANALYSIS_JS)["hidden"]
    event = {"type": "topic.analysed", "topic": topic, "basedOnMessageId": "r-1", "modelId": model["id"],
             "title": "<b>Bread</b> at home", "keywords": ["bread", "<i>yeast</i>", "oven"],
             "summary": "How to bake. <script>window.__xss=9</script>", "language": "en", "replyCount": 1,
             "analysedAt": 0}

    async def publish() -> None:
        assert svc.nc is not None
        await svc.nc.jetstream().publish(f"lama.topic.{topic}.evt", json.dumps(event).encode())

    lamabus.call(publish())
    shown = wait(driver, lambda d: (a := d.execute_script(ANALYSIS_JS)) and not a["hidden"] and a,
                 "the analysis did not show")
    assert (shown["title"], shown["language"], shown["keywords"], shown["summary"], shown["elements"]) == (
        "<b>Bread</b> at home", "en", ["bread", "<i>yeast</i>", "oven"],
        "How to bake. <script>window.__xss=9</script>", 0)
    assert driver.execute_script("return window.__xss === undefined")

    recorded = new_topic()
    lamabus.call(svc.registry.create_topic(recorded))
    lamabus.call(svc.registry.record_analysis(recorded, TopicAnalysis(
        title="Sourdough", keywords=("starter", "flour", "water"), summary="Keeping a starter.", language="en",
        based_on_message_id="r-2", model_id=model["id"], reply_count=1, analysed_at=0)))
    open_topic(driver, lamabus, recorded)
    shown = wait(driver, lambda d: (a := d.execute_script(ANALYSIS_JS)) and a["title"] == "Sourdough" and a,
                 "the recorded analysis did not show")
    assert not shown["hidden"] and shown["keywords"] == ["starter", "flour", "water"]
    wait(driver, lambda d: "Sourdough" in d.find_element(
        By.CSS_SELECTOR, f'[data-testid="topic-list"] [data-topic="{recorded}"]').text,
         "the topic list does not show the title")


@needs_browser
@pytest.mark.model
def test_a_rejected_message_is_shown_as_such(driver, lamabus, model):
    open_topic(driver, lamabus, new_topic())
    set_field(driver, "max-tokens-input", "0")  # out of bounds: lamabus answers message.rejected
    send(driver, "This one has a bad parameter.")
    set_field(driver, "max-tokens-input", "")
    wait(driver, lambda d: messages(d)[0]["state"] == "failed", "the message was not marked rejected")
    note = driver.find_element(By.CSS_SELECTOR, '[data-testid="rejected"]').text
    assert note.startswith("rejected (bad_request):") and "maxTokens" in note
    assert [m["role"] for m in messages(driver)] == ["user"]


@needs_browser
@pytest.mark.model
def test_settings_and_diagnostics_panels_use_the_api(driver, lamabus, model):
    """The page logs in as ``chat``: changing a topic's settings is admin's, so the broker refuses it
    and the page says ``forbidden`` at once (not a timeout); reading diagnostics is allowed."""
    topic = new_topic()
    open_topic(driver, lamabus, topic)
    svc = lamabus.svc
    assert svc is not None
    lamabus.call(_api(svc, "topics.create", {"topicId": topic}))
    box = driver.find_element(By.CSS_SELECTOR, '[data-testid="system-prompt-input"]')
    box.clear()
    box.send_keys("You answer like a pirate.")
    driver.find_element(By.CSS_SELECTOR, '[data-testid="save-system-prompt"]').click()
    note = wait(driver, lambda d: (t := d.find_element(By.CSS_SELECTOR, '[data-testid="settings-note"]').text)
                and t, "no answer to saving the system prompt", timeout=10)
    assert "forbidden" in note and "lama.api.topics.update" in note, note
    select = driver.find_element(By.CSS_SELECTOR, '[data-testid="model-select"]')
    driver.execute_script("arguments[0].value = arguments[1]; arguments[0].dispatchEvent(new Event('change'))",
                          select, model["id"])
    wait(driver, lambda d: "lama.api.topics.bind" in d.find_element(By.CSS_SELECTOR, '[data-testid="settings-note"]')
         .text, "binding was not refused as forbidden", timeout=10)
    record = lamabus.call(_api(svc, "topics.get", {"topicId": topic}))["topic"]
    assert record.get("systemPrompt") is None and record.get("boundModelId") is None, record
    driver.find_element(By.CSS_SELECTOR, '[data-testid="diagnostics-panel"] > summary').click()
    summary = wait(driver, lambda d: (t := d.find_element(By.CSS_SELECTOR, '[data-testid="diagnostics-summary"]')
                                      .text) and "active model" in t and t, "no diagnostics")
    assert model["id"] in summary
    driver.find_element(By.CSS_SELECTOR, '[data-testid="diagnostics-panel"] > summary').click()


@needs_browser
@pytest.mark.model
def test_the_page_asks_for_its_token_and_keeps_it_for_the_tab(driver, lamabus, model):
    """Opened without ``#token=``, the page asks; a wrong token is refused by the broker and asked again;
    the right one connects, leaves the address bar and stays in this tab's sessionStorage only."""
    svc = lamabus.svc
    assert svc is not None and svc.web is not None and svc.web.url and svc.auth is not None
    driver.get(svc.web.url)
    driver.execute_script("sessionStorage.clear()")
    driver.get(f"{svc.web.url}#topic={new_topic()}")
    driver.refresh()
    token_box = wait(driver, lambda d: (e := d.find_element(By.CSS_SELECTOR, '[data-testid="token-input"]'))
                     .is_displayed() and e, "the page did not ask for its token", timeout=20)
    token_box.send_keys("not-the-token")
    driver.find_element(By.CSS_SELECTOR, '[data-testid="login-button"]').click()
    wait(driver, lambda d: "refused" in d.find_element(By.CSS_SELECTOR, '[data-testid="login-note"]').text,
         "a wrong token was not refused", timeout=20)
    token_box = driver.find_element(By.CSS_SELECTOR, '[data-testid="token-input"]')
    token_box.send_keys(svc.auth.page_token)
    driver.find_element(By.CSS_SELECTOR, '[data-testid="login-button"]').click()
    wait(driver, lambda d: d.find_element(By.CSS_SELECTOR, '[data-testid="connection-status"]')
         .get_attribute("data-state") == "connected", "the page did not connect with the right token", timeout=20)
    assert driver.execute_script("return sessionStorage.getItem('lamabus.token')") == svc.auth.page_token
    assert driver.execute_script("return localStorage.getItem('lamabus.token')") is None
    # From the address: stored, then taken out of the address bar.
    driver.get(f"{svc.web.login_url}&topic=from-address")
    wait(driver, lambda d: d.find_element(By.CSS_SELECTOR, '[data-testid="connection-status"]')
         .get_attribute("data-state") == "connected", "the page did not connect with the token in its address")
    assert "token" not in driver.current_url and "topic=from-address" in driver.current_url


@needs_browser
@pytest.mark.model
def test_page_config_and_static_files_are_served(lamabus):
    svc = lamabus.svc
    assert svc is not None and svc.web is not None and svc.embedded is not None
    with urllib.request.urlopen(f"{svc.web.url}config.json", timeout=10) as r:
        config = json.loads(r.read())
    # The page logs in as the embedded broker's chat user; its token is not in config.json.
    assert config == {"wsUrl": svc.embedded.ws_url, "prefix": "lama", "stream": "LAMA_TOPICS", "user": "chat"}
    with urllib.request.urlopen(f"{svc.web.url}static/app.js", timeout=10) as r:
        assert r.status == 200 and "javascript" in r.headers["Content-Type"]


@needs_browser
@pytest.mark.model
@pytest.mark.slow
def test_the_page_keeps_working_across_a_broker_restart(driver, lamabus, model):
    topic = new_topic()
    open_topic(driver, lamabus, topic)
    set_field(driver, "max-tokens-input", "12")
    send(driver, "Before the restart.")
    wait(driver, reply_in_state("done", 0), "the first reply did not finish")
    svc = lamabus.svc
    assert svc is not None and svc.embedded is not None
    ws_url, url = svc.embedded.ws_url, svc.embedded.url

    lamabus.call(svc.embedded.stop())
    wait(driver, lambda d: d.find_element(By.CSS_SELECTOR, '[data-testid="connection-status"]')
         .get_attribute("data-state") == "reconnecting", "the page did not notice the broker going away")
    lamabus.call(svc.embedded.start())
    assert (svc.embedded.ws_url, svc.embedded.url) == (ws_url, url)  # the same ports: the page reconnects
    wait(driver, lambda d: d.find_element(By.CSS_SELECTOR, '[data-testid="connection-status"]')
         .get_attribute("data-state") == "connected", "the page did not reconnect")

    send(driver, "After the restart.")
    ms = wait(driver, lambda d: (len(ms := messages(d)) >= 4 and ms[3]["state"] == "done" and ms),
              "no reply after the broker restart")
    # Nothing shown twice: the ordered consumer resumed after its last message.
    assert [(m["role"], m["state"]) for m in ms] == [("user", "done"), ("assistant", "done")] * 2
    assert len({m["id"] for m in ms}) == 4
    assert ms[2]["text"] == "After the restart."
    set_field(driver, "max-tokens-input", "")
    # And a reload reads the same four from the restarted broker's store.
    driver.refresh()
    open_topic(driver, lamabus, topic)
    after = wait(driver, lambda d: (len(ms := messages(d)) >= 4 and ms), "no history after the restart")
    assert len(after) == 4


@needs_browser
@pytest.mark.model
def test_screenshot_of_a_conversation(driver, lamabus, model, tmp_path):
    """Leaves a picture of the page; with LAMABUS_WEB_SCREENSHOT=docs/chat-page.png, the README's."""
    topic = "demo"
    open_topic(driver, lamabus, topic)
    set_field(driver, "max-tokens-input", "200")
    send(driver, "Write a Python function that adds two numbers, in a code block.")
    wait(driver, reply_in_state("done"), "the demo reply did not finish")
    set_field(driver, "max-tokens-input", "")
    # The topic, created by its first message, is picked up from the registry's events.
    wait(driver, lambda d: d.find_element(By.CSS_SELECTOR, '[data-testid="topic-model"]').text
         == f"answered by {model['id']}", "the page did not learn of the new topic")
    wait(driver, lambda d: d.find_elements(By.CSS_SELECTOR, '[data-testid="topic-list"] [data-topic="demo"]'),
         "the new topic is not listed")
    path = Path(os.environ.get(SCREENSHOT_ENV) or tmp_path / "chat-page.png")
    assert driver.save_screenshot(str(path))
    assert path.stat().st_size > 10_000
