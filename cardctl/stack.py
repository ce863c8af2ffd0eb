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
import os
import pwd
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

from shared.settings import PROJECT_ROOT, CardDeskSettings
from shared.topics import SERVICES, TopicSpec, all_topics

T = TypeVar("T")

KAFKA_POM = PROJECT_ROOT / "infra" / "kafka" / "pom.xml"
PG_SUPERUSER = "postgres"
STOP_TIMEOUT_S = 30.0
START_TIMEOUT_S = 90.0


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


async def _open_admin(bootstrap: str, timeout_s: float) -> AIOKafkaAdminClient:
    admin = AIOKafkaAdminClient(
        bootstrap_servers=bootstrap, request_timeout_ms=int(timeout_s * 1000)
    )
    await asyncio.wait_for(admin.start(), timeout_s)
    return admin


async def kafka_answers(bootstrap: str, timeout_s: float = 5.0) -> bool:
    host, _, port = bootstrap.split(",")[0].strip().rpartition(":")
    # aiokafka logs an error for every refused connection; a closed port needs no client.
    if not port_open(host, int(port)):
        return False
    try:
        admin = await _open_admin(bootstrap, timeout_s)
    except Exception:  # aiokafka raises several unrelated types while the broker boots
        return False
    try:
        await asyncio.wait_for(admin.list_topics(), timeout_s)
    except Exception:
        return False
    finally:
        await admin.close()
    return True


async def ensure_topics(bootstrap: str, topics: Sequence[TopicSpec]) -> list[str]:
    """Create the topics that are missing and bring existing ones' configuration in line;
    returns the names it created."""
    admin = await _open_admin(bootstrap, 15.0)
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


def service_ports(settings: CardDeskSettings) -> dict[str, int]:
    """Where each service serves `/health`: status on CARDDESK_HTTP_PORT, the others after it."""
    return {"status": settings.http_port,
            **{name: settings.http_port + 1 + i for i, name in enumerate(SERVICES)}}


async def http_health(host: str, port: int, timeout_s: float = 3.0) -> bool:
    try:
        async with httpx.AsyncClient(timeout=timeout_s) as client:
            response = await client.get(f"http://{host}:{port}/health")
    except httpx.HTTPError:
        return False
    return response.is_success


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


@dataclass(frozen=True)
class ComponentStatus:
    name: str
    pid: int | None
    alive: bool
    healthy: bool
    log_file: Path


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
            health=lambda: kafka_answers(self.settings.kafka_bootstrap),
            cwd=self.kafka_dir,
        )

    def service_specs(self) -> list[ProcessSpec]:
        """The Card Desk services, started after the infrastructure is healthy: one process
        each (`python -m services.<name>.main`), healthy when its `/health` answers."""
        specs = []
        for name, port in service_ports(self.settings).items():
            module = f"services.{name}.main"
            specs.append(ProcessSpec(
                name=name,
                argv=(sys.executable, "-m", module),
                log_file=self.logs_dir / f"{name}.log",
                marker=module,
                health=functools.partial(http_health, self.settings.http_host, port),
                env={"CARDDESK_HEALTH_PORT": str(port)},
                cwd=PROJECT_ROOT,
            ))
        from cardctl.console import console_spec  # the bureau console, a process of its own

        specs.append(console_spec(self.settings, self.logs_dir))
        return specs

    def infra_specs(self) -> list[ProcessSpec]:
        return [self.postgres_spec(), self.kafka_spec()]

    def all_specs(self) -> list[ProcessSpec]:
        return [*self.infra_specs(), *self.service_specs()]

    # -- pid files

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

    # -- status

    def status(self) -> list[ComponentStatus]:
        result = []
        for spec in self.all_specs():
            pid = self.running_pid(spec)
            healthy = pid is not None and run_sync(spec.health)
            result.append(ComponentStatus(spec.name, pid, pid is not None, healthy, spec.log_file))
        return result

    def infra_answers(self) -> bool:
        """Whether Kafka and PostgreSQL already answer on the configured addresses."""
        return run_sync(lambda: postgres_answers(self.settings.database_url)) and run_sync(
            lambda: kafka_answers(self.settings.kafka_bootstrap)
        )

    # -- up

    def up(self, *, services: bool = True) -> list[str]:
        """Start what is not running, wait until healthy, create topics; returns what it started."""
        for directory in (self.state_dir, self.logs_dir, self.run_dir, self.kafka_dir, self.pg_dir):
            directory.mkdir(parents=True, exist_ok=True)
        started: list[str] = []
        try:
            pg, kafka = self.postgres_spec(), self.kafka_spec()
            if self.running_pid(pg) is None:
                self._prepare_postgres()
                self._start(pg)
                started.append(pg.name)
            if self.running_pid(kafka) is None:
                self._prepare_kafka()
                self._start(kafka)
                started.append(kafka.name)
            self._wait_healthy(pg)
            run_sync(self._bootstrap_database)
            if not run_sync(lambda: postgres_answers(self.settings.database_url)):
                raise StackError(f"cannot connect with CARDDESK_DATABASE_URL; see {pg.log_file}")
            self._wait_healthy(kafka)
            created = run_sync(
                lambda: ensure_topics(
                    self.settings.kafka_bootstrap, all_topics(self.settings.partitions)
                )
            )
            self.report(f"topics: {len(created)} created" if created else "topics: all present")
            if services:
                started.extend(self.start_services())
        except BaseException:
            # Leave nothing half-started behind; what was already running stays.
            self.down(only=started)
            raise
        return started

    def start_services(self) -> list[str]:
        """Start the services that are not running (they inherit this process's environment)
        and wait until each is healthy; returns the names it started."""
        for directory in (self.logs_dir, self.run_dir):
            directory.mkdir(parents=True, exist_ok=True)
        started = []
        try:
            for spec in self.service_specs():
                if self.running_pid(spec) is None:
                    self._start(spec)
                    started.append(spec.name)
            for spec in self.service_specs():
                self._wait_healthy(spec)
        except BaseException:
            self.down(only=started)
            raise
        return started

    def _start(self, spec: ProcessSpec) -> int:
        self.report(f"starting {spec.name}, log: {spec.log_file}")
        with spec.log_file.open("ab") as log:
            process = subprocess.Popen(
                list(spec.argv),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=spec.cwd,
                env={**os.environ, **spec.env},
                user=spec.user,
                group=self._group_of(spec.user),
                extra_groups=[] if spec.user else None,
                start_new_session=True,
            )
        self._pid_file(spec.name).write_text(f"{process.pid}\n")
        return process.pid

    def _wait_healthy(self, spec: ProcessSpec, timeout_s: float = START_TIMEOUT_S) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.running_pid(spec) is None:
                raise StackError(f"{spec.name} exited during start-up; see {spec.log_file}")
            if run_sync(spec.health):
                self.report(f"{spec.name} is healthy")
                return
            time.sleep(0.5)
        raise StackError(f"{spec.name} not healthy after {timeout_s:.0f}s; see {spec.log_file}")

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
        for port in (self.kafka_port, self.settings.kafka_controller_port):
            if port_open(self.kafka_host, port):
                raise StackError(
                    f"port {port} is in use by a process this stack did not start; stop it "
                    "or set CARDDESK_KAFKA_BOOTSTRAP / CARDDESK_KAFKA_CONTROLLER_PORT"
                )
        self.ensure_kafka_jars()
        data = self.kafka_dir / "data"
        data.mkdir(parents=True, exist_ok=True)
        properties = self.kafka_dir / "server.properties"
        properties.write_text(self._server_properties(data))
        (self.kafka_dir / "log4j2.properties").write_text(self._log4j2_properties())
        if (data / "meta.properties").exists():
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
            ],
            "kafka-format.log",
        )

    def _server_properties(self, data: Path) -> str:
        host, port, ctrl = self.kafka_host, self.kafka_port, self.settings.kafka_controller_port
        lines = [
            "process.roles=broker,controller",
            "node.id=1",
            f"controller.quorum.voters=1@{host}:{ctrl}",
            f"listeners=PLAINTEXT://{host}:{port},CONTROLLER://{host}:{ctrl}",
            f"advertised.listeners=PLAINTEXT://{host}:{port}",
            "controller.listener.names=CONTROLLER",
            "listener.security.protocol.map=PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT",
            f"log.dirs={data}",
            f"num.partitions={self.settings.partitions}",
            "auto.create.topics.enable=false",
            "offsets.topic.replication.factor=1",
            "transaction.state.log.replication.factor=1",
            "transaction.state.log.min.isr=1",
            "group.initial.rebalance.delay.ms=0",
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
        """Stop the stack's processes (services first); returns the names it stopped."""
        wanted = set(only) if only is not None else None
        stopped = []
        for spec in reversed(self.all_specs()):
            if wanted is not None and spec.name not in wanted:
                continue
            if self._stop(spec):
                stopped.append(spec.name)
            self._pid_file(spec.name).unlink(missing_ok=True)
        if purge:
            for path in (self.kafka_dir, self.pg_dir):
                shutil.rmtree(path, ignore_errors=True)
                self.report(f"purged {path}")
        return stopped

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


def _signal_group(pgid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, sig)


def _ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'
