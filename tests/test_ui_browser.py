"""Browser tests of the chat page (http_bridge/static/) in Debian's Chromium, via Playwright.

Everything runs against real processes: the model server (a tiny random Llama, so replies are
random text) and the HTTP bridge under uvicorn, started as subprocesses. A few error cases that
a real server cannot be made to produce on demand (a hostile *assistant* reply, 401/429
responses, an error chunk mid-stream) are served to the page with Playwright's request routing;
the page itself still comes from the real bridge.

One test runs the embedded default model (SmolLM2) the way a person would after `make serve`:
a multi-turn conversation, Stop, reload.

Chromium: /usr/bin/chromium (apt-get install -y chromium); Playwright never downloads one.
Every test leaves a screenshot in tests/artifacts/ (git-ignored), pass or fail.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

pytestmark = pytest.mark.browser

CHROMIUM = os.environ.get("GLMSERVE_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
ARTIFACTS = Path(__file__).parent / "artifacts"
SETTINGS_KEY = "glmserve.v1.settings"
CONVERSATIONS_KEY = "glmserve.v1.conversations"

# Short replies keep the suite fast; tests that need a long reply raise max_tokens themselves.
DEFAULT_MAX_TOKENS = 8

sync_api = pytest.importorskip("playwright.sync_api")
expect = sync_api.expect

# ====================================================================== processes
# --- stack begin (the real model server + the real bridge)

from procs import (  # noqa: E402  (tests/procs.py)
    spawn_bridge,
    spawn_model_server,
    start_bridge,
    wait_until,
)

# The served model is a tiny Llama rigged so that GREEDY decoding (temperature 0) replies with
# exactly this hostile text, token by token (tests/tiny_models.py; every token must be unique);
# sampled at the default temperature it produces random text, as long as max_tokens allows.
HOSTILE_REPLY = "Hi <img src onerror=__pwned(1)><script>alert[2] 中文 **ok**"


class Stack:
    """A model server plus a bridge in front of it, as the page sees them."""

    def __init__(self, model_dir: Path) -> None:
        self.model_dir = model_dir
        self.server: Any = None
        self.bridge: Any = None
        self.model = ""

    def start(self) -> None:
        self.server = spawn_model_server(str(self.model_dir))
        self.bridge = spawn_bridge("--backend", self.server.target, "--drain-seconds", "1")
        self.model = routed_model(self.url)

    def alive(self) -> bool:
        return all(p is not None and p.proc.poll() is None for p in (self.server, self.bridge))

    def close(self) -> None:
        for p in (self.bridge, self.server):
            if p is not None:
                p.stop()

    @property
    def url(self) -> str:  # the bridge, e.g. http://127.0.0.1:PORT (no trailing slash)
        return self.bridge.url

    def stop_backend(self) -> None:
        self.server.stop()

    def stop_bridge(self) -> None:
        self.bridge.stop()

    def requests_running(self) -> float:
        """The model server's glmserve_requests_running gauge."""
        return self.server.metrics()["glmserve_requests_running"]


def routed_model(url: str) -> str:
    """The model id, once the bridge routes calls: it answers at once, but routes only once
    its health check has seen the backend SERVING."""
    models = f"{url}/v1/models"
    wait_until(lambda: httpx.get(models, timeout=10).status_code == 200, 30, "bridge routing")
    return httpx.get(models, timeout=10).json()["data"][0]["id"]


@pytest.fixture(scope="module")
def hostile_model_dir(tmp_path_factory: pytest.TempPathFactory, smollm_tokenizer: Path) -> Path:
    from tiny_models import make_scripted_llama

    out = tmp_path_factory.mktemp("ui-model") / "hostile-llama"
    return make_scripted_llama(out, smollm_tokenizer, HOSTILE_REPLY)


@pytest.fixture(scope="module")
def _shared_stack(hostile_model_dir: Path) -> Iterator[Stack]:
    s = Stack(hostile_model_dir)
    try:
        s.start()
        yield s
    finally:
        s.close()


@pytest.fixture
def stack(_shared_stack: Stack) -> Stack:
    """The module's model server + bridge; restarted if an earlier test stopped them."""
    if not _shared_stack.alive():
        _shared_stack.close()
        _shared_stack.start()
    return _shared_stack


@contextmanager
def no_ui_bridge(s: Stack) -> Iterator[str]:
    with start_bridge("--backend", s.server.target, "--no-ui", "--drain-seconds", "1") as bridge:
        yield bridge.url


# --- stack end
# ====================================================================== browser


# Per module: playwright's sync API holds an event loop on this thread until it stops, and
# asyncio.run() refuses to start under it (a session-wide browser broke every later test).
@pytest.fixture(scope="module")
def chromium() -> Iterator[Any]:
    if not Path(CHROMIUM).exists():
        pytest.skip(f"{CHROMIUM} missing: apt-get install -y chromium")
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


@dataclass
class UI:
    """A fresh browser context (empty localStorage) on the chat page, plus helpers."""

    page: Any
    url: str
    errors: list[str] = field(default_factory=list)
    requests: list[dict] = field(default_factory=list)

    # -- locators
    def tid(self, testid: str) -> Any:
        return self.page.get_by_test_id(testid)

    @property
    def prompt(self) -> Any:
        return self.tid("prompt-input")

    def messages(self, role: str | None = None) -> Any:
        sel = "[data-testid=message]" + (f"[data-role={role}]" if role else "")
        return self.page.locator(sel)

    def conversations(self) -> Any:
        return self.tid("conversation-item")

    # -- actions
    def goto(self) -> None:
        self.page.goto(self.url + "/")
        expect(self.tid("app")).to_have_attribute("data-ready", "true")

    def type_and_send(self, text: str) -> None:
        self.prompt.click()
        self.page.keyboard.insert_text(text)  # what an IME commit does: works for any script
        self.page.keyboard.press("Enter")

    def wait_replies(self, count: int, timeout: float = 30_000) -> None:
        """Waits until `count` assistant messages exist and none is streaming."""
        self.page.wait_for_function(
            """n => document.querySelectorAll('[data-testid=message][data-role=assistant]')
                       .length === n
                   && !document.querySelector('[data-testid=message][data-streaming=true]')""",
            arg=count,
            timeout=timeout,
        )

    def stored_conversations(self) -> list[dict]:
        raw = self.page.evaluate(f"localStorage.getItem({json.dumps(CONVERSATIONS_KEY)})")
        return json.loads(raw) if raw else []

    def open_settings(self) -> None:
        self.tid("open-settings").click()
        expect(self.tid("settings-dialog")).to_be_visible()

    def save_settings(self) -> None:
        self.tid("settings-save").click()
        expect(self.tid("settings-dialog")).to_be_hidden()

    def shot(self, name: str) -> None:
        """An extra screenshot of an intermediate state (the final one is taken anyway)."""
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        self.page.screenshot(
            path=str(ARTIFACTS / f"ui-{name}.png"), full_page=True, animations="disabled"
        )

    def wait_flag_unset(self, ms: int = 400) -> None:
        """Gives event handlers time to run, then checks none of the payloads ever ran."""
        self.page.wait_for_timeout(ms)
        assert self.page.evaluate("window.__pwned") is None, "injected script ran"


@pytest.fixture
def make_ui(chromium: Any, request: pytest.FixtureRequest) -> Iterator[Callable[..., UI]]:
    """make_ui(url, **context_options) → UI; screenshots and page errors are checked at the end."""
    made: list[tuple[Any, UI]] = []

    def make(url: str, max_tokens: int | None = DEFAULT_MAX_TOKENS, **options: Any) -> UI:
        options.setdefault("viewport", {"width": 1280, "height": 800})
        options.setdefault("locale", "zh-CN")
        ctx = chromium.new_context(**options)
        ctx.set_default_timeout(15_000)
        if max_tokens is not None:
            # Seed settings once (not on reload) so replies stay short.
            seed = json.dumps({"maxTokens": str(max_tokens)})
            ctx.add_init_script(
                f"if (localStorage.getItem({json.dumps(SETTINGS_KEY)}) === null)"
                f" localStorage.setItem({json.dumps(SETTINGS_KEY)}, {json.dumps(seed)});"
            )
        page = ctx.new_page()
        ui = UI(page=page, url=url)
        page.on("pageerror", lambda exc: ui.errors.append(str(exc)))
        page.on(
            "request",
            lambda req: (
                ui.requests.append(
                    {
                        "url": req.url,
                        "method": req.method,
                        "headers": req.headers,
                        "body": req.post_data,
                    }
                )
                if "/v1/" in req.url
                else None
            ),
        )
        made.append((ctx, ui))
        return ui

    yield make

    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    name = re.sub(r"[^\w.-]+", "_", request.node.name)
    problems = []
    for i, (ctx, ui) in enumerate(made):
        try:
            suffix = f"-{i}" if i else ""
            ui.page.screenshot(
                path=str(ARTIFACTS / f"ui-{name}{suffix}.png"),
                full_page=True,
                animations="disabled",
            )
        except Exception:  # noqa: BLE001 - a screenshot must never hide the test's own result
            pass
        problems += ui.errors
        ctx.close()
    assert not problems, f"uncaught errors in the page: {problems}"


def sse(*chunks: dict | str) -> str:
    """An OpenAI-style event stream body."""
    out = []
    for c in chunks:
        out.append(f"data: {c if isinstance(c, str) else json.dumps(c, ensure_ascii=False)}\n\n")
    return "".join(out)


def delta(text: str, finish: str | None = None) -> dict:
    return {
        "id": "chatcmpl-test",
        "object": "chat.completion.chunk",
        "created": 0,
        "model": "routed",
        "choices": [
            {"index": 0, "delta": {"content": text} if text else {}, "finish_reason": finish}
        ],
    }


# ====================================================================== tests


# Long enough that the reply spans many animation frames even on a fast machine (16 tokens of
# the tiny model can arrive within one frame, and the page renders at most once per frame).
STREAM_TOKENS = 160


def test_send_message_streams_the_reply(stack: Stack, make_ui: Callable[..., UI]) -> None:
    ui = make_ui(
        stack.url, max_tokens=STREAM_TOKENS, permissions=["clipboard-read", "clipboard-write"]
    )
    ui.goto()
    expect(ui.tid("model-select")).to_have_value(stack.model)
    expect(ui.tid("empty-state")).to_be_visible()

    # Record what the assistant bubble shows while it streams.
    ui.page.evaluate(
        """() => {
          window.__snapshots = [];
          new MutationObserver(() => {
            const m = document.querySelector(
              '[data-testid=message][data-streaming=true] [data-testid=message-content]');
            if (m) window.__snapshots.push(m.textContent.length);
          }).observe(document.getElementById('message-list'),
                     {subtree: true, childList: true, characterData: true});
        }"""
    )
    text = "你好，请用中文介绍一下你自己。Hello 👋"
    ui.type_and_send(text)

    user = ui.messages("user")
    expect(user).to_have_count(1)
    expect(user.get_by_test_id("message-content")).to_have_text(text)
    expect(user.get_by_test_id("message-content")).to_have_attribute("lang", "zh")
    ui.wait_replies(1)

    snapshots = ui.page.evaluate("window.__snapshots")
    partial = sorted({n for n in snapshots if n > 0})
    assert len(partial) >= 2, f"reply did not arrive incrementally: {snapshots}"

    stored = ui.stored_conversations()
    assert len(stored) == 1
    assert [m["role"] for m in stored[0]["messages"]] == ["user", "assistant"]
    reply = stored[0]["messages"][1]["content"]
    assert reply.strip(), "empty reply"
    assert stored[0]["messages"][0]["content"] == text

    body = json.loads(ui.requests[-1]["body"])
    assert (
        body["stream"] is True
        and body["model"] == stack.model
        and body["max_tokens"] == STREAM_TOKENS
    )
    assert body["messages"] == [{"role": "user", "content": text}]

    expect(ui.conversations()).to_have_count(1)
    expect(ui.tid("conversation-title")).to_have_text(text)

    # Copy puts the raw message text on the clipboard.
    ui.messages("assistant").get_by_test_id("copy-message").click()
    expect(ui.tid("toast")).to_have_text("Copied to clipboard")
    assert ui.page.evaluate("navigator.clipboard.readText()") == reply

    # Regenerate replaces the last answer with a new one (a second request, same history).
    posts = sum(r["method"] == "POST" for r in ui.requests)
    ui.messages("assistant").get_by_test_id("regenerate").click()
    ui.wait_replies(1)
    assert sum(r["method"] == "POST" for r in ui.requests) == posts + 1
    assert json.loads(ui.requests[-1]["body"])["messages"] == [{"role": "user", "content": text}]
    assert len(ui.stored_conversations()[0]["messages"]) == 2


def test_stop_mid_stream_ends_generation_on_the_server(
    stack: Stack, make_ui: Callable[..., UI]
) -> None:
    ui = make_ui(stack.url, max_tokens=None)
    ui.goto()
    # Settings through the dialog: a long reply, so that there is something to stop.
    ui.open_settings()
    ui.tid("settings-max-tokens").fill("400")  # the model's context is 512 tokens
    ui.tid("settings-temperature").fill("0.9")
    ui.save_settings()

    assert stack.requests_running() == 0
    ui.type_and_send("Write a very long story.")
    expect(ui.tid("stop-button")).to_be_visible()
    expect(ui.tid("send-button")).to_be_hidden()
    streaming = ui.page.locator(
        "[data-testid=message][data-streaming=true] [data-testid=message-content]"
    )
    expect(streaming).not_to_have_text("")
    wait_until(lambda: stack.requests_running() >= 1, 10, "the request running on the server")

    ui.tid("stop-button").click()
    ui.wait_replies(1)
    expect(ui.tid("stop-button")).to_be_hidden()
    expect(ui.tid("send-button")).to_be_visible()
    expect(ui.messages("assistant").get_by_test_id("message-note")).to_have_text("Stopped.")

    wait_until(lambda: stack.requests_running() == 0, 10, "glmserve_requests_running at 0")

    body = json.loads(ui.requests[-1]["body"])
    assert body["max_tokens"] == 400 and body["temperature"] == 0.9
    stored = ui.stored_conversations()[0]["messages"][1]
    assert stored.get("stopped") is True and stored["content"]
    assert stored.get("finish") is None  # stopped before the server said why it ended


def test_history_survives_a_reload(stack: Stack, make_ui: Callable[..., UI]) -> None:
    ui = make_ui(stack.url)
    ui.goto()
    ui.type_and_send("First question")
    ui.wait_replies(1)
    ui.type_and_send("第二个问题")
    ui.wait_replies(2)

    # Multi-turn: the second request carries the whole conversation.
    body = json.loads(ui.requests[-1]["body"])
    assert [m["role"] for m in body["messages"]] == ["user", "assistant", "user"]
    assert body["messages"][2]["content"] == "第二个问题"
    before = [t.strip() for t in ui.page.get_by_test_id("message-content").all_inner_texts()]

    ui.page.reload()
    expect(ui.tid("app")).to_have_attribute("data-ready", "true")
    expect(ui.messages()).to_have_count(4)
    after = [t.strip() for t in ui.page.get_by_test_id("message-content").all_inner_texts()]
    assert after == before
    expect(ui.conversations()).to_have_count(1)
    expect(ui.tid("conversation-title")).to_have_text("First question")


def test_switch_rename_and_delete_conversations(stack: Stack, make_ui: Callable[..., UI]) -> None:
    ui = make_ui(stack.url)
    ui.goto()
    ui.type_and_send("alpha topic")
    ui.wait_replies(1)
    ui.tid("new-chat").click()
    expect(ui.tid("empty-state")).to_be_visible()
    expect(ui.messages()).to_have_count(0)
    ui.type_and_send("beta topic")
    ui.wait_replies(1)

    items = ui.conversations()
    expect(items).to_have_count(2)
    expect(items.nth(0)).to_have_attribute("aria-current", "true")  # newest first
    expect(items.nth(0)).to_contain_text("beta topic")

    # Switch back to the first conversation.
    ui.conversations().filter(has_text="alpha topic").get_by_test_id("conversation-open").click()
    expect(ui.messages("user").get_by_test_id("message-content")).to_have_text("alpha topic")
    expect(ui.tid("conversation-title")).to_have_text("alpha topic")
    # A reply in it goes to the same history.
    ui.type_and_send("more on alpha")
    ui.wait_replies(2)
    body = json.loads(ui.requests[-1]["body"])
    assert [m["content"] for m in body["messages"] if m["role"] == "user"] == [
        "alpha topic",
        "more on alpha",
    ]

    # Rename (Enter commits; the name is kept across a reload).
    item = ui.conversations().filter(has_text="alpha topic")
    item.get_by_test_id("rename-conversation").click()
    ui.tid("rename-input").fill("项目 Alpha")
    ui.tid("rename-input").press("Enter")
    expect(ui.tid("conversation-title")).to_have_text("项目 Alpha")
    ui.page.reload()
    expect(ui.conversations().filter(has_text="项目 Alpha")).to_have_count(1)
    expect(ui.tid("conversation-title")).to_have_text("项目 Alpha")

    # Delete the other one (after confirming).
    beta = ui.conversations().filter(has_text="beta topic")
    beta.get_by_test_id("delete-conversation").click()
    ui.tid("confirm-cancel").click()
    expect(ui.conversations()).to_have_count(2)
    beta.get_by_test_id("delete-conversation").click()
    expect(ui.tid("confirm-dialog")).to_contain_text("beta topic")
    ui.tid("confirm-ok").click()
    expect(ui.conversations()).to_have_count(1)
    assert [c["title"] for c in ui.stored_conversations()] == ["项目 Alpha"]


HOSTILE_USER = (
    "<script>window.__pwned='script'</script>"
    "<img src=x onerror=\"window.__pwned='img'\">"
    "<svg onload=\"window.__pwned='svg'\"></svg>"
    " **not bold** [link](javascript:window.__pwned='link')"
)


def test_user_message_with_html_is_shown_as_text(stack: Stack, make_ui: Callable[..., UI]) -> None:
    # bypass_csp: the page's Content-Security-Policy would stop inline handlers anyway; the test
    # is about the page never creating such elements in the first place.
    ui = make_ui(stack.url, bypass_csp=True)
    ui.goto()
    ui.type_and_send(HOSTILE_USER)
    ui.wait_replies(1)

    def check() -> None:
        bubble = ui.messages("user").get_by_test_id("message-content")
        expect(bubble).to_have_text(HOSTILE_USER)
        assert bubble.evaluate("el => el.children.length") == 0  # text only, no elements
        for sel in (
            "script",
            "img",
            "svg",
            "iframe",
            "[onerror]",
            "[onload]",
            "a[href^=javascript]",
        ):
            for where in ("message-content", "conversation-open", "conversation-title"):
                assert ui.page.locator(f"[data-testid={where}] {sel}").count() == 0, (where, sel)
        assert ui.page.locator("#message-list script, #message-list img").count() == 0
        expect(ui.tid("conversation-title")).to_contain_text("<script>")
        ui.wait_flag_unset()

    check()
    ui.page.reload()  # rendered again, this time from localStorage
    expect(ui.tid("app")).to_have_attribute("data-ready", "true")
    check()


HOSTILE_MARKDOWN = [
    "<script>window.__pwned='script'</script>",
    "<img src=x onerror=\"window.__pwned='img'\">",
    "text <img src=x onerror=window.__pwned='img2'> more",
    "**<img src=x onerror=\"window.__pwned='bold'\">**",
    "<svg><script>window.__pwned='svg'</script></svg>",
    "<iframe srcdoc=\"<script>parent.__pwned='iframe'</script>\"></iframe>",
    "<a href=\"javascript:window.__pwned='a'\">click</a>",
    "[click](javascript:window.__pwned='md-link')",
    "[click](JaVaScRiPt:window.__pwned='md-link2')",
    "[click]( javascript:window.__pwned='md-link3' )",
    "[data](data:text/html,<script>window.__pwned='data'</script>)",
    "![img](x\" onerror=\"window.__pwned='img-md')",
    "![img](javascript:window.__pwned='img-js')",
    "<javascript:window.__pwned='auto'>",
    "```html\n</code></pre><script>window.__pwned='fence'</script>\n```",
    "```\" onmouseover=\"window.__pwned='lang'\n<b>x</b>\n```",
    "| <img src=x onerror=\"window.__pwned='table'\"> | b |\n|---|---|\n| <script>1</script> | c |",
    "> <img src=x onerror=\"window.__pwned='quote'\">",
    "- <details open ontoggle=\"window.__pwned='list'\">",
    "`<img src=x onerror=\"window.__pwned='code'\">`",
    "&lt;img src=x onerror=\"window.__pwned='entity'\"&gt; &#60;script&#62;",
    "<style>body{display:none}</style><link rel=stylesheet href=//evil>",
    "[" * 300 + "x" + "](" * 300,  # pathological nesting must not hang or throw
    ">" * 400 + " deep",
]
ALLOWED_TAGS = {
    "DIV", "P", "BR", "STRONG", "EM", "DEL", "CODE", "PRE", "SPAN", "BUTTON", "A", "UL", "OL",
    "LI", "BLOCKQUOTE", "HR", "H1", "H2", "H3", "H4", "H5", "H6", "TABLE", "THEAD", "TBODY", "TR",
    "TH", "TD", "INPUT",
}  # fmt: skip


def test_markdown_renderer_neutralises_hostile_input(
    stack: Stack, make_ui: Callable[..., UI]
) -> None:
    ui = make_ui(stack.url, bypass_csp=True)
    ui.goto()
    result = ui.page.evaluate(
        """async (cases) => {
          const md = await import(new URL('static/markdown.js', location.href).href);
          const host = document.createElement('div');
          host.id = 'renderer-test';
          host.className = 'md';
          document.body.appendChild(host);
          const out = [];
          for (const src of cases) {
            const t0 = performance.now();
            const el = md.renderToElement(src);
            const ms = performance.now() - t0;
            host.appendChild(el);  // live in the document, so any <img>/<script> would act
            const all = [...el.querySelectorAll('*')];
            out.push({
              src, ms,
              text: el.textContent,
              tags: [...new Set(all.map(n => n.tagName))],
              attrs: [...new Set(all.flatMap(n => [...n.attributes].map(a => a.name)))],
              hrefs: [...el.querySelectorAll('a')].map(a => a.getAttribute('href')),
            });
          }
          return out;
        }""",
        HOSTILE_MARKDOWN,
    )
    ui.wait_flag_unset(500)
    for r in result:
        assert set(r["tags"]) <= ALLOWED_TAGS, r
        assert not [
            a for a in r["attrs"] if a.startswith("on") or a in ("src", "srcdoc", "style")
        ], r
        for href in r["hrefs"]:
            assert re.match(r"^(https?|mailto):", href), r
        assert r["ms"] < 500, r
    by_src = {r["src"]: r for r in result}
    assert "<script>window.__pwned='script'</script>" in by_src[HOSTILE_MARKDOWN[0]]["text"]
    assert "onerror" in by_src[HOSTILE_MARKDOWN[1]]["text"]
    assert by_src["[click](javascript:window.__pwned='md-link')"]["hrefs"] == []
    assert "<script>" in by_src[HOSTILE_MARKDOWN[14]]["text"]
    # The only input-carrying attribute besides href is a sanitised language class.
    assert (
        ui.page.locator("#renderer-test code[class*='\"'], #renderer-test [class*=' on']").count()
        == 0
    )

    # Ordinary Markdown still renders as Markdown.
    good = ui.page.evaluate(
        """async (src) => {
          const md = await import(new URL('static/markdown.js', location.href).href);
          const el = md.renderToElement(src);
          return {
            h2: el.querySelector('h2')?.textContent,
            strong: el.querySelector('strong')?.textContent,
            em: el.querySelector('em')?.textContent,
            inline: el.querySelector('p code')?.textContent,
            lang: el.querySelector('pre code')?.className,
            code: el.querySelector('pre code')?.textContent,
            items: [...el.querySelectorAll(':scope > ul > li')]
                     .map(li => li.firstChild.textContent),
            nested: el.querySelector('ul li ul li')?.textContent,
            ol: el.querySelector('ol')?.start,
            cells: [...el.querySelectorAll('td')].map(td => td.textContent),
            link: el.querySelector('a')?.href,
            quote: el.querySelector('blockquote')?.textContent.trim(),
          };
        }""",
        "## 标题 Title\n\nSome **bold** and *it* and `x < y`.\n\n- one\n- two\n  - nested\n\n"
        "3. three\n4. four\n\n```python\nif a < b:\n    print('<ok>')\n```\n\n"
        "| k | v |\n|---|--:|\n| a | 1 |\n\n> 引用\n\nSee https://example.com/a_(b).",
    )
    assert good == {
        "h2": "标题 Title",
        "strong": "bold",
        "em": "it",
        "inline": "x < y",
        "lang": "language-python",
        "code": "if a < b:\n    print('<ok>')",
        "items": ["one", "two"],
        "nested": "nested",
        "ol": 3,
        "cells": ["a", "1"],
        "link": "https://example.com/a_(b)",
        "quote": "引用",
    }


def test_sse_parser_and_utf8_decoding(stack: Stack, make_ui: Callable[..., UI]) -> None:
    """api.js's SSE parser: any chunking, CRLF/CR/LF, multi-line data, comments, split UTF-8."""
    ui = make_ui(stack.url)
    ui.goto()
    result = ui.page.evaluate(
        """async () => {
          const api = await import(new URL('static/api.js', location.href).href);
          const text = ': keep-alive\\r\\ndata: {"a":"你好"}\\r\\n\\r\\nevent: x\\ndata: l1\\n'
                     + 'data: l2\\n\\ndata: [DONE]\\r\\rdata: tail';
          const bytes = new TextEncoder().encode(text);
          const runs = [];
          for (const size of [1, 2, 3, 5, 7, bytes.length]) {
            const p = new api.SSEParser();
            const d = new TextDecoder('utf-8');
            const out = [];
            for (let i = 0; i < bytes.length; i += size) {
              out.push(...p.push(d.decode(bytes.subarray(i, i + size), {stream: true})));
            }
            out.push(...p.push(d.decode()), ...p.end());
            runs.push(out);
          }
          return runs;
        }"""
    )
    expected = ['{"a":"你好"}', "l1\nl2", "[DONE]", "tail"]
    assert all(run == expected for run in result), result


def test_hostile_assistant_reply_renders_as_text(stack: Stack, make_ui: Callable[..., UI]) -> None:
    """The real model, decoding greedily, replies with HOSTILE_REPLY (<img onerror>, <script>)."""
    ui = make_ui(stack.url, max_tokens=64, bypass_csp=True)
    ui.goto()
    ui.open_settings()
    ui.tid("settings-temperature").fill("0")  # greedy: the scripted reply
    ui.save_settings()
    ui.page.evaluate("window.__pwned = (n) => { window.__hit = n; }")
    ui.type_and_send("Say something nasty")
    ui.wait_replies(1)

    stored = ui.stored_conversations()[0]["messages"][1]["content"]
    assert stored == HOSTILE_REPLY
    content = ui.messages("assistant").get_by_test_id("message-content")
    expect(content).to_have_text("Hi <img src onerror=__pwned(1)><script>alert[2] 中文 ok")
    expect(content.locator("strong")).to_have_text("ok")  # Markdown still works
    expect(content).to_have_attribute("lang", "zh")
    for sel in ("script", "img", "[onerror]", "a", "svg", "iframe"):
        assert content.locator(sel).count() == 0, sel
    ui.page.wait_for_timeout(300)
    assert ui.page.evaluate("window.__hit") is None, "the model's markup ran"


def test_error_messages_for_auth_overload_and_broken_streams(
    stack: Stack, make_ui: Callable[..., UI]
) -> None:
    """401, 429 and an error chunk mid-stream, as the bridge would send them."""
    ui = make_ui(stack.url)
    ui.goto()
    responses: list[dict] = []

    def fulfil(route: Any) -> None:
        route.fulfill(**responses.pop(0))

    ui.page.route("**/v1/chat/completions", fulfil)

    def error(status: int, message: str, type_: str, code: str) -> dict:
        body = {"error": {"message": message, "type": type_, "param": None, "code": code}}
        return {"status": status, "content_type": "application/json", "body": json.dumps(body)}

    banner = ui.tid("error-banner")
    responses.append(
        error(401, "Incorrect API key provided.", "invalid_request_error", "invalid_api_key")
    )
    ui.type_and_send("hello")
    expect(banner).to_have_attribute("data-kind", "auth")
    expect(ui.tid("error-text")).to_contain_text("API key")
    expect(ui.tid("error-detail")).to_contain_text("Incorrect API key provided.")
    ui.tid("error-action").click()  # "Open settings", with the key field focused
    expect(ui.tid("settings-dialog")).to_be_visible()
    expect(ui.tid("settings-api-key")).to_be_focused()
    ui.tid("settings-cancel").click()

    responses.append(error(429, "The server is busy.", "rate_limit_error", "rate_limit_exceeded"))
    ui.messages("user").get_by_test_id("regenerate").click()
    expect(banner).to_have_attribute("data-kind", "overloaded")
    expect(ui.tid("error-text")).to_contain_text("overloaded")

    err_chunk = {"error": {"message": "backend went away", "type": "server_error", "param": None,
                           "code": "backend_unavailable"}}  # fmt: skip
    responses.append(
        {
            "status": 200,
            "content_type": "text/event-stream",
            "body": sse(delta("Partial answer"), err_chunk),
        }  # fmt: skip
    )
    ui.tid("error-action").click()  # Retry
    expect(banner).to_have_attribute("data-kind", "unavailable")
    expect(ui.messages("assistant").get_by_test_id("message-content")).to_have_text(
        "Partial answer"
    )
    expect(ui.messages("assistant").get_by_test_id("message-note")).to_contain_text(
        "backend went away"
    )

    # A stream that just stops (no [DONE]) is reported, not silently accepted.
    responses.append(
        {"status": 200, "content_type": "text/event-stream", "body": sse(delta("Cut"))}
    )
    ui.messages("assistant").get_by_test_id("regenerate").click()
    expect(banner).to_have_attribute("data-kind", "interrupted")
    expect(ui.messages("assistant").get_by_test_id("message-content")).to_have_text("Cut")


def test_phone_width_and_keyboard(stack: Stack, make_ui: Callable[..., UI]) -> None:
    ui = make_ui(stack.url, viewport={"width": 390, "height": 844}, is_mobile=True, has_touch=True)
    ui.goto()
    sidebar = ui.tid("sidebar")
    expect(sidebar).not_to_be_in_viewport()  # collapsed off-canvas at phone width
    ui.tid("toggle-sidebar").click()
    expect(sidebar).to_be_in_viewport()
    expect(ui.tid("new-chat")).to_be_visible()
    ui.page.keyboard.press("Escape")
    expect(sidebar).not_to_be_in_viewport()

    # Shift+Enter is a new line; Enter during an IME composition picks a candidate.
    ui.prompt.click()
    ui.page.keyboard.insert_text("line one")
    ui.page.keyboard.press("Shift+Enter")
    ui.page.keyboard.insert_text("line two ")
    cdp = ui.page.context.new_cdp_session(ui.page)
    cdp.send("Input.imeSetComposition", {"text": "ni", "selectionStart": 2, "selectionEnd": 2})
    ui.page.keyboard.press("Enter")
    # The same for browsers that only report keyCode 229 or isComposing on the event.
    ui.prompt.evaluate(
        """el => {
          const a = new KeyboardEvent('keydown',
              {key: 'Enter', bubbles: true, cancelable: true, isComposing: true});
          el.dispatchEvent(a);
          const b = new KeyboardEvent('keydown', {key: 'Enter', bubbles: true, cancelable: true});
          Object.defineProperty(b, 'keyCode', {value: 229});
          el.dispatchEvent(b);
        }"""
    )
    cdp.send("Input.insertText", {"text": "你好"})  # commits the composition
    ui.page.wait_for_timeout(100)
    expect(ui.messages()).to_have_count(0)
    assert ui.prompt.input_value().startswith("line one\nline two ")
    # (CDP lets that Enter through to the textarea as a newline; a real IME swallows it.)
    assert "你好" in ui.prompt.input_value()

    ui.page.keyboard.press("Enter")
    ui.wait_replies(1)
    bubble = ui.messages("user").get_by_test_id("message-content")
    assert bubble.inner_text().startswith("line one\nline two ")
    expect(ui.prompt).to_have_value("")

    # Nothing overflows sideways at phone width.
    assert ui.page.evaluate("document.documentElement.scrollWidth <= window.innerWidth")
    ui.tid("toggle-sidebar").click()
    expect(ui.conversations()).to_have_count(1)
    ui.shot("phone-drawer-open")
    ui.tid("conversation-open").click()  # choosing a conversation closes the drawer
    expect(sidebar).not_to_be_in_viewport()


def test_page_is_served_with_the_right_types(stack: Stack) -> None:
    index = httpx.get(stack.url + "/")
    assert index.status_code == 200
    assert index.headers["content-type"].startswith("text/html")
    assert 'charset="utf-8"' in index.text or "charset=utf-8" in index.headers["content-type"]
    for name in ("app.js", "api.js", "markdown.js", "store.js"):
        r = httpx.get(f"{stack.url}/static/{name}")
        assert r.status_code == 200, name
        # Module scripts are refused unless served with a JavaScript MIME type.
        assert re.match(r"(text|application)/javascript", r.headers["content-type"]), name
    assert httpx.get(stack.url + "/static/style.css").headers["content-type"].startswith("text/css")


def test_no_ui_flag_serves_no_page(stack: Stack) -> None:
    with no_ui_bridge(stack) as url:
        assert httpx.get(url + "/").status_code == 404
        assert httpx.get(url + "/static/app.js").status_code == 404
        assert httpx.get(url + "/v1/models").status_code == 200


def test_api_key_from_settings(stack: Stack, make_ui: Callable[..., UI]) -> None:
    """A bridge that requires a key: the page says so, and works once the key is in Settings."""
    key = "sk-ui-test-Zm9v"
    with start_bridge(
        "--backend", stack.server.target, "--drain-seconds", "1", env={"GLMSERVE_API_KEYS": key}
    ) as bridge:
        ui = make_ui(bridge.url)
        ui.goto()
        banner = ui.tid("error-banner")
        expect(banner).to_have_attribute("data-kind", "auth")  # from GET /v1/models
        expect(ui.tid("error-text")).to_contain_text("API key")
        expect(ui.tid("model-select")).to_be_disabled()

        ui.tid("error-action").click()
        expect(ui.tid("settings-api-key")).to_be_focused()
        ui.tid("settings-api-key").fill(key)
        ui.save_settings()
        expect(banner).to_be_hidden()
        expect(ui.tid("model-select")).to_have_value(stack.model)

        ui.type_and_send("hello with a key")
        ui.wait_replies(1)
        post = [r for r in ui.requests if r["method"] == "POST"][-1]
        assert post["headers"]["authorization"] == f"Bearer {key}"

        ui.page.reload()  # the key is remembered in this browser
        expect(ui.tid("app")).to_have_attribute("data-ready", "true")
        expect(ui.tid("model-select")).to_have_value(stack.model)
        expect(banner).to_be_hidden()


def test_error_banner_when_the_backend_is_down(stack: Stack, make_ui: Callable[..., UI]) -> None:
    # Runs last: it stops the shared processes (a later test would get fresh ones).
    ui = make_ui(stack.url)
    ui.goto()
    expect(ui.tid("model-select")).to_have_value(stack.model)
    expect(ui.tid("error-banner")).to_be_hidden()

    stack.stop_backend()
    ui.type_and_send("Are you there?")
    banner = ui.tid("error-banner")
    expect(banner).to_be_visible(timeout=20_000)
    expect(banner).to_have_attribute("data-kind", "unavailable")
    expect(banner).to_have_attribute("data-status", "503")
    expect(ui.tid("error-text")).to_contain_text("unavailable")
    expect(ui.tid("error-action")).to_have_text("Retry")
    # The question is kept, no empty answer is left behind, and the composer is usable again.
    expect(ui.messages("user")).to_have_count(1)
    expect(ui.messages("assistant")).to_have_count(0)
    expect(ui.tid("send-button")).to_be_visible()
    ui.shot("backend-down-503")

    # With the bridge gone too, Retry reports a network error instead.
    stack.stop_bridge()
    ui.tid("error-action").click()
    expect(banner).to_have_attribute("data-kind", "network")
    expect(ui.tid("error-text")).to_contain_text("Cannot reach the server")


def test_default_model_multi_turn_stop_and_reload(make_ui: Callable[..., UI]) -> None:
    """What a person does after `make serve`: chat with the embedded default model over several
    turns, stop an answer, reload, and find the conversation intact."""
    server = spawn_model_server("smollm2-135m-instruct", timeout=300)
    bridge = spawn_bridge("--backend", server.target, "--drain-seconds", "1")
    stack = Stack(Path("smollm2-135m-instruct"))
    stack.server, stack.bridge = server, bridge
    try:
        routed_model(bridge.url)
        ui = make_ui(bridge.url, max_tokens=None)
        ui.goto()
        expect(ui.tid("model-select")).to_have_value("smollm2-135m-instruct")
        ui.open_settings()
        ui.tid("settings-temperature").fill("0")
        ui.tid("settings-max-tokens").fill("24")
        ui.save_settings()

        ui.type_and_send("What is the capital of France?")
        ui.wait_replies(1, timeout=60_000)
        expect(ui.messages("assistant").nth(0)).to_contain_text("Paris")
        ui.type_and_send("And what is the capital of Germany?")
        ui.wait_replies(2, timeout=60_000)
        body = json.loads(ui.requests[-1]["body"])
        assert [m["role"] for m in body["messages"]] == ["user", "assistant", "user"]
        assert "Paris" in body["messages"][1]["content"]

        ui.open_settings()
        ui.tid("settings-max-tokens").fill("1000")
        ui.save_settings()
        ui.type_and_send("Write a very long story about a dragon who learns to bake bread.")
        streaming = ui.page.locator(
            "[data-testid=message][data-streaming=true] [data-testid=message-content]"
        )
        expect(streaming).not_to_have_text("", timeout=60_000)
        ui.tid("stop-button").click()
        ui.wait_replies(3)
        expect(ui.messages("assistant").nth(2).get_by_test_id("message-note")).to_have_text(
            "Stopped."
        )
        wait_until(lambda: stack.requests_running() == 0, 10, "generation ended after Stop")
        before = [t.strip() for t in ui.page.get_by_test_id("message-content").all_inner_texts()]

        ui.page.reload()
        expect(ui.tid("app")).to_have_attribute("data-ready", "true")
        expect(ui.messages()).to_have_count(6)
        after = [t.strip() for t in ui.page.get_by_test_id("message-content").all_inner_texts()]
        assert after == before
        expect(ui.messages("assistant").nth(0)).to_contain_text("Paris")
    finally:
        bridge.stop()
        server.stop()
