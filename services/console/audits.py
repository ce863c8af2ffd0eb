"""Audit runs started from the console: `cardctl audit verify` and `replay`, in the console
process, one at a time, with their progress readable while they run."""

from __future__ import annotations

import asyncio
import io
import secrets
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Literal

import structlog
from rich.console import Console
from rich.progress import Progress

from cardctl.audit import replay_log, verify_log
from shared.kafka import client_options
from shared.settings import CardDeskSettings

log = structlog.get_logger()

AuditKind = Literal["verify", "replay"]


@dataclass
class AuditJob:
    job_id: str
    kind: AuditKind
    citizen_ref: str | None
    started_by: str
    started_at: datetime
    progress: Progress
    state: Literal["running", "passed", "failed", "error"] = "running"
    summary: list[str] = field(default_factory=list)
    finished_at: datetime | None = None

    @property
    def done_total(self) -> tuple[float, float | None]:
        tasks = self.progress.tasks
        if not tasks:
            return 0, None
        return tasks[0].completed, tasks[0].total

    @property
    def percent(self) -> int:
        done, total = self.done_total
        if self.state != "running":
            return 100
        return int(100 * done / total) if total else 0


class AuditBusyError(Exception):
    """An audit is running already: the log is read once at a time."""


class AuditRunner:
    def __init__(self, settings: CardDeskSettings, status_schema: str,
                 clock: Callable[[], datetime]) -> None:
        self.settings = settings
        self.status_schema = status_schema
        self.clock = clock
        self.jobs: dict[str, AuditJob] = {}
        self._task: asyncio.Task[None] | None = None
        self._task_of: dict[str, asyncio.Task[None]] = {}

    async def wait(self, job: AuditJob) -> None:
        """Until `job` has finished (the caller bounds the wait)."""
        await asyncio.shield(self._task_of[job.job_id])

    def start(self, kind: AuditKind, citizen_ref: str | None, staff_id: str) -> AuditJob:
        if self._task is not None and not self._task.done():
            raise AuditBusyError
        progress = Progress(console=Console(file=io.StringIO()), auto_refresh=False)
        job = AuditJob(secrets.token_hex(8), kind, citizen_ref, staff_id, self.clock(), progress)
        self.jobs[job.job_id] = job
        self._task = asyncio.create_task(self._run(job))
        self._task_of[job.job_id] = self._task
        log.info("console.audit_started", staff_id=staff_id, kind=kind, job_id=job.job_id,
                 citizen_ref=citizen_ref)
        return job

    async def _run(self, job: AuditJob) -> None:
        try:
            ok, summary = await (self._verify(job) if job.kind == "verify"
                                 else self._replay(job))
            job.state, job.summary = ("passed" if ok else "failed"), summary
        except Exception as exc:  # the page shows why; the console stays up
            log.exception("console.audit_error", job_id=job.job_id)
            job.state, job.summary = "error", [f"{type(exc).__name__}: {exc}"]
        job.finished_at = self.clock()
        log.info("console.audit_finished", staff_id=job.started_by, job_id=job.job_id,
                 state=job.state)

    def _auditor(self) -> dict[str, Any]:
        """An audit reads the event topics as the console's own principal, which may read
        them (and nothing else) for the auditors who use it."""
        return client_options(self.settings)

    async def _verify(self, job: AuditJob) -> tuple[bool, list[str]]:
        report = await verify_log(self.settings.kafka_bootstrap, security=self._auditor(),
                                  progress=job.progress)
        lines = [f"{report.streams} streams, {report.events} events, "
                 f"{report.duplicates} benign duplicates, {len(report.failures)} failures"]
        lines += [f"missing topic {t}" for t in report.missing_topics]
        lines += [f"FAIL {f.describe()}" for f in report.failures[:50]]
        return report.ok, lines

    async def _replay(self, job: AuditJob) -> tuple[bool, list[str]]:
        report = await replay_log(self.settings.kafka_bootstrap, self.settings.database_url,
                                  schema=self.status_schema, citizen=job.citizen_ref,
                                  security=self._auditor(), progress=job.progress)
        lines = [f"{report.messages} messages, {report.events} events applied, "
                 f"{report.duplicates} duplicates",
                 f"{len(report.agreed)} citizen(s) agree with the live projection, "
                 f"{len(report.disagreeing)} differ"]
        lines += [f"missing topic {t}" for t in report.missing_topics]
        lines += [f"unknown citizen {ref[:12]}…" for ref in report.unknown]
        lines += [d.describe() for d in report.differences[:50]]
        return report.ok, lines
