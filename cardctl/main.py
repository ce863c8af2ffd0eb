"""`cardctl`: the operator's command line for Card Desk."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import httpx
import typer
import uvloop
from rich.console import Console
from rich.table import Table

from cardctl import operations
from cardctl.audit import audit_app
from cardctl.channel import ChannelChoiceError, pick_channel
from cardctl.erase import erase_command
from cardctl.keys import keys_app
from cardctl.projections import projections_app
from cardctl.stack import (
    Stack,
    StackError,
    contract_topics,
    ensure_topics,
    provision,
    run_sync,
    service_ports,
)
from cardctl.staff import staff_app
from cardctl.top import run_top
from services.status.settings import StatusSettings
from shared.channels import ChannelRegistry
from shared.identity import citizen_ref, is_valid_id_number
from shared.kafka import ADMIN, as_principal, credentials_path
from shared.masking import mask_card_no, mask_id_number, mask_name
from shared.settings import CardDeskSettings

app = typer.Typer(help="Operate Card Desk: the local stack, topics and more.", no_args_is_help=True)
stack_app = typer.Typer(
    help="Kafka, PostgreSQL and the services on this machine.", no_args_is_help=True
)
topics_app = typer.Typer(help="The Kafka topics of the message contract.", no_args_is_help=True)
app.add_typer(stack_app, name="stack")
app.add_typer(topics_app, name="topics")
kafka_app = typer.Typer(help="Kafka users and ACLs.", no_args_is_help=True)
app.add_typer(kafka_app, name="kafka")
app.add_typer(staff_app, name="staff")

console = Console()


def _stack() -> Stack:
    return Stack(CardDeskSettings(), report=lambda line: console.print(f"[dim]•[/] {line}"))


def _print_status(stack: Stack) -> None:
    table = Table(title=f"Card Desk stack ({stack.state_dir})")
    for column in ("component", "pid", "alive", "healthy", "restarts"):
        table.add_column(column)
    table.add_column("last exit / failing checks", overflow="fold")
    table.add_column("log file", overflow="fold")
    supervisor = stack.supervisor_pid()
    for row in stack.status():
        table.add_row(
            row.name,
            str(row.pid) if row.pid else "-",
            "[green]yes[/]" if row.alive else "[red]no[/]",
            "[green]yes[/]" if row.healthy else "[red]no[/]",
            str(row.restarts),
            "; ".join(part for part in (row.last_exit, row.detail) if part) or "-",
            str(row.log_file),
        )
    console.print(table)
    console.print(f"supervisor: pid {supervisor}" if supervisor
                  else "supervisor: [red]not running[/] (nothing restarts a process that dies)")


@stack_app.command("up")
def stack_up(
    services: Annotated[
        bool, typer.Option(help="Also start the Card Desk services, not only Kafka and PostgreSQL.")
    ] = True,
    instances: Annotated[
        int | None, typer.Option(min=1, help="Processes per service (default: as now, else 1); "
                                 "at most CARDDESK_PARTITIONS.")
    ] = None,
) -> None:
    """Start whatever is not running yet under the supervisor, restart services that run
    but are unhealthy, wait until all are healthy and create the topics."""
    stack = _stack()
    try:
        started = stack.up(services=services, instances=instances)
    except StackError as error:
        console.print(f"[red]stack up failed:[/] {error}")
        raise typer.Exit(1) from error
    console.print(f"started: {', '.join(started)}" if started else "already running")
    _print_status(stack)
    console.print(f"logs: {stack.logs_dir}")


@stack_app.command("down")
def stack_down(
    purge: Annotated[
        bool, typer.Option("--purge", help="Also delete the local Kafka and PostgreSQL data.")
    ] = False,
) -> None:
    """Stop everything `up` started (SIGTERM, then SIGKILL after a timeout)."""
    stack = _stack()
    try:
        stopped = stack.down(purge=purge)
    except StackError as error:
        console.print(f"[red]stack down failed:[/] {error}")
        raise typer.Exit(1) from error
    console.print(f"stopped: {', '.join(stopped)}" if stopped else "nothing was running")


@stack_app.command("status")
def stack_status() -> None:
    """List the components with pid, liveness, health and log file."""
    _print_status(_stack())


@topics_app.command("create")
def topics_create() -> None:
    """Create the missing topics on CARDDESK_KAFKA_BOOTSTRAP (used by docker compose)."""
    settings = as_principal(CardDeskSettings(), ADMIN)
    topics = contract_topics(settings)
    created = run_sync(lambda: ensure_topics(settings, topics))
    console.print(f"{len(created)} created, {len(topics) - len(created)} already present")


@kafka_app.command("provision")
def kafka_provision(
    credentials: Annotated[Path | None, typer.Option(
        "--credentials", help="The principals' credentials, as credentials.json "
        "(default: the local stack's).")] = None,
) -> None:
    """Create topics, SCRAM users and ACLs (DESIGN 8) as the administrator
    (CARDDESK_KAFKA_USER/PASSWORD, else the local stack's): the init step of docker compose,
    or after editing the channels file while the stack runs."""
    settings = as_principal(CardDeskSettings(), ADMIN)
    try:
        provision(settings, credentials or credentials_path(settings), settings.channels_file,
                  lambda line: console.print(f"[dim]•[/] {line}"))
    except StackError as error:
        console.print(f"[red]{error}[/]")
        raise typer.Exit(1) from error


@topics_app.command("list")
def topics_list() -> None:
    """Show the topics of the contract and their configuration."""
    table = Table("topic", "partitions", "config")
    for topic in contract_topics(CardDeskSettings()):
        config = ", ".join(f"{k}={v}" for k, v in topic.config.items())
        table.add_row(topic.name, str(topic.partitions), config or "-")
    console.print(table)


@app.command("seed")
def seed_command(
    citizens: Annotated[int, typer.Option("--citizens", min=1, help="How many to create.")] = 10,
    out: Annotated[Path, typer.Option("--out", help="JSON lines for a channel simulator.")] = Path(
        "citizens.jsonl"),
    seed_value: Annotated[int | None, typer.Option("--seed", help="Random seed.")] = None,
    channel: Annotated[str | None, typer.Option(
        "--channel", help="The bureau channel that imports the cards (default: the first).",
    )] = None,
) -> None:
    """Create synthetic citizens: registry entries with a face template and initial cards."""
    settings = CardDeskSettings()
    try:
        uvloop.run(operations.seed(settings, citizens, out, seed_value=seed_value,
                                   report=lambda line: console.print(f"[dim]•[/] {line}"),
                                   channel=channel))
    except ChannelChoiceError as error:
        console.print(f"[red]{error}[/]")
        raise typer.Exit(2) from error


@app.command("demo")
def demo_command(
    channel: Annotated[str | None, typer.Option(
        "--channel", help="The citizen channel to act as (default: the first in the file).",
    )] = None,
    bureau_channel: Annotated[str | None, typer.Option(
        "--bureau-channel", help="The bureau channel to act as (default: the first).",
    )] = None,
) -> None:
    """Seed one citizen and take them from loss report to a collected new card."""
    settings = CardDeskSettings()
    out = settings.state_dir / "demo-citizen.jsonl"
    say = lambda line: console.print(f"[dim]•[/] {line}")  # noqa: E731
    channels = ChannelRegistry.from_file(settings.channels_file)
    try:
        pick_channel(channels, channel, bureau=False)
        pick_channel(channels, bureau_channel, bureau=True)
    except ChannelChoiceError as error:
        console.print(f"[red]{error}[/]")
        raise typer.Exit(2) from error
    [citizen] = uvloop.run(operations.seed(settings, 1, out, report=say, channel=bureau_channel))
    console.print(f"demo citizen {mask_name(citizen.name)} {mask_id_number(citizen.id_number)}, "
                  f"card {mask_card_no(citizen.card_no)}")
    session, row, timeline = uvloop.run(operations.demo(
        settings, citizen, report=say, channel=channel, bureau_channel=bureau_channel))
    _print_card(row)
    _print_timeline(session.citizen_ref, timeline)
    if row["status"] != "ACTIVE" or row["card_no_masked"] == mask_card_no(citizen.card_no):
        console.print("[red]the demo did not end with a new active card[/]")
        raise typer.Exit(1)
    _print_console_address()


def _print_console_address() -> None:
    """Where the bureau console is, and (development only) a reviewer to sign in as."""
    from services.console.main import DEV_STAFF
    from services.console.settings import ConsoleSettings

    settings = ConsoleSettings()
    console.print(f"bureau console: http://localhost:{settings.console_port}/", markup=False)
    if settings.env == "development":
        _role, password = DEV_STAFF["dev-reviewer"]
        console.print(f"development reviewer: dev-reviewer / {password}"
                      " (also dev-counter, dev-auditor, dev-admin: dev-console-<role>)",
                      markup=False)


def _resolve_ref(citizen: str, settings: CardDeskSettings) -> str:
    """A citizen_ref as given, or computed from an ID number (never printed back)."""
    if is_valid_id_number(citizen):
        return citizen_ref(settings.citizen_ref_pepper.get_secret_value(), citizen)
    return citizen


def _get(settings: CardDeskSettings, path: str) -> dict[str, Any] | None:
    try:
        response = httpx.get(f"{operations.status_url(settings)}{path}", timeout=10.0,
                             headers={"Authorization": f"Bearer {StatusSettings().caller_key()}"})
    except httpx.HTTPError as error:
        console.print(f"[red]the status API does not answer:[/] {error}")
        raise typer.Exit(1) from error
    if response.status_code == 404:
        return None
    if response.status_code in (400, 401, 429):
        console.print(f"[red]the status API refused ({response.status_code}):[/] "
                      f"{response.json().get('message', '')}"
                      + (" (set CARDDESK_QUERY_API_KEY)" if response.status_code == 401 else ""))
        raise typer.Exit(1)
    response.raise_for_status()
    return response.json()  # type: ignore[no-any-return]


def _print_card(row: dict[str, Any]) -> None:
    table = Table("field", "value", title="card status")
    for key, value in row.items():
        table.add_row(key, "-" if value is None else str(value))
    console.print(table)


def _print_timeline(ref: str, entries: list[dict[str, Any]]) -> None:
    table = Table("#", "time", "event", "description", title=f"timeline of {ref[:12]}…")
    for entry in entries:
        table.add_row(str(entry["seq"]), str(entry["occurred_at"]), entry["type"],
                      entry["description"])
    console.print(table)


@app.command("status")
def status_command(
    citizen: Annotated[str, typer.Argument(help="citizen_ref, or an ID number")],
) -> None:
    """Show a citizen's card status (masked)."""
    settings = CardDeskSettings()
    row = _get(settings, f"/v1/citizens/{_resolve_ref(citizen, settings)}/card")
    if row is None:
        console.print("no card status for that citizen")
        raise typer.Exit(1)
    _print_card(row)


@app.command("timeline")
def timeline_command(
    citizen: Annotated[str, typer.Argument(help="citizen_ref, or an ID number")],
) -> None:
    """Show every event of a citizen, in order, with masked descriptions."""
    settings = CardDeskSettings()
    ref = _resolve_ref(citizen, settings)
    body = _get(settings, f"/v1/citizens/{ref}/timeline")
    _print_timeline(ref, body["entries"] if body else [])


app.command("erase")(erase_command)


@app.command("top")
def top_command(
    interval: Annotated[float, typer.Option(min=0.2, help="Seconds between refreshes.")] = 2.0,
    iterations: Annotated[int, typer.Option(min=0, help="Frames to show; 0: until Ctrl-C.")] = 0,
) -> None:
    """A live view of every service: rates, latency, lag, outbox and DLQ, from /metrics."""
    settings = CardDeskSettings()
    targets = {name: f"http://{settings.http_host}:{port}/metrics"
               for name, port in service_ports(settings).items()}
    run_top(targets, interval_s=interval, iterations=iterations, console=console)
app.add_typer(audit_app, name="audit")


app.add_typer(projections_app, name="projections")
app.add_typer(keys_app, name="keys")

if __name__ == "__main__":
    app()
