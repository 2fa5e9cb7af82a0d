"""Fixtures over devtools/harness.py (a mosquitto on a free port, the daemon as a process, a probe
client, the models), and the `unit` marker for the tests in tests/unit/. Test modules import the
harness's names from devtools.harness."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from devtools.harness import SMOLLM, Broker, Daemon, Probe
from qwen_edge import settings as settings_module
from qwen_edge.settings import Settings

UNIT = Path(__file__).resolve().parent / "unit"


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    # The marker follows the folder: tests/unit/ runs in-process, without a compiler, a broker,
    # a daemon or any other process (scripts/test --unit); everything else uses the real parts.
    for item in items:
        if UNIT in item.path.parents:
            item.add_marker(pytest.mark.unit)


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[pytest.MonkeyPatch]:
    """Settings as a fresh node sees them: no QWEN_EDGE_* from the outside, no
    /etc/qwen-edge/config.toml. Yields the monkeypatch for more."""
    for name in list(os.environ):
        if name.upper().startswith("QWEN_EDGE_"):
            monkeypatch.delenv(name)
    monkeypatch.setattr(settings_module, "DEFAULT_CONFIG_FILE", tmp_path / "absent.toml")
    yield monkeypatch
    Settings.toml_file = None


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
