"""`cardctl staff add|disable|list`: the bureau console's staff accounts."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Annotated, TypeVar

import asyncpg
import typer
import uvloop
from rich.console import Console
from rich.table import Table

from services.console.main import staff_directory
from services.console.settings import ConsoleSettings
from services.console.staff import Role, StaffDirectory, StaffError

staff_app = typer.Typer(help="Staff accounts of the bureau console.", no_args_is_help=True)
console = Console(highlight=False)
T = TypeVar("T")


def _with_directory(work: Callable[[StaffDirectory], Awaitable[T]]) -> T:
    async def run() -> T:
        settings = ConsoleSettings()
        pool = await asyncpg.create_pool(settings.database_url, min_size=1, max_size=2,
                                         timeout=10)
        try:
            directory = staff_directory(pool, settings)
            await directory.migrate()
            return await work(directory)
        finally:
            await pool.close()

    return uvloop.run(run())


@staff_app.command("add")
def add(
    staff_id: Annotated[str, typer.Argument(help="Sign-in id: a-z, 0-9, '.', '_', '-'.")],
    role: Annotated[Role, typer.Option("--role", help="What the account may do.")],
    password: Annotated[str, typer.Option(
        "--password", prompt=True, hide_input=True, confirmation_prompt=True,
        help="At least 12 characters (asked for when not given).")],
) -> None:
    """Add a staff account (the password is stored as an Argon2id hash)."""
    try:
        _with_directory(lambda d: d.add(staff_id, role, password, datetime.now(UTC)))
    except StaffError as error:
        console.print(f"refused: {error}")
        raise typer.Exit(1) from error
    console.print(f"added {staff_id} ({role.value})")


@staff_app.command("disable")
def disable(staff_id: Annotated[str, typer.Argument()]) -> None:
    """Disable an account and end its sessions at once."""
    try:
        _with_directory(lambda d: d.disable(staff_id))
    except StaffError as error:
        console.print(f"refused: {error}")
        raise typer.Exit(1) from error
    console.print(f"disabled {staff_id}")


@staff_app.command("list")
def list_staff() -> None:
    """Every account with its role and whether it is disabled."""
    members = _with_directory(lambda d: d.members())
    table = Table(title="Console staff")
    for column in ("staff id", "role", "disabled", "created"):
        table.add_column(column)
    for m in members:
        table.add_row(m.staff_id, m.role.value, "yes" if m.disabled else "no",
                      m.created_at.isoformat(timespec="seconds"))
    console.print(table)
