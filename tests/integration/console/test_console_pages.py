"""The console's pages turn away what they must: wrong passwords (lockout), missing, forged
and stale CSRF tokens, other roles' pages, tampered cookies and oversized forms; and what
they accept becomes one signed command carrying the staff id."""

from __future__ import annotations

import re
from datetime import datetime, timedelta

import pytest
from argon2 import PasswordHasher, extract_parameters

from services.console.queue import QueueReader, QueueWriter
from services.console.staff import Role
from shared.contracts import review
from shared.identity import citizen_ref
from shared.settings import CardDeskSettings
from tests.integration.console.conftest import PASSWORD, Desk, csrf_of
from tests.unit.status.events import T0, Streams
from tests.unit.status.test_asyncapi_page import external_references

pytestmark = pytest.mark.integration

ID_NUMBER = "11010519491231002X"
OTHER_ID_NUMBER = "440524188001010014"
SESSION_COOKIE = "__Host-cd_console"


async def pending_application(desk: Desk, bureau: str = "bureau-001",
                              applied: datetime = T0) -> str:
    streams = Streams(start=applied)
    application_id = f"app-{streams.citizen_ref[-8:]}"
    envelope = streams.emit("review.events", review.ReissueApplied(
        application_id=application_id, loss_id="loss-1", old_card_no=None,
        address="enc:v1:x", phone="enc:v1:x", photo_ref="enc:v1:x", pickup_bureau=bureau,
        channel="wechat-oa"))
    async with desk.pool.acquire() as conn, conn.transaction():
        await QueueWriter(desk.schema).apply(conn, envelope)
    return application_id


# --- sign-in and lockout ------------------------------------------------------------------

async def test_staff_sign_in_with_the_right_password_and_land_on_their_role_page(
        desk: Desk) -> None:
    staff_id = await desk.add(Role.COUNTER)
    response = await desk.sign_in(staff_id)
    assert response.status_code == 303
    assert response.headers["location"] == "/counter"
    cookie = response.headers["set-cookie"]
    assert SESSION_COOKIE in cookie
    for attribute in ("HttpOnly", "Secure", "SameSite=strict", "Path=/"):
        assert attribute.lower() in cookie.lower()


async def test_a_wrong_password_is_refused_and_repeated_ones_lock_the_account(
        desk: Desk) -> None:
    staff_id = await desk.add(Role.REVIEWER)
    for _ in range(2):
        assert (await desk.sign_in(staff_id, "wrong password!!")).status_code == 401
    assert (await desk.sign_in(staff_id, "wrong password!!")).status_code == 423
    # Locked: even the right password is refused until the lock is over.
    locked = await desk.sign_in(staff_id)
    assert locked.status_code == 423
    assert SESSION_COOKIE not in locked.headers.get("set-cookie", "")
    desk.clock.advance(minutes=16)
    assert (await desk.sign_in(staff_id)).status_code == 303


async def test_a_password_stored_at_the_old_default_cost_is_hashed_again_on_a_good_sign_in(
        desk: Desk) -> None:
    """An account hashed at argon2-cffi's default (64 MiB) keeps signing in; its hash is
    made again at the console's cost on its next good sign-in, and not on a wrong one."""
    staff_id = await desk.add(Role.COUNTER)
    await desk.pool.execute(
        f"UPDATE {desk.schema}.staff SET password_hash = $2 WHERE staff_id = $1",
        staff_id, PasswordHasher().hash(PASSWORD))

    async def stored_memory_kib() -> int:
        digest = await desk.pool.fetchval(
            f"SELECT password_hash FROM {desk.schema}.staff WHERE staff_id = $1", staff_id)
        return int(extract_parameters(digest).memory_cost)

    assert (await desk.sign_in(staff_id, "wrong password!!")).status_code == 401
    assert await stored_memory_kib() == 64 * 1024
    assert (await desk.sign_in(staff_id)).status_code == 303
    assert await stored_memory_kib() == 19 * 1024
    # The new hash verifies (straight to the directory: this client is signed in now).
    assert (await desk.staff.sign_in(staff_id, PASSWORD, desk.clock())).outcome == "ok"
    assert await stored_memory_kib() == 19 * 1024


async def test_a_sign_in_that_cannot_get_the_hasher_in_time_is_refused_busy_not_failed(
        desk: Desk) -> None:
    """A flood of sign-ins waits for the one password hasher, at most its bound; those
    refused as busy (503) do not count as wrong passwords towards the lockout."""
    staff_id = await desk.add(Role.REVIEWER)
    desk.staff.passwords.wait_s = 0.1
    async with desk.staff.passwords.turn():  # someone else's sign-in, taking its time
        for _ in range(4):  # more than the lockout's three attempts
            busy = await desk.sign_in(staff_id, "wrong password!!")
            assert busy.status_code == 503
            assert busy.headers["retry-after"] == "1"  # the 0.1 s wait, in whole seconds
            assert "Too many sign-ins" in busy.text or "登录请求过多" in busy.text
            assert SESSION_COOKIE not in busy.headers.get("set-cookie", "")
    assert (await desk.sign_in(staff_id)).status_code == 303


# The ASGI transport connects from 127.0.0.1: trusted here as the bureau's reverse proxy.
BEHIND_A_PROXY = {"console_sign_in_burst": 2, "console_sign_in_per_minute": 6,
                  "console_trusted_proxies": "127.0.0.1, 10.20.0.0/16"}


@pytest.mark.parametrize("desk", [BEHIND_A_PROXY], indirect=True)
async def test_one_address_past_its_sign_in_rate_is_refused_before_any_password_is_checked(
        desk: Desk) -> None:
    """An unauthenticated flood from one address gets 429s without a hash: it cannot take
    the hasher's turns from staff elsewhere, nor lock an account."""
    staff_id = await desk.add(Role.REVIEWER)
    flooder = {"X-Forwarded-For": "203.0.113.9"}
    for _ in range(2):  # the burst: checked, and wrong
        assert (await desk.sign_in(staff_id, "wrong", flooder)).status_code == 401
    for _ in range(3):  # past it: refused unchecked, so the lockout (three) is not reached
        limited = await desk.sign_in(staff_id, "wrong", flooder)
        assert limited.status_code == 429
        assert limited.headers["retry-after"] == "10"  # a token each 10 s at 6 a minute
        assert "Too many sign-in attempts" in limited.text or "登录尝试过多" in limited.text
        assert SESSION_COOKIE not in limited.headers.get("set-cookie", "")
    # The right password from the same address is refused too: it is the address's rate.
    assert (await desk.sign_in(staff_id, headers=flooder)).status_code == 429
    # A colleague at another address, through a chain of the bureau's proxies, signs in:
    # the account was not locked.
    colleague = {"X-Forwarded-For": "198.51.100.7, 10.20.1.1"}
    assert (await desk.sign_in(staff_id, headers=colleague)).status_code == 303


@pytest.mark.parametrize("desk", [BEHIND_A_PROXY], indirect=True)
async def test_a_forwarded_address_the_flooder_writes_itself_does_not_give_it_a_new_rate(
        desk: Desk) -> None:
    """Left of the first untrusted address, X-Forwarded-For is the client's own say."""
    staff_id = await desk.add(Role.REVIEWER)
    statuses = [(await desk.sign_in(staff_id, "wrong", {
        "X-Forwarded-For": f"192.0.2.{n}, 203.0.113.9"})).status_code for n in range(5)]
    assert statuses == [401, 401, 429, 429, 429]


@pytest.mark.parametrize("desk", [{"console_sign_in_burst": 2}], indirect=True)
async def test_without_trusted_proxies_a_forwarded_header_is_ignored(desk: Desk) -> None:
    """By default the address that connected is the client's, whatever a header says."""
    staff_id = await desk.add(Role.REVIEWER)
    statuses = [(await desk.sign_in(staff_id, "wrong", {
        "X-Forwarded-For": f"192.0.2.{n}"})).status_code for n in range(3)]
    assert statuses == [401, 401, 429]


async def test_an_unknown_staff_id_is_refused_like_a_wrong_password(desk: Desk) -> None:
    response = await desk.sign_in("nobody-here")
    assert response.status_code == 401
    assert "Wrong staff ID or password" in response.text or "工号或密码错误" in response.text


async def test_a_disabled_account_cannot_sign_in_and_loses_its_sessions(desk: Desk) -> None:
    staff_id, _ = await desk.signed_in(Role.REVIEWER)
    await desk.staff.disable(staff_id)
    assert (await desk.http.get("/review")).headers.get("location") == "/sign-in"
    assert (await desk.sign_in(staff_id)).status_code == 401


async def test_sign_in_without_its_csrf_token_is_refused(desk: Desk) -> None:
    staff_id = await desk.add(Role.REVIEWER)
    await desk.sign_in_form()
    response = await desk.http.post("/sign-in", data={"staff_id": staff_id,
                                                      "password": "correct horse battery"})
    assert response.status_code == 403
    forged = await desk.http.post("/sign-in", data={
        "csrf_token": "forged", "staff_id": staff_id, "password": "correct horse battery"})
    assert forged.status_code == 403


async def test_an_idle_session_ends(desk: Desk) -> None:
    await desk.signed_in(Role.REVIEWER)
    desk.clock.advance(minutes=31)
    assert (await desk.http.get("/review")).headers.get("location") == "/sign-in"


# --- CSRF -----------------------------------------------------------------------------------

async def test_an_action_without_a_csrf_token_sends_nothing(desk: Desk) -> None:
    await desk.signed_in(Role.REVIEWER)
    application_id = await pending_application(desk)
    response = await desk.http.post(f"/review/{application_id}/decision",
                                    data={"decision": "approve"})
    assert response.status_code == 403
    assert desk.channel.sent == []


async def test_a_forged_csrf_token_sends_nothing(desk: Desk) -> None:
    await desk.signed_in(Role.REVIEWER)
    application_id = await pending_application(desk)
    response = await desk.http.post(f"/review/{application_id}/decision",
                                    data={"decision": "approve", "csrf_token": "x" * 43})
    assert response.status_code == 403
    assert desk.channel.sent == []


async def test_a_stale_csrf_token_from_an_earlier_session_is_refused(desk: Desk) -> None:
    staff_id, old_token = await desk.signed_in(Role.REVIEWER)
    application_id = await pending_application(desk)
    page = await desk.http.get("/lookup")
    await desk.http.post("/sign-out", data={"csrf_token": csrf_of(page.text)})
    assert (await desk.sign_in(staff_id)).status_code == 303
    response = await desk.http.post(f"/review/{application_id}/decision",
                                    data={"decision": "approve", "csrf_token": old_token})
    assert response.status_code == 403
    assert desk.channel.sent == []


async def test_a_post_from_another_origin_is_refused_even_with_the_token(desk: Desk) -> None:
    _, token = await desk.signed_in(Role.REVIEWER)
    application_id = await pending_application(desk)
    response = await desk.http.post(
        f"/review/{application_id}/decision", data={"decision": "approve", "csrf_token": token},
        headers={"origin": "https://evil.example"})
    assert response.status_code == 403
    assert desk.channel.sent == []


# --- roles ----------------------------------------------------------------------------------

@pytest.mark.parametrize(("role", "path"), [
    (Role.REVIEWER, "/counter"), (Role.REVIEWER, "/audit"), (Role.COUNTER, "/review"),
    (Role.COUNTER, "/audit"), (Role.AUDITOR, "/review"), (Role.AUDITOR, "/counter"),
])
async def test_a_role_cannot_reach_another_roles_pages_by_url(desk: Desk, role: Role,
                                                              path: str) -> None:
    await desk.signed_in(role)
    response = await desk.http.get(path)
    assert response.status_code == 403


async def test_a_reviewer_cannot_post_a_collection_by_url(desk: Desk) -> None:
    _, token = await desk.signed_in(Role.REVIEWER)
    response = await desk.http.post("/counter/collect", data={
        "csrf_token": token, "citizen_ref": "a" * 64, "application_id": "app-1",
        "presented_id_number": ID_NUMBER})
    assert response.status_code == 403
    assert desk.channel.sent == []


async def test_every_role_may_look_a_citizen_up_and_an_admin_may_use_every_page(
        desk: Desk) -> None:
    for role in Role:
        desk.http.cookies.clear()
        await desk.signed_in(role)
        assert (await desk.http.get("/lookup")).status_code == 200
    for path in ("/review", "/counter", "/audit"):
        assert (await desk.http.get(path)).status_code == 200  # the last one: admin


# --- cookies and forms ----------------------------------------------------------------------

async def test_a_tampered_session_cookie_is_no_session(desk: Desk) -> None:
    await desk.signed_in(Role.REVIEWER)
    token = desk.http.cookies[SESSION_COOKIE]
    desk.http.cookies.set(SESSION_COOKIE, token[:-2] + ("AA" if token[-2:] != "AA" else "BB"),
                          domain="console.test")
    assert (await desk.http.get("/review")).headers.get("location") == "/sign-in"
    desk.http.cookies.set(SESSION_COOKIE, "x" * 5000, domain="console.test")
    assert (await desk.http.get("/review")).headers.get("location") == "/sign-in"


async def test_an_oversized_field_is_refused_and_sends_nothing(desk: Desk) -> None:
    _, token = await desk.signed_in(Role.REVIEWER)
    application_id = await pending_application(desk)
    response = await desk.http.post(f"/review/{application_id}/decision", data={
        "csrf_token": token, "decision": "reject", "reason": "r" * 501})
    assert response.status_code == 413
    assert desk.channel.sent == []


async def test_an_oversized_body_is_refused_before_it_is_parsed(desk: Desk) -> None:
    await desk.signed_in(Role.COUNTER)
    response = await desk.http.post("/counter/find", content=b"id_number=" + b"1" * 20_000,
                                    headers={"content-type": "application/x-www-form-urlencoded"})
    assert response.status_code == 413
    desk.http.cookies.clear()
    huge_password = await desk.http.post("/sign-in", data={
        "csrf_token": await desk.sign_in_form(), "staff_id": "x", "password": "p" * 20_000})
    assert huge_password.status_code == 413


async def test_a_form_of_another_content_type_or_too_many_fields_is_refused(desk: Desk) -> None:
    _, token = await desk.signed_in(Role.COUNTER)
    as_json = await desk.http.post("/counter/find", json={"csrf_token": token})
    assert as_json.status_code == 415
    many = "&".join(f"f{i}=1" for i in range(40))
    response = await desk.http.post("/counter/find", content=f"csrf_token={token}&{many}",
                                    headers={"content-type": "application/x-www-form-urlencoded"})
    assert response.status_code == 400


# --- actions --------------------------------------------------------------------------------

async def test_a_decision_is_a_signed_command_carrying_the_reviewers_staff_id(
        desk: Desk) -> None:
    staff_id, token = await desk.signed_in(Role.REVIEWER)
    application_id = await pending_application(desk)
    response = await desk.http.post(f"/review/{application_id}/decision", data={
        "csrf_token": token, "decision": "approve", "reason": ""})
    assert response.status_code == 200
    assert desk.channel.sent == [("review", "DecideReview", {
        "application_id": application_id, "reviewer_id": staff_id, "decision": "approve",
        "reason": ""})]
    assert 'id="reply-code">accepted<' in response.text


async def test_a_rejection_needs_a_reason(desk: Desk) -> None:
    _, token = await desk.signed_in(Role.REVIEWER)
    application_id = await pending_application(desk)
    response = await desk.http.post(f"/review/{application_id}/decision", data={
        "csrf_token": token, "decision": "reject", "reason": "   "})
    assert response.status_code == 400
    assert desk.channel.sent == []


async def test_the_losing_reviewer_is_shown_already_decided(desk: Desk) -> None:
    _, token = await desk.signed_in(Role.REVIEWER)
    application_id = await pending_application(desk)
    desk.channel.code = "already_decided"
    response = await desk.http.post(f"/review/{application_id}/decision", data={
        "csrf_token": token, "decision": "approve"})
    assert 'id="reply-code">already_decided<' in response.text
    assert "Another reviewer" in response.text or "其他审核员" in response.text


async def test_a_command_without_a_reply_says_so_instead_of_failing(desk: Desk) -> None:
    _, token = await desk.signed_in(Role.REVIEWER)
    application_id = await pending_application(desk)
    desk.channel.code = "timeout"
    response = await desk.http.post(f"/review/{application_id}/decision", data={
        "csrf_token": token, "decision": "approve"})
    assert response.status_code == 504
    assert "No reply yet" in response.text or "暂未收到处理结果" in response.text


async def test_the_queue_lists_pending_applications_oldest_first_and_by_bureau(
        desk: Desk) -> None:
    second = await pending_application(desk, "bureau-b", T0 + timedelta(hours=1))
    first = await pending_application(desk, "bureau-a")
    queue = await QueueReader(desk.pool, desk.schema).pending()
    assert [a.application_id for a in queue] == [first, second]
    await desk.signed_in(Role.REVIEWER)
    page = await desk.http.get("/review", params={"bureau": "bureau-b"})
    assert second in page.text and first not in page.text


async def test_a_counter_finds_by_id_number_and_collects_with_the_presented_id(
        desk: Desk) -> None:
    staff_id, token = await desk.signed_in(Role.COUNTER)
    ref = citizen_ref(CardDeskSettings().citizen_ref_pepper.get_secret_value(), ID_NUMBER)
    desk.status.cards[ref] = {"citizen_ref": ref, "status": "READY_FOR_PICKUP",
                              "application_id": "app-9", "pickup_bureau": "bureau-001",
                              "card_no_masked": "*****4321", "loss_kind": "formal"}
    found = await desk.http.post("/counter/find", data={"csrf_token": token,
                                                        "id_number": ID_NUMBER})
    assert found.status_code == 200
    assert ID_NUMBER not in found.text
    assert "110105********002X" in found.text
    collected = await desk.http.post("/counter/collect", data={
        "csrf_token": token, "citizen_ref": ref, "application_id": "app-9",
        "presented_id_number": ID_NUMBER, "by_proxy": "yes",
        "proxy_id_number": OTHER_ID_NUMBER, "proxy_name": "李四", "authorisation_ref": "auth-1"})
    assert collected.status_code == 200
    assert re.search(r'id="new-card-no">\*+4321<', collected.text)
    [(service, command, payload)] = desk.channel.sent
    assert (service, command) == ("issuance", "CollectCard")
    assert payload == {"application_id": "app-9", "bureau_id": "bureau-001",
                       "presented_id_number": ID_NUMBER,
                       "proxy": {"id_number": OTHER_ID_NUMBER, "name": "李四",
                                 "authorisation_ref": "auth-1"}}
    assert staff_id


async def test_an_invalid_id_number_at_the_counter_sends_nothing(desk: Desk) -> None:
    _, token = await desk.signed_in(Role.COUNTER)
    response = await desk.http.post("/counter/find", data={"csrf_token": token,
                                                           "id_number": "110105194912310021"})
    assert response.status_code == 400
    assert desk.channel.sent == []


async def test_the_pages_carry_a_strict_content_security_policy(desk: Desk) -> None:
    page = await desk.http.get("/sign-in")
    policy = page.headers["content-security-policy"]
    assert "script-src 'self'" in policy and "frame-ancestors 'none'" in policy
    assert page.headers["cache-control"] == "no-store"


async def test_no_console_page_references_another_host(desk: Desk) -> None:
    sign_in = await desk.http.get("/sign-in")
    pages = [sign_in.text]
    await desk.signed_in(Role.ADMIN)
    application_id = await pending_application(desk)
    for path in ("/review", f"/review/{application_id}", "/counter", "/lookup", "/audit"):
        response = await desk.http.get(path)
        assert response.status_code == 200, path
        pages.append(response.text)
    for page in pages:
        assert external_references(page) == []
        assert '<script src="/static/htmx.min.js"' in page
    htmx = await desk.http.get("/static/htmx.min.js")
    assert htmx.status_code == 200 and "htmx" in htmx.text
