"""The bureau console in a real browser: Debian's chromium, headless, driven by Playwright.

The console runs as its own process beside the other services (this package's `services`);
staff accounts are made with `cardctl staff add`; citizens are driven to the review and the
counter through Kafka as a channel would. Each page is saved as a screenshot
(under docs/console/ with CARDDESK_SCREENSHOTS=docs/console, for the README).
"""

from __future__ import annotations

import asyncio
import importlib.util
import os
import re
import shutil
import tempfile
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from urllib.parse import urlsplit

import pytest
from typer.testing import CliRunner

from cardctl.citizens import SyntheticCitizen
from cardctl.journey import Journey, Session
from cardctl.main import app as cardctl_app
from services.console.settings import ConsoleSettings
from shared.masking import mask_id_number

pytestmark = pytest.mark.integration

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
if CHROMIUM is None or importlib.util.find_spec("playwright") is None:
    pytest.skip("the console's browser tests need Debian's chromium (apt-get install -y "
                "chromium) and Playwright for Python (pip install -e '.[dev]')",
                allow_module_level=True)

from playwright.async_api import Browser, BrowserContext, Page, async_playwright  # noqa: E402

# The README's screenshots are refreshed on request (CARDDESK_SCREENSHOTS=docs/console);
# otherwise a run keeps its pictures out of the working tree.
SCREENSHOTS = Path(os.environ.get("CARDDESK_SCREENSHOTS")
                   or Path(tempfile.gettempdir()) / "carddesk-console-screenshots")
PASSWORD = "browser-test-password"
WAIT_MS = 30_000


def console_url() -> str:
    return f"http://localhost:{ConsoleSettings().console_port}"


@pytest.fixture(scope="module")
def staff(services: list[str]) -> Iterator[dict[str, str]]:
    """One account per role, added with `cardctl staff add`, then disabled."""
    runner = CliRunner()
    suffix = uuid.uuid4().hex[:6]
    accounts = {role: f"e2e-{role}-{suffix}" for role in
                ("reviewer", "reviewer2", "counter", "auditor")}
    for role, staff_id in accounts.items():
        result = runner.invoke(cardctl_app, ["staff", "add", staff_id, "--role",
                                             role.rstrip("2"), "--password", PASSWORD])
        assert result.exit_code == 0, result.output
    listed = runner.invoke(cardctl_app, ["staff", "list"])
    assert all(staff_id in listed.output for staff_id in accounts.values()), listed.output
    yield accounts
    for staff_id in accounts.values():
        runner.invoke(cardctl_app, ["staff", "disable", staff_id])


@pytest.fixture(scope="module")
async def browser(services: list[str]) -> AsyncIterator[Browser]:
    assert CHROMIUM is not None
    async with async_playwright() as playwright:
        launched = await playwright.chromium.launch(executable_path=CHROMIUM, headless=True,
                                                    args=["--no-sandbox"])
        yield launched
        await launched.close()


class Desk:
    """One staff member's browser context, recording every host a page loads from."""

    def __init__(self, context: BrowserContext) -> None:
        self.context = context
        self.hosts: set[str] = set()
        context.on("request", lambda request: self.hosts.add(urlsplit(request.url).netloc))

    async def page(self) -> Page:
        page = await self.context.new_page()
        page.set_default_timeout(WAIT_MS)
        return page

    async def sign_in(self, staff_id: str, screenshot: str | None = None) -> Page:
        page = await self.page()
        await page.goto(f"{console_url()}/sign-in")
        await page.fill("#staff_id", staff_id)
        await page.fill("#password", PASSWORD)
        if screenshot:
            await shot(page, screenshot)
        await page.click("form[action='/sign-in'] button[type=submit]")
        await page.wait_for_selector("#staff-id")
        assert await page.inner_text("#staff-id") == staff_id
        return page

    def assert_local_only(self) -> None:
        assert self.hosts, "no request was seen"
        assert self.hosts == {urlsplit(console_url()).netloc}, self.hosts


class Desks:
    """The staff members of one test, each in a browser context of their own (a tablet
    sized window, English labels)."""

    def __init__(self, browser: Browser) -> None:
        self.browser = browser
        self.made: list[Desk] = []

    async def new(self) -> Desk:
        context = await self.browser.new_context(viewport={"width": 1024, "height": 900},
                                                 locale="en-GB")
        desk = Desk(context)
        self.made.append(desk)
        return desk


@pytest.fixture
async def desks(browser: Browser) -> AsyncIterator[Desks]:
    holder = Desks(browser)
    yield holder
    for desk in holder.made:
        await desk.context.close()
    for desk in holder.made:
        desk.assert_local_only()


async def shot(page: Page, name: str) -> None:
    # Playwright makes the folder if it is missing.
    await page.screenshot(path=str(SCREENSHOTS / f"{name}.png"), full_page=True)


async def applied(journey: Journey, citizen: SyntheticCitizen) -> Session:
    """A citizen with a formal loss and a pending reissue application."""
    session = Session(citizen)
    await journey.log_in(session)
    await journey.authorize_e_card(session)
    await journey.verify_portrait(session)
    await journey.report_loss(session, "formal")
    await journey.apply_for_reissue(session)
    await journey.wait_for_status(session.citizen_ref, "REISSUE_APPLIED")
    return session


async def open_application(page: Page, application_id: str) -> None:
    """The queue shows the application once the console has projected it; open it."""
    row = f"tr[data-application='{application_id}'] a"
    for _ in range(60):
        await page.goto(f"{console_url()}/review")
        if await page.locator(row).count():
            break
        await asyncio.sleep(0.5)
    await page.click(row)
    await page.wait_for_selector("#approve")


async def test_a_reviewer_approves_and_the_counter_hands_the_new_card_over(
        desks: Desks, staff: dict[str, str], journey: Journey,
        citizen: SyntheticCitizen) -> None:
    session = await applied(journey, citizen)
    reviewer = await desks.new()
    page = await reviewer.sign_in(staff["reviewer"], screenshot="sign-in")
    await open_application(page, session.application_id)
    await page.goto(f"{console_url()}/review")
    await shot(page, "review-queue")
    await page.click(f"tr[data-application='{session.application_id}'] a")
    await shot(page, "application")
    await page.click("#approve")
    await page.wait_for_selector("#reply-code")
    assert await page.inner_text("#reply-code") == "accepted"
    await journey.wait_for_status(session.citizen_ref, "READY_FOR_PICKUP")

    counter = await desks.new()
    page = await counter.sign_in(staff["counter"])
    await page.fill("#id_number", citizen.id_number)
    await page.click("form[action='/counter/find'] button")
    await page.wait_for_selector("#presented_id_number")
    content = await page.content()
    assert citizen.id_number not in content
    assert mask_id_number(citizen.id_number) in content
    await page.fill("#presented_id_number", citizen.id_number)
    await shot(page, "counter")
    await page.click("#collect")
    await page.wait_for_selector("#reply-code")
    assert await page.inner_text("#reply-code") == "accepted"
    new_card = await page.inner_text("#new-card-no")
    assert re.fullmatch(r"\*+\d{4}", new_card), new_card
    await shot(page, "counter-collected")
    row = await journey.wait_for_status(session.citizen_ref, "ACTIVE")
    assert row["card_no_masked"] == new_card


async def test_a_rejection_needs_a_reason_and_of_two_racing_reviewers_one_wins(
        desks: Desks, staff: dict[str, str], journey: Journey,
        citizen: SyntheticCitizen) -> None:
    session = await applied(journey, citizen)
    first, second = await desks.new(), await desks.new()
    page1 = await first.sign_in(staff["reviewer"])
    page2 = await second.sign_in(staff["reviewer2"])
    await open_application(page1, session.application_id)
    await open_application(page2, session.application_id)

    await page1.click("#reject")
    await page1.wait_for_selector(".notice")
    assert "reason" in (await page1.inner_text(".notice")).lower()
    await page1.fill("#reason", "photo does not match the registry")

    # Both decide at once: the review service lets one win; the other sees already_decided.
    await asyncio.gather(page1.click("#reject"), page2.click("#approve"))
    await asyncio.gather(page1.wait_for_selector("#reply-code"),
                         page2.wait_for_selector("#reply-code"))
    codes = {await page1.inner_text("#reply-code"): "reject",
             await page2.inner_text("#reply-code"): "approve"}
    assert set(codes) == {"accepted", "already_decided"}, codes
    loser = page1 if codes["already_decided"] == "reject" else page2
    await shot(loser, "already-decided")
    winner_status = "REISSUE_REJECTED" if codes["accepted"] == "reject" else "READY_FOR_PICKUP"
    await journey.wait_for_status(session.citizen_ref, winner_status)


async def test_any_role_looks_a_citizen_up_masked(
        desks: Desks, staff: dict[str, str], journey: Journey,
        logged_in: Session) -> None:
    desk = await desks.new()
    page = await desk.sign_in(staff["counter"])
    await page.goto(f"{console_url()}/lookup")
    await page.fill("#query", logged_in.citizen.id_number)
    await page.click("form[action='/lookup'] button")
    await page.wait_for_selector("table.timeline")
    assert await page.inner_text("#card-status") == "ACTIVE"
    content = await page.content()
    assert logged_in.citizen.id_number not in content
    assert logged_in.citizen.name not in content
    assert "SessionStarted" in content
    await shot(page, "lookup")


async def test_an_auditor_replays_one_citizen_and_sees_the_progress_to_the_end(
        desks: Desks, staff: dict[str, str], logged_in: Session) -> None:
    desk = await desks.new()
    page = await desk.sign_in(staff["auditor"])
    await page.check("#kind-replay")
    await page.check("#scope-one")
    await page.fill("#audit-id-number", logged_in.citizen.id_number)
    await page.click("#run-audit")
    await page.wait_for_selector("#audit-progress")
    await page.wait_for_selector("#audit-state:not([data-state='running'])", timeout=120_000)
    assert await page.get_attribute("#audit-state", "data-state") == "passed", \
        await page.inner_text("#audit-progress")
    assert "1 citizen(s) agree" in await page.inner_text("#audit-progress")
    await shot(page, "audit")


async def test_a_reviewer_cannot_reach_the_counter_or_audit_pages(
        desks: Desks, staff: dict[str, str]) -> None:
    desk = await desks.new()
    page = await desk.sign_in(staff["reviewer"])
    for path in ("/counter", "/audit"):
        response = await page.goto(f"{console_url()}{path}")
        assert response is not None and response.status == 403, path
        assert "may not use this page" in await page.inner_text("main")
    await shot(page, "forbidden")
    nav = await page.inner_text("nav")
    assert "Counter" not in nav and "Audit" not in nav


async def test_a_stale_csrf_token_is_refused(desks: Desks, staff: dict[str, str],
                                             logged_in: Session) -> None:
    desk = await desks.new()
    page = await desk.sign_in(staff["counter"])
    await page.goto(f"{console_url()}/lookup")  # its form carries this session's token
    other = await desk.page()
    await other.goto(f"{console_url()}/lookup")
    await other.click("form[action='/sign-out'] button")
    await desk.sign_in(staff["counter"])  # a new session, a new token
    await page.fill("#query", logged_in.citizen.id_number)
    async with page.expect_response(f"{console_url()}/lookup") as answer:
        await page.click("form[action='/lookup'] button")
    assert (await answer.value).status == 403
    assert "expired" in await page.inner_text("main")
    assert await page.locator("table.timeline").count() == 0


async def test_labels_follow_the_browsers_language_and_the_switch(
        browser: Browser, staff: dict[str, str]) -> None:
    context = await browser.new_context(viewport={"width": 1024, "height": 900},
                                        locale="zh-CN")
    desk = Desk(context)
    try:
        page = await desk.sign_in(staff["reviewer"])
        assert "补卡审核" in await page.inner_text("nav")
        assert "待审核的补卡申请" in await page.inner_text("h1")
        await shot(page, "review-queue-zh")
        await page.click("a.lang")
        await page.goto(f"{console_url()}/review")
        assert "Pending reissue applications" in await page.inner_text("h1")
    finally:
        await context.close()
    desk.assert_local_only()
