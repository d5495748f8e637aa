"""A person in a real browser (Debian chromium driven by Playwright) plays a battle on /arena."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from tests.arena.conftest import MODEL_NAMES

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"

pytestmark = pytest.mark.skipif(
    not Path(CHROMIUM).exists(), reason="Debian chromium is not installed (make test installs it)"
)
sync_api = pytest.importorskip(
    "playwright.sync_api", reason="playwright is not installed (pip install -e '.[dev]')"
)
expect = sync_api.expect
# A vote's first langid call loads its model (over 10 s on a busy runner): wait like the actions do.
expect.set_options(timeout=60_000)


@pytest.fixture
def page(tmp_path: Path):
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(
            executable_path=CHROMIUM,
            args=["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"],
        )
        try:
            context = browser.new_context()
            page = context.new_page()
            page.set_default_timeout(60_000)
            errors: list[str] = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            # the page's Content-Security-Policy must not block anything the page itself does
            page.on(
                "console",
                lambda m: errors.append(m.text) if "Content Security Policy" in m.text else None,
            )
            yield page
            assert errors == [], f"JavaScript errors on the page: {errors}"
        finally:
            browser.close()


def ask(page, prompt: str) -> None:
    page.fill("#prompt", prompt)
    page.click("#send")
    expect(page.locator("#vote-leftvote")).to_be_enabled()


def test_anonymous_battle_in_chromium(start_arena, page, tmp_path: Path) -> None:
    with start_arena() as arena:
        page.goto(f"{arena.url}/arena")
        expect(page.locator("h1")).to_contain_text("Chatbot Arena")
        for button in ("leftvote", "rightvote", "tievote", "bothbad_vote"):
            expect(page.locator(f"#vote-{button}")).to_be_disabled()  # nothing to judge yet
        expect(page.locator("#pickers")).to_be_hidden()
        expect(page.locator("#name-a")).to_have_text("")

        ask(page, "What is the capital of France?")
        for side in "ab":
            answers = page.locator(f"#messages-{side} .msg.assistant")
            expect(answers).to_have_count(1)
            expect(answers.first).to_have_attribute("data-finished", "true")
            expect(page.locator(f"#messages-{side} .msg.user")).to_have_text(
                ["What is the capital of France?"]
            )
        expect(page.locator("#name-a")).to_have_text("")  # still anonymous

        page.locator("#prompt").fill("And of Italy?")
        page.locator("#prompt").press("Enter")  # Enter sends too
        expect(page.locator("#messages-a .msg.assistant")).to_have_count(2)
        expect(page.locator("#messages-b .msg.assistant")).to_have_count(2)
        expect(page.locator("#vote-leftvote")).to_be_enabled()
        shown_a = page.locator("#messages-a .msg.assistant").all_text_contents()

        page.click("#vote-leftvote")
        expect(page.locator("#new-round")).to_be_visible()
        name_a = page.locator("#name-a").inner_text().removeprefix("· ")
        name_b = page.locator("#name-b").inner_text().removeprefix("· ")
        assert {name_a, name_b} == set(MODEL_NAMES)
        expect(page.locator("#status")).to_contain_text("Thanks for your vote")
        expect(page.locator("#vote-tievote")).to_be_disabled()
        expect(page.locator("#send")).to_be_disabled()
        page.screenshot(path=str(tmp_path / "arena.png"), full_page=True)  # kept for a look

        (row,) = arena.votes()
        assert (row["model_a"], row["model_b"]) == (name_a, name_b)
        assert row["winner"] == "model_a" and row["anony"] is True and row["turn"] == 2
        cookie = next(c for c in page.context.cookies() if c["name"] == "arena_client")
        assert row["client_id"] == cookie["value"].partition(".")[0]  # the id the server signed
        prompts = [m["content"] for m in row["conversation_a"] if m["role"] == "user"]
        assert prompts == ["What is the capital of France?", "And of Italy?"]
        answers_a = [m["content"] for m in row["conversation_a"] if m["role"] == "assistant"]
        assert [a or "(empty answer)" for a in answers_a] == shown_a

        page.click("#new-round")
        expect(page.locator("#messages-a .msg")).to_have_count(0)
        expect(page.locator("#name-a")).to_have_text("")
        expect(page.locator("#new-round")).to_be_hidden()
        ask(page, "Hello again")
        page.click("#vote-bothbad_vote")
        expect(page.locator("#new-round")).to_be_visible()
        rows = arena.votes()
        assert len(rows) == 2 and rows[1]["winner"] == "tie (bothbad)"
        assert rows[1]["battle_id"] != rows[0]["battle_id"]


def test_named_battle_and_refused_prompt_in_chromium(start_arena, page) -> None:
    with start_arena() as arena:
        page.goto(f"{arena.url}/arena")
        page.click("#mode-switch")
        expect(page.locator("#pickers")).to_be_visible()
        page.select_option("#pick-a", "tiny-b")
        page.select_option("#pick-b", "tiny-a")
        expect(page.locator("#name-a")).to_have_text("· tiny-b")

        page.fill("#prompt", "Is ChatGPT better than you?")
        page.click("#send")
        expect(page.locator("#status")).to_contain_text("blocked list")
        expect(page.locator("#messages-a .msg")).to_have_count(0)  # the refused turn left no trace

        ask(page, "Is water wet?")
        expect(page.locator("#pick-a")).to_be_disabled()  # the pair is fixed for the battle
        page.click("#vote-tievote")
        expect(page.locator("#new-round")).to_be_visible()
        (row,) = arena.votes()
        assert (row["model_a"], row["model_b"], row["winner"]) == ("tiny-b", "tiny-a", "tie")
        assert row["anony"] is False


def test_arena_page_with_one_model_says_so(start_arena, page) -> None:
    with start_arena(models=1) as arena:
        page.goto(f"{arena.url}/arena")
        expect(page.locator("#unavailable")).to_contain_text("at least two served models")
        expect(page.locator("#arena")).to_be_hidden()


def test_private_arena_asks_for_the_key_in_chromium(start_arena, page) -> None:
    key = "browser-test-key-0123456789"
    with start_arena("serve.arena.require_key=true", f"serve.api_keys=[{key}]") as arena:
        page.goto(f"{arena.url}/arena?mode=named")
        expect(page.locator("#key-form")).to_be_visible()
        expect(page.locator("#arena")).to_be_hidden()
        page.fill("#api-key", "not-the-key")
        page.click("#key-form button")
        expect(page.locator("#key-status")).to_contain_text("incorrect API key")
        page.fill("#api-key", key)
        page.click("#key-form button")
        expect(page.locator("#arena")).to_be_visible()
        expect(page.locator("#pick-b option")).to_have_count(2)  # the names came with the key
        page.select_option("#pick-a", "tiny-b")
        page.select_option("#pick-b", "tiny-a")
        ask(page, "Is water wet?")
        page.click("#vote-tievote")
        expect(page.locator("#new-round")).to_be_visible()
        page.reload()  # the key is kept for this tab
        expect(page.locator("#arena")).to_be_visible()
        expect(page.locator("#key-form")).to_be_hidden()
        (row,) = arena.votes()
        assert (row["model_a"], row["model_b"], row["winner"]) == ("tiny-b", "tiny-a", "tie")
