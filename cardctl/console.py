"""The bureau console as a process of the local stack (`cardctl stack up`)."""

from __future__ import annotations

import functools
import sys
from pathlib import Path

from cardctl.stack import ProcessSpec, http_health
from services.console.settings import ConsoleSettings
from shared.settings import PROJECT_ROOT, CardDeskSettings


def console_spec(settings: CardDeskSettings, logs_dir: Path,
                 credentials: tuple[str, str] | None = None) -> ProcessSpec:
    """`python -m services.console.main` on CARDDESK_CONSOLE_PORT, healthy when its
    `/health` answers; `credentials`, its Kafka user and password."""
    port = ConsoleSettings().console_port
    env = {"CARDDESK_CONSOLE_PORT": str(port), "CARDDESK_HEALTH_PORT": str(port)}
    if credentials is not None:
        env["CARDDESK_KAFKA_USER"], env["CARDDESK_KAFKA_PASSWORD"] = credentials
    module = "services.console.main"
    return ProcessSpec(
        name="console",
        argv=(sys.executable, "-m", module),
        log_file=logs_dir / "console.log",
        marker=module,
        health=functools.partial(http_health, settings.http_host, port),
        env=env,
        cwd=PROJECT_ROOT,
    )
