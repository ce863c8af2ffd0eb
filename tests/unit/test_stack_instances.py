"""`cardctl stack up --instances N`: names, ports and the partition rule, without processes."""

from __future__ import annotations

from pathlib import Path

import pytest

from cardctl.stack import Stack, StackError, service_ports
from shared.settings import CardDeskSettings


def local(tmp_path: Path, partitions: int = 6) -> Stack:
    return Stack(CardDeskSettings(state_dir=tmp_path, http_port=18080, partitions=partitions))


def test_more_instances_than_partitions_are_refused_before_anything_starts(
    tmp_path: Path,
) -> None:
    stack = local(tmp_path, partitions=2)
    with pytest.raises(StackError, match="CARDDESK_PARTITIONS >= 3"):
        stack.up(instances=3)
    assert not (tmp_path / "run").exists()


def test_each_instance_has_its_own_name_port_and_log(tmp_path: Path) -> None:
    every = local(tmp_path).service_specs(2)
    assert [s.name for s in every].count("console") == 1  # one console, however many instances
    specs = [s for s in every if s.name != "console"]
    names = [s.name for s in specs]
    assert names == ["status", "auth", "loss", "review", "issuance",
                     "status-2", "auth-2", "loss-2", "review-2", "issuance-2"]
    ports = [int(s.env["CARDDESK_HEALTH_PORT"]) for s in specs]
    assert ports == list(range(18080, 18090))
    assert len({s.log_file for s in specs}) == 10
    status_2 = next(s for s in specs if s.name == "status-2")
    assert status_2.env["CARDDESK_HTTP_PORT"] == "18085"


def test_the_first_instance_keeps_the_ports_of_a_single_instance_stack() -> None:
    settings = CardDeskSettings(http_port=8080)
    assert service_ports(settings) == {"status": 8080, "auth": 8081, "loss": 8082,
                                       "review": 8083, "issuance": 8084}
    assert service_ports(settings, 3)["status"] == 8090


def test_a_stack_never_brought_up_runs_one_instance(tmp_path: Path) -> None:
    assert local(tmp_path).instances() == 1
