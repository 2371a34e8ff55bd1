"""Fixtures of the chaos suite: the whole pipeline on a nats-server of its own per test
(tests here kill, stop and restart it), and the figures table printed at the end."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from chaos_kit import FIGURES, YOLO, Pipeline, Services, running_pipeline
from photos import photos

from lensbus.natsserver import NatsServer


@pytest.fixture
def services(tmp_path: Path) -> Iterator[Services]:
    s = Services(tmp_path)
    yield s
    s.close()


@pytest.fixture
async def pipeline(
    tmp_path: Path, services: Services, demo_models: dict[str, Path]
) -> AsyncIterator[Pipeline]:
    """YOLOv3-tiny ONNX on three real photos in a loop, on a fresh nats-server."""
    server = NatsServer(tmp_path / "nats", log_file=tmp_path / "nats.log").start()
    async with running_pipeline(
        server, services, demo_models[YOLO], photos(tmp_path), tmp_path
    ) as p:
        yield p


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if not FIGURES:
        return
    terminalreporter.section("chaos figures")
    for fault, figures in FIGURES.items():
        terminalreporter.write_line(
            f"{fault}: " + ", ".join(f"{k}={v}" for k, v in figures.items())
        )
