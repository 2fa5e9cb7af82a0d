"""Fixtures over devtools/harness.py (a mosquitto on a free port, the daemon as a process, a probe
client, the models), and the `unit` marker for tests that run in-process. Test modules import the
harness's names from devtools.harness."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from devtools.harness import SMOLLM, Broker, Daemon, Probe

# Modules whose tests need no broker, daemon or other process and run in seconds: `scripts/test
# --unit` runs them (pytest -m unit). A test in one of them that does start a process says so
# with @pytest.mark.subprocess and stays out.
UNIT_MODULES = frozenset(
    {
        "test_assist",
        "test_conversations",
        "test_intake",
        "test_kvstore",
        "test_modelfile",
        "test_protocol",
        "test_settings",
        "test_statestore",
        "test_text",
        "test_toolcalls",
    }
)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if item.path.stem in UNIT_MODULES and item.get_closest_marker("subprocess") is None:
            item.add_marker(pytest.mark.unit)


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[Broker]:
    b = Broker(tmp_path / "broker")
    b.start()
    yield b
    b.stop()


@pytest.fixture(scope="module")
def module_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Broker]:
    b = Broker(tmp_path_factory.mktemp("broker"))
    b.start()
    yield b
    b.stop()


@pytest.fixture
def probe_factory(module_broker: Broker) -> Iterator[Any]:
    probes: list[Probe] = []

    def make(client_id: str = "dev1", broker: Broker | None = None, **kw: Any) -> Probe:
        p = Probe(broker or module_broker, client_id, **kw)
        probes.append(p)
        return p

    yield make
    for p in probes:
        p.close()


@pytest.fixture(scope="module")
def daemon(module_broker: Broker, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    """The daemon with SmolLM2-135M, shared by a test module."""
    d = Daemon(tmp_path_factory.mktemp("daemon"), module_broker, SMOLLM)
    d.start()
    yield d
    d.stop()
