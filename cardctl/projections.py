"""`cardctl projections`: rebuild the status read models from the event topics."""

from __future__ import annotations

from typing import Annotated

import typer
import uvloop
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
)
from rich.table import Table

from services.status.rebuild import Progress as RebuildProgress
from services.status.rebuild import RebuildReport, RebuildSettings, rebuild
from shared.kafka import as_principal

projections_app = typer.Typer(help="The status read models (card_status, card_timeline).",
                              no_args_is_help=True)
console = Console()


def _print_report(report: RebuildReport) -> None:
    table = Table("phase", "events", "seconds", "events/s", title="projection rebuild")
    for phase in report.phases:
        table.add_row(phase.name, f"{phase.events:,}", f"{phase.seconds:.2f}",
                      f"{phase.rate:,.0f}")
    table.add_row("[bold]total[/]", f"{report.events:,}", f"{report.seconds:.2f}",
                  f"{report.rate:,.0f}")
    console.print(table)
    console.print(f"{report.applied:,} events applied for {report.citizens:,} citizens; "
                  f"{report.duplicates:,} duplicates and {report.skipped:,} unprocessable "
                  "messages skipped (as the live consumer does); loaded in "
                  f"{report.load_processes} process{'es' if report.load_processes > 1 else ''}")
    if report.old_tables:
        console.print(f"kept the replaced tables: {', '.join(report.old_tables)}")


async def run_rebuild(settings: RebuildSettings, *, keep_old: bool,
                      allow_shrink: bool = False) -> RebuildReport:
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
               TextColumn("{task.fields[rate]:>10,.0f} events/s"), TimeElapsedColumn())
    with Progress(*columns, console=console, transient=False) as bar:
        tasks: dict[str, TaskID] = {}

        def show(step: RebuildProgress) -> None:
            if step.phase not in tasks:
                tasks[step.phase] = bar.add_task(step.phase, total=max(step.target, 1), rate=0.0)
            rate = step.events / step.elapsed_s if step.elapsed_s > 0 else 0.0
            total = max(step.target, step.events, 1)
            bar.update(tasks[step.phase], completed=step.events or (total if step.phase
                                                                   != "load" else 0),
                       total=total, rate=rate)

        return await rebuild(settings, keep_old=keep_old, progress=show,
                             allow_shrink=allow_shrink)


@projections_app.command("rebuild")
def rebuild_command(
    keep_old: Annotated[bool, typer.Option(
        "--keep-old", help="Keep the replaced tables as <table>_old_<time>.")] = False,
    allow_shrink: Annotated[bool, typer.Option(
        "--allow-shrink", help="Swap even if live rows are missing from the rebuilt ones.",
    )] = False,
) -> None:
    """Replay the event topics from offset 0 into fresh tables; swap them in atomically.

    The status service keeps running and writing; the live tables change only at the swap."""
    # The rebuild reads what the status projection reads, as the status principal.
    settings = as_principal(RebuildSettings(), "status")
    console.print(f"rebuilding {settings.status_schema}.card_status and card_timeline from "
                  f"{', '.join(settings.consumed_topics().values())}")
    try:
        report = uvloop.run(run_rebuild(settings, keep_old=keep_old,
                                         allow_shrink=allow_shrink))
    except Exception as error:  # any failure before the swap's commit changes nothing
        console.print(f"[red]rebuild failed, the live tables are untouched:[/] {error}")
        raise typer.Exit(1) from error
    _print_report(report)
