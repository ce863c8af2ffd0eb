"""A small process supervisor for the local stack: `python -m cardctl.supervisor RUN_DIR`.

It runs the programs listed in `RUN_DIR/supervisor.json` (written by `cardctl stack up`),
each in its own session with its log file, and restarts one that exits with backoff
(1 s doubling to 30 s; back to 1 s after a minute of uptime). What it does is in
`RUN_DIR/supervisor-state.json` (pid, restarts, last exit reason per program), in its own
log and, one line per start and exit, in the program's log.

SIGHUP re-reads the programs file: new programs start, removed ones stop. SIGTERM stops
every program, services first, then the broker and the database, and exits. A program
already running when the supervisor starts (its pid file names a live process with the
program's marker) is adopted and watched, not started twice.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import pwd
import signal
import sys
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

PROGRAMS_FILE = "supervisor.json"
STATE_FILE = "supervisor-state.json"
PID_FILE = "supervisor.pid"
BACKOFF_FIRST_S = 1.0
BACKOFF_MAX_S = 30.0
# A program that ran this long before it exited starts again at the first backoff.
STABLE_AFTER_S = 60.0
STOP_TIMEOUT_S = 30.0


def now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def say(event: str, **fields: Any) -> None:
    """One JSON line on the supervisor's own log (its stdout)."""
    print(json.dumps({"timestamp": now_iso(), "event": event, **fields}), flush=True)


def exit_reason(status: int | None) -> str:
    if status is None:
        return "exited (adopted; status unknown)"
    if status < 0:
        with contextlib.suppress(ValueError):
            return f"killed by {signal.Signals(-status).name}"
        return f"killed by signal {-status}"
    return f"exit status {status}"


def read_pid(path: Path) -> int | None:
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):
        return None


def alive_with(pid: int, marker: str) -> bool:
    """The pid is alive (not a zombie) and its command line holds `marker`."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return False
    return stat[stat.rindex(")") + 2] not in "ZX" and marker in cmdline


async def exited(pid: int) -> None:
    """Wait until `pid` ends, child or not (a pidfd becomes readable when it does)."""
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return
    loop = asyncio.get_running_loop()
    gone: asyncio.Future[None] = loop.create_future()

    def ready() -> None:
        if not gone.done():
            gone.set_result(None)

    loop.add_reader(fd, ready)
    try:
        await gone
    finally:
        loop.remove_reader(fd)
        os.close(fd)


@dataclass
class Program:
    name: str
    argv: list[str]
    log_file: Path
    marker: str
    env: dict[str, str]
    cwd: str | None = None
    user: str | None = None
    stop_signal: int = signal.SIGTERM
    pid: int | None = None
    restarts: int = 0
    last_exit: str | None = None
    started_at: str | None = None
    state: str = "starting"
    stopping: asyncio.Event = field(default_factory=asyncio.Event, repr=False)
    task: asyncio.Task[None] | None = field(default=None, repr=False)

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> Program:
        return cls(name=raw["name"], argv=list(raw["argv"]), log_file=Path(raw["log_file"]),
                   marker=raw["marker"], env=dict(raw.get("env", {})), cwd=raw.get("cwd"),
                   user=raw.get("user"), stop_signal=int(raw.get("stop_signal", signal.SIGTERM)))

    def note(self, line: str) -> None:
        """A line in the program's own log, so its reader sees the supervisor's view too."""
        with contextlib.suppress(OSError), self.log_file.open("a") as log:
            log.write(f"[supervisor {now_iso()}] {self.name}: {line}\n")


class Supervisor:
    def __init__(self, run_dir: Path) -> None:
        self.run_dir = run_dir
        self.programs: dict[str, Program] = {}
        self.stopping = False
        self.reload = False
        self.wake = asyncio.Event()

    # -- files

    def pid_file(self, name: str) -> Path:
        return self.run_dir / f"{name}.pid"

    def wanted(self) -> list[Program]:
        try:
            raw = json.loads((self.run_dir / PROGRAMS_FILE).read_text())
        except (OSError, ValueError) as error:
            say("supervisor.programs_unreadable", error=str(error))
            return list(self.programs.values())
        return [Program.from_json(p) for p in raw.get("programs", [])]

    def save_state(self) -> None:
        state = {"pid": os.getpid(), "updated_at": now_iso(), "programs": {
            p.name: {"pid": p.pid, "state": p.state, "restarts": p.restarts,
                     "last_exit": p.last_exit, "started_at": p.started_at}
            for p in self.programs.values()}}
        partial = self.run_dir / (STATE_FILE + ".partial")
        partial.write_text(json.dumps(state, indent=1) + "\n")
        partial.replace(self.run_dir / STATE_FILE)

    # -- one program

    async def start(self, program: Program) -> asyncio.subprocess.Process:
        base = {k: v for k, v in os.environ.items() if not k.startswith("CARDDESK_")}
        group = pwd.getpwnam(program.user).pw_gid if program.user else None
        with program.log_file.open("ab") as log:
            return await asyncio.create_subprocess_exec(
                *program.argv, stdin=asyncio.subprocess.DEVNULL, stdout=log,
                stderr=asyncio.subprocess.STDOUT, cwd=program.cwd, env={**base, **program.env},
                user=program.user, group=group, extra_groups=[] if program.user else None,
                start_new_session=True)

    async def run(self, program: Program) -> None:
        """Keep `program` running until it is stopped; restart it with backoff."""
        delay = BACKOFF_FIRST_S
        adopted = read_pid(self.pid_file(program.name))
        while not program.stopping.is_set():
            began = time.monotonic()
            process: asyncio.subprocess.Process | None = None
            if adopted is not None and alive_with(adopted, program.marker):
                program.pid = adopted
                say("supervisor.adopted", program=program.name, pid=adopted)
            else:
                try:
                    process = await self.start(program)
                except OSError as error:
                    program.pid = None
                    program.last_exit = f"could not start: {error}"
                else:
                    program.pid = process.pid
                    self.pid_file(program.name).write_text(f"{process.pid}\n")
                    say("supervisor.started", program=program.name, pid=process.pid,
                        restarts=program.restarts)
                    program.note(f"started, pid {process.pid}")
            adopted = None
            if program.pid is not None:
                program.state, program.started_at = "running", now_iso()
                self.save_state()
                status: int | None = None
                if process is not None:
                    status = await process.wait()
                else:
                    await exited(program.pid)
                program.last_exit = exit_reason(status)
            if program.stopping.is_set():
                break
            program.restarts += 1
            if time.monotonic() - began >= STABLE_AFTER_S:
                delay = BACKOFF_FIRST_S
            program.state = "backoff"
            say("supervisor.exited", program=program.name, pid=program.pid,
                reason=program.last_exit, restarts=program.restarts, restart_in_s=delay)
            program.note(f"{program.last_exit}; restart {program.restarts} in {delay:g}s")
            program.pid = None
            self.save_state()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(program.stopping.wait(), delay)
            delay = min(delay * 2, BACKOFF_MAX_S)

    async def stop(self, program: Program) -> None:
        program.stopping.set()
        pid = program.pid
        if pid is not None and alive_with(pid, program.marker):
            say("supervisor.stopping", program=program.name, pid=pid)
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, program.stop_signal)
            try:
                await asyncio.wait_for(exited(pid), STOP_TIMEOUT_S)
            except TimeoutError:
                say("supervisor.killing", program=program.name, pid=pid)
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(pid, signal.SIGKILL)
        if program.task is not None:
            with contextlib.suppress(asyncio.TimeoutError, asyncio.CancelledError):
                await asyncio.wait_for(program.task, 10.0)
        program.state, program.pid = "stopped", None
        self.pid_file(program.name).unlink(missing_ok=True)
        program.note("stopped")

    # -- all programs

    def apply(self) -> list[Program]:
        """Start the wanted programs not yet running; return the ones no longer wanted."""
        wanted = self.wanted()
        names = {p.name for p in wanted}
        for program in wanted:
            if program.name not in self.programs:
                self.programs[program.name] = program
                program.task = asyncio.create_task(self.run(program))
        return [p for name, p in self.programs.items() if name not in names]

    async def serve(self) -> None:
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, self._signalled, "stop")
        loop.add_signal_handler(signal.SIGINT, self._signalled, "stop")
        loop.add_signal_handler(signal.SIGHUP, self._signalled, "reload")
        say("supervisor.running", pid=os.getpid())
        self.reload = True
        while not self.stopping:
            if self.reload:
                self.reload = False
                gone = self.apply()
                await asyncio.gather(*(self.stop(program) for program in gone))
                for program in gone:
                    del self.programs[program.name]
                self.save_state()
            await self.wake.wait()
            self.wake.clear()
        await self.stop_all()

    def _signalled(self, what: str) -> None:
        if what == "stop":
            self.stopping = True
        else:
            self.reload = True
        self.wake.set()

    async def stop_all(self) -> None:
        """Services first (together), then the infrastructure, last started first."""
        programs = list(self.programs.values())
        infra = [p for p in programs if p.name in ("postgres", "kafka")]
        services = [p for p in programs if p not in infra]
        await asyncio.gather(*(self.stop(p) for p in services))
        for program in reversed(infra):
            await self.stop(program)
        self.save_state()
        say("supervisor.stopped")


def main() -> None:
    run_dir = Path(sys.argv[1]).resolve()
    (run_dir / PID_FILE).write_text(f"{os.getpid()}\n")
    try:
        asyncio.run(Supervisor(run_dir).serve())
    finally:
        (run_dir / PID_FILE).unlink(missing_ok=True)


if __name__ == "__main__":
    main()
