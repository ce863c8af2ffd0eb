"""The console's memory under a flood of sign-in attempts: what an unauthenticated caller can
make it hold.

Starts the local stack, restarts the console (this checkout, and its peak memory counted from
its start), lets it settle, then sends `--attempts` sign-ins at once, each for an unknown
staff id, as a browser would (the form's CSRF token and cookie first). Prints the console's
peak RSS before and after (target, issue 12: ≤ 150 MB per service), the outcomes, and how
long the attempts took.

Each attempt comes from an address of its own: one address past its sign-in rate is refused
before any hash (429), and the flood measured here is many addresses at once. The console is
restarted trusting this host as its reverse proxy (`CARDDESK_CONSOLE_TRUSTED_PROXIES`), and
each attempt names its address in `X-Forwarded-For` (198.18.0.0/15, the benchmarking range);
it is left running so.

    python -m bench.signins [--attempts 12] [--settle 5]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import time
from collections import Counter
from ipaddress import IPv4Address

import httpx

from bench.common import console, peak_rss_mb, percentiles, print_table, write_result
from bench.idle import TARGET_RSS_MB
from cardctl.stack import Stack
from services.console.settings import ConsoleSettings
from shared.logging import configure_logging
from shared.settings import CardDeskSettings

CSRF = re.compile(r'name="csrf_token" value="([^"]+)"')
TIMEOUT_S = 60.0
# Every attempt's own client address (RFC 2544's benchmarking range).
FIRST_CLIENT = IPv4Address("198.18.0.1")


async def attempt(base_url: str, number: int) -> tuple[int, float]:
    """One sign-in for an unknown staff id; its HTTP status and how long the POST took."""
    headers = {"Origin": base_url, "X-Forwarded-For": str(FIRST_CLIENT + number)}
    async with httpx.AsyncClient(base_url=base_url, headers=headers,
                                 timeout=TIMEOUT_S) as client:
        form = await client.get("/sign-in")
        token = CSRF.search(form.text)
        if token is None:
            raise RuntimeError(f"no CSRF token on the sign-in page ({form.status_code})")
        # The login cookie is Secure: sent by hand, as over HTTPS.
        cookie = "; ".join(f"{name}={value}" for name, value in form.cookies.items())
        started = time.monotonic()
        response = await client.post("/sign-in", headers={"Cookie": cookie}, data={
            "csrf_token": token.group(1), "staff_id": f"bench-nobody-{number}",
            "password": "not the password"})
        return response.status_code, time.monotonic() - started


async def flood(base_url: str, attempts: int) -> list[tuple[int, float]]:
    return await asyncio.gather(*(attempt(base_url, n) for n in range(attempts)))


def main(attempts: int, settle: float) -> int:
    settings = CardDeskSettings()
    stack = Stack(settings, report=lambda line: console.print(f"[dim]•[/] {line}"))
    stack.up(services=False)
    stack.down(only=["console"])
    os.environ["CARDDESK_CONSOLE_TRUSTED_PROXIES"] = "127.0.0.0/8, ::1"
    stack.start_services()
    spec = next(spec for spec in stack.service_specs() if spec.name == "console")
    pid = stack.running_pid(spec)
    if pid is None:
        console.print("[red]the console is not running[/]")
        return 1
    time.sleep(settle)
    before = peak_rss_mb(pid)
    console_settings = ConsoleSettings()
    base_url = f"http://{console_settings.http_host}:{console_settings.console_port}"
    results = asyncio.run(flood(base_url, attempts))
    after = peak_rss_mb(pid)
    latencies = percentiles([seconds for _, seconds in results])
    outcomes = Counter(status for status, _ in results)
    print_table(f"the console under {attempts} sign-in attempts at once "
                f"(target ≤ {TARGET_RSS_MB:.0f} MB)", [
                    ("peak RSS MB, before / after", f"{before:.0f} / {after:.0f}"
                     if before and after else "?"),
                    ("HTTP statuses", ", ".join(f"{status} × {count}"
                                                for status, count in sorted(outcomes.items()))),
                    ("sign-in p50 / max ms", f"{latencies['p50_ms']:,.0f} / "
                     f"{max(seconds for _, seconds in results) * 1000:,.0f}"),
                ])
    path = write_result("signins", {"attempts": attempts, "peak_rss_mb_before": before,
                                    "peak_rss_mb_after": after, "statuses": dict(outcomes),
                                    "latency": latencies})
    console.print(f"written {path}")
    if after is None or after > TARGET_RSS_MB:
        console.print("[red]over the memory target[/]")
    return 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--attempts", type=int, default=12)
    parser.add_argument("--settle", type=float, default=5.0)
    args = parser.parse_args()
    configure_logging("bench", "WARNING")
    raise SystemExit(main(args.attempts, args.settle))
