"""`cardctl`: the operator's command line for Card Desk."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from cardctl.stack import Stack, StackError, ensure_topics, run_sync
from shared.settings import CardDeskSettings
from shared.topics import all_topics

app = typer.Typer(help="Operate Card Desk: the local stack, topics and more.", no_args_is_help=True)
stack_app = typer.Typer(
    help="Kafka, PostgreSQL and the services on this machine.", no_args_is_help=True
)
topics_app = typer.Typer(help="The Kafka topics of the message contract.", no_args_is_help=True)
app.add_typer(stack_app, name="stack")
app.add_typer(topics_app, name="topics")

console = Console()


def _stack() -> Stack:
    return Stack(CardDeskSettings(), report=lambda line: console.print(f"[dim]•[/] {line}"))


def _print_status(stack: Stack) -> None:
    table = Table(title=f"Card Desk stack ({stack.state_dir})")
    for column in ("component", "pid", "alive", "healthy"):
        table.add_column(column)
    table.add_column("log file", overflow="fold")
    for row in stack.status():
        table.add_row(
            row.name,
            str(row.pid) if row.pid else "-",
            "[green]yes[/]" if row.alive else "[red]no[/]",
            "[green]yes[/]" if row.healthy else "[red]no[/]",
            str(row.log_file),
        )
    console.print(table)


@stack_app.command("up")
def stack_up(
    services: Annotated[
        bool, typer.Option(help="Also start the Card Desk services, not only Kafka and PostgreSQL.")
    ] = True,
) -> None:
    """Start whatever is not running yet, wait until healthy and create the topics."""
    stack = _stack()
    try:
        started = stack.up(services=services)
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
    settings = CardDeskSettings()
    topics = all_topics(settings.partitions)
    created = run_sync(lambda: ensure_topics(settings.kafka_bootstrap, topics))
    console.print(f"{len(created)} created, {len(topics) - len(created)} already present")


@topics_app.command("list")
def topics_list() -> None:
    """Show the topics of the contract and their configuration."""
    table = Table("topic", "partitions", "config")
    for topic in all_topics(CardDeskSettings().partitions):
        config = ", ".join(f"{k}={v}" for k, v in topic.config.items())
        table.add_row(topic.name, str(topic.partitions), config or "-")
    console.print(table)


if __name__ == "__main__":
    app()
