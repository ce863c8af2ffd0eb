"""The local stack without Docker: Kafka (KRaft, single node) and a throwaway PostgreSQL.

Everything lives under `settings.state_dir`: the cached Kafka jars, the data directories,
pid files and logs. Processes run in their own process group so that `down` can stop
each one with everything it spawned.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import functools
import json
import os
import pwd
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar
from urllib.parse import unquote, urlsplit

import asyncpg
import httpx
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.admin.config_resource import (
    ConfigResource,
    ConfigResourceType,
)

from cardctl.kafka_access import (
    GENERATED_PRINCIPALS,
    AccessError,
    access_plan,
    apply_access,
    describe_acls,
)
from cardctl.supervisor import PID_FILE as SUPERVISOR_PID_FILE
from cardctl.supervisor import PROGRAMS_FILE, STATE_FILE
from shared.channels import ChannelRegistry
from shared.kafka import (
    ADMIN,
    as_principal,
    client_options,
    credentials_path,
    read_credentials,
    with_credentials,
)
from shared.settings import PROJECT_ROOT, CardDeskSettings
from shared.topics import SERVICES, TopicSpec, all_topics

T = TypeVar("T")

KAFKA_POM = PROJECT_ROOT / "infra" / "kafka" / "pom.xml"
PG_SUPERUSER = "postgres"
STOP_TIMEOUT_S = 30.0
START_TIMEOUT_S = 90.0
# How long new SCRAM users and ACLs may take to reach the broker from the controller.
ACCESS_PROPAGATION_TIMEOUT_S = 30.0
# The controller listener is reachable from this machine only.
CONTROLLER_HOST = "127.0.0.1"
# `up` restarts a running service whose /health fails only once it has run this long.
RESTART_GRACE_S = 20.0
SUPERVISOR_MODULE = "cardctl.supervisor"


class StackError(RuntimeError):
    """The stack could not be brought to the requested state; the message says why."""


# ----------------------------------------------------------------------------- addresses


@dataclass(frozen=True)
class PgTarget:
    host: str
    port: int
    user: str
    dbname: str


def kafka_address(settings: CardDeskSettings) -> tuple[str, int]:
    """Host and port of the first bootstrap server, which the local broker listens on."""
    first = settings.kafka_bootstrap.split(",")[0].strip()
    host, _, port = first.rpartition(":")
    if not host or not port.isdigit():
        raise StackError(f"CARDDESK_KAFKA_BOOTSTRAP must be host:port, got {first!r}")
    return host, int(port)


def pg_target(settings: CardDeskSettings) -> PgTarget:
    url = urlsplit(settings.database_url)
    if url.scheme not in ("postgresql", "postgres"):
        raise StackError(f"CARDDESK_DATABASE_URL must be a postgresql:// URL, got {url.scheme!r}")
    return PgTarget(
        host=url.hostname or "127.0.0.1",
        port=url.port or 5432,
        user=unquote(url.username or PG_SUPERUSER),
        dbname=unquote(url.path.lstrip("/")) or unquote(url.username or PG_SUPERUSER),
    )


# ----------------------------------------------------------------------------- health checks


def run_sync(coro_factory: Callable[[], Awaitable[T]]) -> T:
    """Run a coroutine to completion from sync code, even when the caller owns an event loop."""

    async def main() -> T:
        return await coro_factory()

    # A fresh loop in a worker thread never disturbs a loop the caller (say pytest) has set.
    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
        return pool.submit(asyncio.run, main()).result()


def port_open(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(1.0)
        return sock.connect_ex((host, port)) == 0


async def postgres_answers(dsn: str, timeout_s: float = 3.0) -> bool:
    try:
        conn = await asyncpg.connect(dsn, timeout=timeout_s)
    except (TimeoutError, OSError, asyncpg.PostgresError):
        return False
    try:
        await conn.fetchval("SELECT 1")
    finally:
        await conn.close()
    return True


async def _open_admin(settings: CardDeskSettings, timeout_s: float) -> AIOKafkaAdminClient:
    admin = AIOKafkaAdminClient(
        bootstrap_servers=settings.kafka_bootstrap, request_timeout_ms=int(timeout_s * 1000),
        **client_options(settings),
    )
    await asyncio.wait_for(admin.start(), timeout_s)
    return admin


async def kafka_answers(settings: CardDeskSettings, timeout_s: float = 5.0) -> bool:
    """Whether the broker answers a client with `settings`' credentials."""
    host, _, port = settings.kafka_bootstrap.split(",")[0].strip().rpartition(":")
    # aiokafka logs an error for every refused connection; a closed port needs no client.
    if not port_open(host, int(port)):
        return False
    try:
        admin = await _open_admin(settings, timeout_s)
    except Exception:  # aiokafka raises several unrelated types while the broker boots
        return False
    try:
        await asyncio.wait_for(admin.list_topics(), timeout_s)
    except Exception:
        return False
    finally:
        await admin.close()
    return True


def contract_topics(settings: CardDeskSettings) -> list[TopicSpec]:
    """Every topic of the contract for these settings: one reply topic per channel of the
    channels file."""
    channels = ChannelRegistry.from_file(settings.channels_file)
    return all_topics(settings.partitions, (channel.channel_id for channel in channels))


async def ensure_topics(settings: CardDeskSettings, topics: Sequence[TopicSpec]) -> list[str]:
    """Create the topics that are missing and bring existing ones' configuration in line;
    returns the names it created. `settings` must carry credentials allowed to (admin)."""
    admin = await _open_admin(settings, 15.0)
    try:
        existing = set(await admin.list_topics())
        missing = [t for t in topics if t.name not in existing]
        present = [t for t in topics if t.name in existing and t.config]
        if present:
            await admin.alter_configs([
                ConfigResource(ConfigResourceType.TOPIC, t.name, configs=dict(t.config))
                for t in present
            ])
        if missing:
            await admin.create_topics(
                [
                    NewTopic(
                        name=t.name,
                        num_partitions=t.partitions,
                        replication_factor=t.replication_factor,
                        topic_configs=dict(t.config),
                    )
                    for t in missing
                ]
            )
        return [t.name for t in missing]
    finally:
        await admin.close()


async def ensure_access(settings: CardDeskSettings, users: dict[str, str],
                        channel_ids: Sequence[str]) -> tuple[int, int, int]:
    """Bring the broker's SCRAM users and ACLs in line with the plan (admin credentials);
    returns (ACLs created, ACLs deleted, users deleted)."""
    admin = await _open_admin(settings, 15.0)
    try:
        plan = access_plan(channel_ids)
        changes = await apply_access(admin, users, plan)
        # The controller took the change; the broker applies it from the metadata log a
        # moment later. A service started before then would be refused and exit.
        deadline = asyncio.get_running_loop().time() + ACCESS_PROPAGATION_TIMEOUT_S
        while not plan <= await describe_acls(admin):
            if asyncio.get_running_loop().time() > deadline:
                raise StackError("the broker did not apply the ACLs in time")
            await asyncio.sleep(0.2)
    finally:
        await admin.close()
    for username, password in users.items():
        principal = with_credentials(settings, username, password)
        while not await kafka_answers(principal, timeout_s=5.0):
            if asyncio.get_running_loop().time() > deadline:
                raise StackError(f"Kafka user {username!r} cannot log in")
            await asyncio.sleep(0.2)
    return changes


def provision(admin: CardDeskSettings, credentials_file: Path, channels_file: Path,
              report: Callable[[str], None]) -> None:
    """Topics, then users and ACLs, as `admin` (a superuser): every principal of
    `credentials_file` (the services, the auditor; the file's format is credentials.json's)
    and every channel of `channels_file` with its `kafka_password`. Idempotent; users and
    ACLs that are no longer planned (a channel left the file) are deleted."""
    channels = list(ChannelRegistry.from_file(channels_file))
    topics = all_topics(admin.partitions, (c.channel_id for c in channels))
    created = run_sync(lambda: ensure_topics(admin, topics))
    report(f"topics: {len(created)} created" if created else "topics: all present")
    if admin.kafka_user is None:
        return  # a broker without authentication: no users to manage
    missing_password = [c.channel_id for c in channels if not c.kafka_password]
    if missing_password:
        raise StackError(f"channels without kafka_password: {', '.join(missing_password)}")
    users = dict(read_credentials(credentials_file).values())
    users.update({c.channel_id: c.kafka_password for c in channels if c.kafka_password})
    try:
        added, removed, gone = run_sync(lambda: ensure_access(
            admin, users, [c.channel_id for c in channels]))
    except AccessError as error:
        raise StackError(str(error)) from error
    report(f"kafka access: {len(users)} users, {added} ACLs added, {removed} removed"
           + (f", {gone} users no longer planned deleted" if gone else ""))


def service_ports(settings: CardDeskSettings, instance: int = 1) -> dict[str, int]:
    """Where each service serves `/health`: status on CARDDESK_HTTP_PORT, the others after it;
    instance k (from 1) of each sits 5 × (k - 1) ports further."""
    base = settings.http_port + (1 + len(SERVICES)) * (instance - 1)
    return {"status": base, **{name: base + 1 + i for i, name in enumerate(SERVICES)}}


async def http_health(host: str, port: int, timeout_s: float = 3.0) -> bool:
    return (await http_health_detail(host, port, timeout_s))[0]


async def http_health_detail(host: str, port: int, timeout_s: float = 3.0) -> tuple[bool, str]:
    """(healthy, the checks that fail as `name: problem`, or why /health did not answer)."""
    try:
        async with httpx.AsyncClient(timeout=timeout_s) as client:
            response = await client.get(f"http://{host}:{port}/health")
    except httpx.HTTPError as error:
        return False, f"/health: {type(error).__name__}"
    if response.is_success:
        return True, ""
    try:
        checks = response.json().get("checks", {})
    except ValueError:
        checks = {}
    failing = [f"{name}: {problem}" for name, problem in checks.items() if problem != "ok"]
    return False, "; ".join(failing) or f"/health: {response.status_code}"


# ----------------------------------------------------------------------------- processes


@dataclass(frozen=True)
class ProcessSpec:
    """A long-running process of the stack and how to tell it is up."""

    name: str
    argv: Sequence[str]
    log_file: Path
    # A substring of /proc/<pid>/cmdline, so a recycled pid is not taken for ours.
    marker: str
    health: Callable[[], Awaitable[bool]]
    env: dict[str, str] = field(default_factory=dict)
    user: str | None = None
    cwd: Path | None = None
    stop_signal: signal.Signals = signal.SIGTERM

    def program(self) -> dict[str, object]:
        """The supervisor's entry for this process; it carries the caller's CARDDESK_*
        settings, so services started now see the environment of whoever started them."""
        settings = {k: v for k, v in os.environ.items() if k.startswith("CARDDESK_")}
        return {"name": self.name, "argv": list(self.argv), "log_file": str(self.log_file),
                # The local stack runs in development unless the operator says otherwise.
                "marker": self.marker,
                "env": {"CARDDESK_ENV": "development", **settings, **self.env},
                "cwd": str(self.cwd) if self.cwd else None, "user": self.user,
                "stop_signal": int(self.stop_signal)}


@dataclass(frozen=True)
class ComponentStatus:
    name: str
    pid: int | None
    alive: bool
    healthy: bool
    log_file: Path
    restarts: int = 0
    last_exit: str | None = None
    # The failing checks of /health (a service's), empty when healthy or not a service.
    detail: str = ""


def _proc_stat(pid: int) -> tuple[str, int, int] | None:
    """(state letter, parent pid, process group) of a pid, or None if it does not exist."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    # The command name is in parentheses and may contain spaces.
    fields = stat[stat.rindex(")") + 2 :].split()
    return fields[0], int(fields[1]), int(fields[2])


def _reap(pid: int) -> None:
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, os.WNOHANG)


def pid_alive(pid: int) -> bool:
    _reap(pid)
    stat = _proc_stat(pid)
    return stat is not None and stat[0] not in ("Z", "X")


def process_family(leader: int) -> set[int]:
    """The live leader, its descendants and its process group.

    The group alone is not enough: PostgreSQL's backends call setsid() and leave it.
    """
    stats = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and (stat := _proc_stat(int(entry.name))) is not None:
            stats[int(entry.name)] = stat
    family = {pid for pid, (_, _, pgrp) in stats.items() if pgrp == leader}
    family.add(leader)
    grew = True
    while grew:
        children = {pid for pid, (_, ppid, _) in stats.items() if ppid in family}
        grew = not children <= family
        family |= children
    return {pid for pid in family if pid in stats and stats[pid][0] not in ("Z", "X")}


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


# ----------------------------------------------------------------------------- the stack


Reporter = Callable[[str], None]


def _silent(_: str) -> None:
    return None


class Stack:
    """Brings the local stack up and down; state is kept in pid files, so any process may ask."""

    def __init__(self, settings: CardDeskSettings, report: Reporter = _silent) -> None:
        self.settings = settings
        self.report = report
        self.state_dir = settings.state_dir.resolve()
        self.logs_dir = self.state_dir / "logs"
        self.run_dir = self.state_dir / "run"
        self.kafka_dir = self.state_dir / "kafka"
        self.pg_dir = self.state_dir / "postgres"
        self.jars_dir = self.state_dir / "kafka-jars" / settings.kafka_version
        self.kafka_host, self.kafka_port = kafka_address(settings)
        self.pg = pg_target(settings)
        # Postgres refuses to run as root; when we are root it runs as the `postgres` user.
        self.pg_user: str | None = PG_SUPERUSER if os.geteuid() == 0 else None

    # -- component definitions

    @property
    def pg_data(self) -> Path:
        return self.pg_dir / "data"

    @property
    def pg_socket_dir(self) -> Path:
        return self.pg_dir / "run"

    def _superuser_dsn(self) -> str:
        return f"postgresql://{PG_SUPERUSER}@{self.pg.host}:{self.pg.port}/postgres"

    def postgres_spec(self) -> ProcessSpec:
        pg_bin = self.settings.postgres_bin
        return ProcessSpec(
            name="postgres",
            argv=[
                str(pg_bin / "postgres"),
                "-D",
                str(self.pg_data),
                "-c",
                f"listen_addresses={self.pg.host}",
                "-c",
                f"port={self.pg.port}",
                "-c",
                f"unix_socket_directories={self.pg_socket_dir}",
                "-c",
                "max_connections=200",
            ],
            log_file=self.logs_dir / "postgres.log",
            marker=str(self.pg_data),
            # The server itself; the application role may not exist yet on first start.
            health=lambda: postgres_answers(self._superuser_dsn()),
            user=self.pg_user,
            cwd=self.pg_dir,
            # SIGINT is PostgreSQL's "fast" shutdown; SIGTERM would wait for clients.
            stop_signal=signal.SIGINT,
        )

    def kafka_spec(self) -> ProcessSpec:
        return ProcessSpec(
            name="kafka",
            argv=[
                "java",
                f"-Xmx{self.settings.kafka_heap}",
                f"-Xms{self.settings.kafka_heap}",
                # The throughput collector: no concurrent marking threads competing for a
                # small machine's cores (issue 12; the README's Performance section).
                "-XX:+UseParallelGC",
                "-Djava.awt.headless=true",
                f"-Dlog4j2.configurationFile={self.kafka_dir / 'log4j2.properties'}",
                "-cp",
                f"{self.jars_dir}/*",
                "kafka.Kafka",
                str(self.kafka_dir / "server.properties"),
            ],
            # The broker logs through log4j2; its console gets only JVM-level failures.
            log_file=self.logs_dir / "kafka.log",
            marker=str(self.kafka_dir / "server.properties"),
            health=lambda: kafka_answers(self.admin_settings()),
            cwd=self.kafka_dir,
        )

    def service_specs(self, instances: int | None = None) -> list[ProcessSpec]:
        """The Card Desk services, started after the infrastructure is healthy: `instances`
        processes each (`python -m services.<name>.main`; default: as many as the stack
        runs), healthy when `/health` answers. The first instance is named after its service,
        the others `<service>-<k>`; each has its own port and log file."""
        count = instances or self.instances()
        specs = []
        credentials = read_credentials(self.credentials_file)
        for k in range(1, count + 1):
            for name, port in service_ports(self.settings, k).items():
                module = f"services.{name}.main"
                label = name if k == 1 else f"{name}-{k}"
                env = {"CARDDESK_HEALTH_PORT": str(port)}
                if name == "status":
                    env["CARDDESK_HTTP_PORT"] = str(port)
                if name in credentials:
                    env["CARDDESK_KAFKA_USER"], env["CARDDESK_KAFKA_PASSWORD"] = (
                        credentials[name])
                specs.append(ProcessSpec(
                    name=label,
                    argv=(sys.executable, "-m", module),
                    log_file=self.logs_dir / f"{label}.log",
                    marker=module,
                    health=functools.partial(http_health, self.settings.http_host, port),
                    env=env,
                    cwd=PROJECT_ROOT,
                ))
        from cardctl.console import console_spec  # the bureau console, a process of its own

        specs.append(console_spec(self.settings, self.logs_dir, credentials.get("console")))
        return specs

    def service_port(self, spec: ProcessSpec) -> int:
        return int(spec.env["CARDDESK_HEALTH_PORT"])

    def infra_specs(self) -> list[ProcessSpec]:
        return [self.postgres_spec(), self.kafka_spec()]

    def all_specs(self) -> list[ProcessSpec]:
        return [*self.infra_specs(), *self.service_specs()]

    # -- pid files and the supervisor's files

    def _pid_file(self, name: str) -> Path:
        return self.run_dir / f"{name}.pid"

    def running_pid(self, spec: ProcessSpec) -> int | None:
        """The pid recorded for `spec` if that process is still ours and alive."""
        try:
            pid = int(self._pid_file(spec.name).read_text().strip())
        except (FileNotFoundError, ValueError):
            return None
        if pid_alive(pid) and spec.marker in _cmdline(pid):
            return pid
        return None

    def _programs(self) -> dict[str, object]:
        try:
            raw: dict[str, object] = json.loads((self.run_dir / PROGRAMS_FILE).read_text())
        except (OSError, ValueError):
            return {}
        return raw

    def instances(self) -> int:
        """How many instances of each service the stack runs (1 until `up --instances`)."""
        count = self._programs().get("instances", 1)
        return count if isinstance(count, int) and count > 0 else 1

    def supervised(self) -> list[str]:
        programs = self._programs().get("programs", [])
        return [str(p["name"]) for p in programs if isinstance(p, dict)] \
            if isinstance(programs, list) else []

    def supervisor_state(self) -> dict[str, dict[str, object]]:
        """What the supervisor last wrote per program: pid, state, restarts, last_exit."""
        try:
            raw = json.loads((self.run_dir / STATE_FILE).read_text())
        except (OSError, ValueError):
            return {}
        programs = raw.get("programs", {})
        return programs if isinstance(programs, dict) else {}

    def supervisor_pid(self) -> int | None:
        try:
            pid = int((self.run_dir / SUPERVISOR_PID_FILE).read_text().strip())
        except (OSError, ValueError):
            return None
        return pid if pid_alive(pid) and SUPERVISOR_MODULE in _cmdline(pid) else None

    def _supervise(self, specs: Sequence[ProcessSpec], instances: int) -> list[str]:
        """Make `specs` the supervisor's programs (starting it if needed); returns the names
        that were not running before. Programs that stay keep running untouched."""
        # Started means: not running before (an adopted process was not started by us).
        new = [spec.name for spec in specs if self.running_pid(spec) is None]
        previous = {str(p["name"]): p for p in self._programs().get("programs", [])  # type: ignore[attr-defined]
                    if isinstance(p, dict)}
        programs = [previous.get(spec.name) or spec.program() for spec in specs]
        partial = self.run_dir / (PROGRAMS_FILE + ".partial")
        partial.touch(mode=0o600)
        partial.write_text(json.dumps({"instances": instances, "programs": programs}, indent=1))
        partial.replace(self.run_dir / PROGRAMS_FILE)
        pid = self.supervisor_pid()
        if pid is None:
            log_file = self.logs_dir / "supervisor.log"
            self.report(f"starting the supervisor, log: {log_file}")
            with log_file.open("ab") as log:
                process = subprocess.Popen(
                    [sys.executable, "-m", SUPERVISOR_MODULE, str(self.run_dir)],
                    stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                    cwd=PROJECT_ROOT, start_new_session=True)
            deadline = time.monotonic() + 10.0
            while self.supervisor_pid() is None:
                if process.poll() is not None or time.monotonic() > deadline:
                    raise StackError(f"the supervisor did not start; see {log_file}")
                time.sleep(0.1)
        else:
            os.kill(pid, signal.SIGHUP)
        return new

    # -- status

    def status(self) -> list[ComponentStatus]:
        result = []
        supervised = self.supervisor_state()
        for spec in self.all_specs():
            pid = self.running_pid(spec)
            healthy, detail = False, ""
            if pid is not None:
                if spec.name in ("postgres", "kafka"):
                    healthy = run_sync(spec.health)
                else:
                    healthy, detail = run_sync(lambda spec=spec: http_health_detail(  # type: ignore[misc]
                        self.settings.http_host, self.service_port(spec)))
            seen = supervised.get(spec.name, {})
            restarts = seen.get("restarts", 0)
            last_exit = seen.get("last_exit")
            result.append(ComponentStatus(
                spec.name, pid, pid is not None, healthy, spec.log_file,
                restarts=restarts if isinstance(restarts, int) else 0,
                last_exit=last_exit if isinstance(last_exit, str) else None, detail=detail))
        return result

    def infra_answers(self) -> bool:
        """Whether Kafka and PostgreSQL already answer on the configured addresses."""
        return run_sync(lambda: postgres_answers(self.settings.database_url)) and run_sync(
            lambda: kafka_answers(self.admin_settings())
        )

    # -- up

    def up(self, *, services: bool = True, instances: int | None = None) -> list[str]:
        """Bring the stack to health under the supervisor; returns what it started.

        What runs stays running: a failure here stops nothing (the supervisor keeps
        restarting what it was given); a running service that is unhealthy is restarted.
        """
        count = instances or self.instances()
        if count > self.settings.partitions:
            raise StackError(f"{count} instances need CARDDESK_PARTITIONS >= {count} "
                             f"(it is {self.settings.partitions}): an instance without a "
                             "partition would sit idle")
        for directory in (self.state_dir, self.logs_dir, self.run_dir, self.kafka_dir, self.pg_dir):
            directory.mkdir(parents=True, exist_ok=True)
        pg, kafka = self.postgres_spec(), self.kafka_spec()
        if self.running_pid(pg) is None:
            self._prepare_postgres()
        if self.running_pid(kafka) is None:
            self._prepare_kafka()
        keep = [spec for spec in self.service_specs(count) if spec.name in self.supervised()]
        started = self._supervise([pg, kafka, *keep], count)
        self._wait_healthy(pg)
        run_sync(self._bootstrap_database)
        if not run_sync(lambda: postgres_answers(self.settings.database_url)):
            raise StackError(f"cannot connect with CARDDESK_DATABASE_URL; see {pg.log_file}")
        self._wait_healthy(kafka)
        self.ensure_topics_and_access()
        if services:
            started.extend(self.start_services(count))
        return started

    def ensure_topics_and_access(self) -> None:
        """Create the missing topics, then the SCRAM users and ACLs of the services, the
        auditor and every channel of the channels file (idempotent)."""
        provision(self.admin_settings(), self.credentials_file, self.settings.channels_file,
                  self.report)

    @property
    def credentials_file(self) -> Path:
        return credentials_path(self.settings)

    def admin_settings(self) -> CardDeskSettings:
        """The stack's own settings with the administrator's credentials, once generated."""
        credentials = read_credentials(self.credentials_file)
        if ADMIN not in credentials:
            return as_principal(self.settings, ADMIN)
        return with_credentials(self.settings, *credentials[ADMIN])

    def _ensure_credentials(self) -> dict[str, tuple[str, str]]:
        """Random passwords for every generated principal, kept in credentials.json (0600);
        existing ones are kept, so a second `up` changes nothing."""
        credentials = read_credentials(self.credentials_file)
        fresh = {p: (p, secrets.token_urlsafe(32))
                 for p in GENERATED_PRINCIPALS if p not in credentials}
        if fresh or not self.credentials_file.exists():
            credentials.update(fresh)
            body = {p: {"username": u, "password": pw} for p, (u, pw) in credentials.items()}
            _write_private(self.credentials_file, json.dumps(body, indent=2) + "\n")
        self.credentials_file.chmod(0o600)
        return credentials

    def start_services(self, instances: int | None = None) -> list[str]:
        """Put the services under the supervisor (they get this process's CARDDESK_*
        environment), restart those that run but are unhealthy, and wait until each is
        healthy; returns the names it started."""
        for directory in (self.logs_dir, self.run_dir):
            directory.mkdir(parents=True, exist_ok=True)
        count = instances or self.instances()
        wanted = self.service_specs(count)
        infra = [spec for spec in self.infra_specs() if spec.name in self.supervised()]
        unhealthy = self._unhealthy_for_long(wanted)
        # Instances beyond `count` leave the programs: the supervisor stops them.
        started = self._supervise([*infra, *wanted], count)
        for spec in unhealthy:
            self.report(f"{spec.name} runs but is unhealthy; restarting it")
            self._restart(spec)
        for spec in wanted:
            self._wait_healthy(spec)
        return started

    def _unhealthy_for_long(self, specs: Sequence[ProcessSpec]) -> list[ProcessSpec]:
        """Services running for over RESTART_GRACE_S whose /health fails (a process still
        starting gets its chance)."""
        found = []
        for spec in specs:
            pid = self.running_pid(spec)
            if pid is None or _uptime_s(pid) < RESTART_GRACE_S:
                continue
            if not run_sync(spec.health):
                found.append(spec)
        return found

    def _restart(self, spec: ProcessSpec) -> None:
        """Stop the process; the supervisor starts it again (counted as a restart)."""
        pid = self.running_pid(spec)
        if pid is None:
            return
        family = process_family(pid)
        _signal_group(pid, spec.stop_signal)
        _signal_group(pid, signal.SIGCONT)  # a stopped (SIGSTOP) process must run to exit
        if not _wait_gone(family, STOP_TIMEOUT_S):
            _signal_group(pid, signal.SIGKILL)
            _wait_gone(family, 10.0)
        deadline = time.monotonic() + 60.0
        while self.running_pid(spec) in (None, pid) and time.monotonic() < deadline:
            time.sleep(0.2)

    def _wait_healthy(self, spec: ProcessSpec, timeout_s: float = START_TIMEOUT_S) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            # Under the supervisor a process that exits is started again: keep waiting.
            if self.running_pid(spec) is not None and run_sync(spec.health):
                self.report(f"{spec.name} is healthy")
                return
            time.sleep(0.5)
        last_exit = self.supervisor_state().get(spec.name, {}).get("last_exit")
        why = f" (last exit: {last_exit})" if last_exit else ""
        raise StackError(
            f"{spec.name} not healthy after {timeout_s:.0f}s{why}; see {spec.log_file}")


    # -- postgres

    @staticmethod
    def _group_of(user: str | None) -> int | None:
        return pwd.getpwnam(user).pw_gid if user else None

    def _run_as_pg(self, argv: Sequence[str], log_name: str) -> None:
        log_path = self.logs_dir / log_name
        with log_path.open("ab") as log:
            done = subprocess.run(
                list(argv),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.pg_dir,
                user=self.pg_user,
                group=self._group_of(self.pg_user),
                extra_groups=[] if self.pg_user else None,
                check=False,
            )
        if done.returncode != 0:
            raise StackError(f"{argv[0]} failed ({done.returncode}); see {log_path}")

    def _prepare_postgres(self) -> None:
        if port_open(self.pg.host, self.pg.port):
            raise StackError(
                f"port {self.pg.port} is in use by a process this stack did not start; "
                "stop it or set CARDDESK_DATABASE_URL to another port"
            )
        self.pg_socket_dir.mkdir(parents=True, exist_ok=True)
        self.pg_data.mkdir(parents=True, exist_ok=True)
        if self.pg_user:
            entry = pwd.getpwnam(self.pg_user)
            for path in (self.pg_data, self.pg_socket_dir):
                os.chown(path, entry.pw_uid, entry.pw_gid)
            self._check_reachable_by(self.pg_user, self.pg_data)
        if (self.pg_data / "PG_VERSION").exists():
            return
        self.report(f"initdb {self.pg_data}")
        self._run_as_pg(
            [
                str(self.settings.postgres_bin / "initdb"),
                "-D",
                str(self.pg_data),
                "-U",
                PG_SUPERUSER,
                "--auth=trust",  # initdb's pg_hba only admits the socket and loopback
                "--encoding=UTF8",
                "--no-locale",
            ],
            "initdb.log",
        )

    @staticmethod
    def _check_reachable_by(user: str, path: Path) -> None:
        probe = subprocess.run(
            ["test", "-w", str(path)], user=user, group=pwd.getpwnam(user).pw_gid, check=False
        )
        if probe.returncode != 0:
            raise StackError(
                f"user {user!r} cannot reach {path}: every parent directory must be "
                "traversable; set CARDDESK_STATE_DIR to a directory such as /tmp/carddesk"
            )

    async def _bootstrap_database(self) -> None:
        """Create the application role and database of CARDDESK_DATABASE_URL if missing."""
        conn = await asyncpg.connect(self._superuser_dsn(), timeout=10)
        try:
            if self.pg.user != PG_SUPERUSER and not await conn.fetchval(
                "SELECT 1 FROM pg_roles WHERE rolname = $1", self.pg.user
            ):
                await conn.execute(f"CREATE ROLE {_ident(self.pg.user)} LOGIN CREATEDB")
            if not await conn.fetchval(
                "SELECT 1 FROM pg_database WHERE datname = $1", self.pg.dbname
            ):
                await conn.execute(
                    f"CREATE DATABASE {_ident(self.pg.dbname)} OWNER {_ident(self.pg.user)}"
                )
        finally:
            await conn.close()

    # -- kafka

    def ensure_kafka_jars(self) -> Path:
        """Download the broker's jars with Maven once; later starts reuse the cache."""
        marker = self.jars_dir / f"kafka_2.13-{self.settings.kafka_version}.jar"
        if marker.exists():
            return self.jars_dir
        partial = self.jars_dir.with_name(self.jars_dir.name + ".partial")
        shutil.rmtree(partial, ignore_errors=True)
        log_path = self.logs_dir / "maven.log"
        version = self.settings.kafka_version
        self.report(f"fetching Kafka {version} jars with Maven, log: {log_path}")
        with log_path.open("ab") as log:
            done = subprocess.run(
                [
                    "mvn",
                    "-q",
                    "-B",
                    "-f",
                    str(KAFKA_POM),
                    f"-Dkafka.version={self.settings.kafka_version}",
                    "dependency:copy-dependencies",
                    "-DincludeScope=runtime",
                    f"-DoutputDirectory={partial}",
                ],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                check=False,
            )
        if done.returncode != 0 or not (partial / marker.name).exists():
            raise StackError(f"fetching the Kafka jars failed; see {log_path}")
        # Rename last, so an interrupted download is never taken for a complete one.
        partial.rename(self.jars_dir)
        return self.jars_dir

    def _java(self, argv: Sequence[str], log_name: str) -> str:
        log_path = self.logs_dir / log_name
        done = subprocess.run(
            ["java", "-cp", f"{self.jars_dir}/*", *argv],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            check=False,
        )
        with log_path.open("a") as log:
            log.write(done.stdout + done.stderr)
        if done.returncode != 0:
            raise StackError(f"{argv[0]} failed ({done.returncode}); see {log_path}")
        return done.stdout

    def _prepare_kafka(self) -> None:
        for host, port in ((self.kafka_host, self.kafka_port),
                           (CONTROLLER_HOST, self.settings.kafka_controller_port)):
            if port_open(host, port):
                raise StackError(
                    f"port {port} is in use by a process this stack did not start; stop it "
                    "or set CARDDESK_KAFKA_BOOTSTRAP / CARDDESK_KAFKA_CONTROLLER_PORT"
                )
        self.ensure_kafka_jars()
        data = self.kafka_dir / "data"
        formatted = (data / "meta.properties").exists()
        if formatted and not self.credentials_file.exists():
            raise StackError(
                f"{data} was formatted without {self.credentials_file} (an older, "
                "unauthenticated stack?); run `cardctl stack down --purge` first")
        admin_password = self._ensure_credentials()[ADMIN][1]
        data.mkdir(parents=True, exist_ok=True)
        properties = self.kafka_dir / "server.properties"
        # It holds the administrator's password (for the broker's own SASL logins).
        _write_private(properties, self._server_properties(data, admin_password))
        (self.kafka_dir / "log4j2.properties").write_text(self._log4j2_properties())
        if formatted:
            return
        cluster_id_file = self.kafka_dir / "cluster-id"
        if not cluster_id_file.exists():
            cluster_id = self._java(["kafka.tools.StorageTool", "random-uuid"], "kafka-format.log")
            cluster_id_file.write_text(cluster_id.strip() + "\n")
        self.report(f"formatting Kafka storage {data}")
        self._java(
            [
                "kafka.tools.StorageTool",
                "format",
                "-t",
                cluster_id_file.read_text().strip(),
                "-c",
                str(properties),
                # The superuser exists from the first start: every other user and ACL is
                # created through it (`ensure_topics_and_access`).
                "--add-scram",
                f"SCRAM-SHA-512=[name={ADMIN},password={admin_password}]",
            ],
            "kafka-format.log",
        )

    def _server_properties(self, data: Path, admin_password: str) -> str:
        """SASL/SCRAM-SHA-512 on the bootstrap address, authorisation by ACLs (KRaft's
        StandardAuthorizer, nothing allowed without an ACL, `admin` the only superuser).

        The controller listener is bound to loopback and authenticated too (SASL/PLAIN with
        the administrator's password, since SCRAM credentials live in the metadata log the
        controller serves), so it is no unauthenticated way around the ACLs.
        """
        host, port, ctrl = self.kafka_host, self.kafka_port, self.settings.kafka_controller_port
        scram_login = ("org.apache.kafka.common.security.scram.ScramLoginModule required "
                       f'username="{ADMIN}" password="{admin_password}";')
        plain_login = ("org.apache.kafka.common.security.plain.PlainLoginModule required "
                       f'username="{ADMIN}" password="{admin_password}" '
                       f'user_{ADMIN}="{admin_password}";')
        lines = [
            "process.roles=broker,controller",
            "node.id=1",
            f"controller.quorum.voters=1@{CONTROLLER_HOST}:{ctrl}",
            f"listeners=SASL_PLAINTEXT://{host}:{port},CONTROLLER://{CONTROLLER_HOST}:{ctrl}",
            f"advertised.listeners=SASL_PLAINTEXT://{host}:{port}",
            "controller.listener.names=CONTROLLER",
            "inter.broker.listener.name=SASL_PLAINTEXT",
            "listener.security.protocol.map=SASL_PLAINTEXT:SASL_PLAINTEXT,"
            "CONTROLLER:SASL_PLAINTEXT",
            "sasl.enabled.mechanisms=SCRAM-SHA-512",
            "sasl.mechanism.inter.broker.protocol=SCRAM-SHA-512",
            "listener.name.sasl_plaintext.sasl.enabled.mechanisms=SCRAM-SHA-512",
            f"listener.name.sasl_plaintext.scram-sha-512.sasl.jaas.config={scram_login}",
            "sasl.mechanism.controller.protocol=PLAIN",
            "listener.name.controller.sasl.enabled.mechanisms=PLAIN",
            f"listener.name.controller.plain.sasl.jaas.config={plain_login}",
            "authorizer.class.name=org.apache.kafka.metadata.authorizer.StandardAuthorizer",
            f"super.users=User:{ADMIN}",
            "allow.everyone.if.no.acl.found=false",
            f"log.dirs={data}",
            f"num.partitions={self.settings.partitions}",
            "auto.create.topics.enable=false",
            "offsets.topic.replication.factor=1",
            "transaction.state.log.replication.factor=1",
            "transaction.state.log.min.isr=1",
            "group.initial.rebalance.delay.ms=0",
            # The controller appends a no-op record to the metadata log this often when
            # nothing else changes (KIP-835, default 500 ms), so that lag metrics move; each
            # is a raft append and flush. Every 5 s the idle broker used 1.2-2.3% of a core
            # less (3.1-3.7% against 4.3-5.9%, README Performance).
            f"metadata.max.idle.interval.ms={METADATA_IDLE_INTERVAL_MS}",
            *broker_threads(os.cpu_count() or 2),
        ]
        return "\n".join(lines) + "\n"

    def _log4j2_properties(self) -> str:
        log_file = self.logs_dir / "kafka.log"
        return "\n".join(
            [
                "status = warn",
                "appender.file.type = File",
                "appender.file.name = FILE",
                f"appender.file.fileName = {log_file}",
                "appender.file.append = true",
                "appender.file.layout.type = PatternLayout",
                "appender.file.layout.pattern = [%d] %p %m (%c)%n",
                "rootLogger.level = INFO",
                "rootLogger.appenderRef.file.ref = FILE",
                # The request logger and state-change chatter drown what an operator needs.
                "logger.request.name = kafka.request.logger",
                "logger.request.level = WARN",
                "logger.state.name = state.change.logger",
                "logger.state.level = WARN",
                "",
            ]
        )

    # -- down

    def down(self, *, purge: bool = False, only: Iterable[str] | None = None) -> list[str]:
        """Stop the stack's processes (services first); returns the names it stopped.
        Without `only`, the supervisor stops too."""
        wanted = set(only) if only is not None else None
        running = {spec.name for spec in self._every_spec() if self.running_pid(spec)}
        supervisor = self.supervisor_pid()
        if supervisor is not None:
            if wanted is None:
                self._stop_supervisor(supervisor)
            else:
                self._unsupervise(supervisor, wanted)
        stopped = [name for name in running if wanted is None or name in wanted]
        for spec in reversed(self._every_spec()):
            if wanted is not None and spec.name not in wanted:
                continue
            # What no supervisor stopped (or outlived it) is stopped here.
            if self._stop(spec) and spec.name not in stopped:
                stopped.append(spec.name)
            self._pid_file(spec.name).unlink(missing_ok=True)
        if wanted is None:
            for name in (PROGRAMS_FILE, STATE_FILE):
                (self.run_dir / name).unlink(missing_ok=True)
        if purge:
            self._purge()
        order = [spec.name for spec in reversed(self._every_spec())]
        return sorted(stopped, key=lambda name: order.index(name) if name in order else 0)

    def _stop_supervisor(self, supervisor: int) -> None:
        self.report(f"stopping the supervisor (pid {supervisor}) and its programs")
        os.kill(supervisor, signal.SIGTERM)
        if not _wait_gone({supervisor}, STOP_TIMEOUT_S * 3):
            raise StackError(f"the supervisor (pid {supervisor}) did not stop")

    def _unsupervise(self, supervisor: int, wanted: set[str]) -> None:
        """Have the supervisor stop `wanted` and keep the rest; it goes too when nothing is
        left. Waits (bounded) for `wanted` to be gone."""
        keep = [spec for spec in self._every_spec()
                if spec.name in self.supervised() and spec.name not in wanted]
        self._supervise(keep, self.instances())
        if not keep:  # nothing left to supervise: the supervisor goes too
            os.kill(supervisor, signal.SIGTERM)
            _wait_gone({supervisor}, STOP_TIMEOUT_S * 3)
        gone = [s for s in self._every_spec() if s.name in wanted]
        deadline = time.monotonic() + STOP_TIMEOUT_S * 2
        while any(self.running_pid(s) for s in gone) and time.monotonic() < deadline:
            time.sleep(0.2)

    def _purge(self) -> None:
        for path in (self.kafka_dir, self.pg_dir):
            shutil.rmtree(path, ignore_errors=True)
            self.report(f"purged {path}")

    def _every_spec(self) -> list[ProcessSpec]:
        """The infrastructure and every service instance that may be running."""
        supervised = set(self.supervised())
        count = max([self.instances(), *(_instance_of(name) for name in supervised)])
        return [*self.infra_specs(), *self.service_specs(count)]


    def _stop(self, spec: ProcessSpec) -> bool:
        pid = self.running_pid(spec)
        if pid is None:
            return False
        self.report(f"stopping {spec.name} (pid {pid})")
        family = process_family(pid)
        # Each process leads its own group (start_new_session), so the group id is its pid.
        _signal_group(pid, spec.stop_signal)
        if _wait_gone(family, STOP_TIMEOUT_S):
            return True
        self.report(f"{spec.name} ignored {spec.stop_signal.name}; killing it")
        _signal_group(pid, signal.SIGKILL)
        for member in family:
            with contextlib.suppress(ProcessLookupError):
                os.kill(member, signal.SIGKILL)
        if not _wait_gone(family, 10.0):
            raise StackError(f"{spec.name} (pid {pid}) survived SIGKILL")
        return True


def _wait_gone(pids: set[int], timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not any(pid_alive(pid) for pid in pids):
            return True
        time.sleep(0.2)
    return False


def _uptime_s(pid: int) -> float:
    """Seconds since the process started (from /proc; 0 when unknown)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        uptime = float(Path("/proc/uptime").read_text().split()[0])
    except (OSError, ValueError):
        return 0.0
    started_ticks = int(stat[stat.rindex(")") + 2 :].split()[19])
    return uptime - started_ticks / os.sysconf("SC_CLK_TCK")


def _instance_of(name: str) -> int:
    """The instance number in a service program's name (`loss-2` → 2; `loss` → 1)."""
    _, _, suffix = name.rpartition("-")
    return int(suffix) if suffix.isdigit() else 1


def _signal_group(pgid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, sig)


def _write_private(path: Path, text: str) -> None:
    """Write a file only its owner can read, never readable by others even for a moment."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        handle.write(text)
    path.chmod(0o600)


def _ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


METADATA_IDLE_INTERVAL_MS = 5000


def broker_threads(cpus: int) -> list[str]:
    """The broker's request threads for a machine of `cpus` cores, never more than Kafka's
    defaults (8 I/O, 3 network), which are a server's. On the 2-core machines the local
    stack runs on, 2 of each together with the parallel collector cost the broker a quarter
    less CPU per command at the median of four rounds (issue 12, README Performance)."""
    return [f"num.io.threads={max(2, min(8, cpus))}",
            f"num.network.threads={max(2, min(3, cpus // 2))}"]
