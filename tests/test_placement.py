"""A service's ``nice`` and ``cpus`` settings (lensbus.placement): parsed, refused by name,
and in force on every thread of a real service process, its framework's threads included."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from lensbus.natsserver import NatsServer
from lensbus.placement import parse_cpus
from lensbus.settings import SettingsError, load_settings
from lensbus_capture.config import CaptureSettings
from lensbus_inference.config import InferenceSettings


def test_cpu_lists_read_like_taskset() -> None:
    usable = sorted(os.sched_getaffinity(0))
    first = usable[0]
    assert parse_cpus(f"{first}") == {first}
    assert parse_cpus(",".join(str(c) for c in usable)) == set(usable)
    if len(usable) > 1 and usable[1] == first + 1:
        assert parse_cpus(f"{first}-{first + 1}") == {first, first + 1}
    for bad, why in (("a", "not a CPU number"), ("3-1", "not a CPU range"), (",", "no CPU")):
        with pytest.raises(ValueError, match=why):
            parse_cpus(bad)
    with pytest.raises(ValueError, match=r"not usable here"):
        parse_cpus("4096")


def test_a_bad_cpus_value_is_refused_naming_the_field(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LENSBUS_INFERENCE_CPUS", "0-4096")
    with pytest.raises(SettingsError) as info:
        load_settings(InferenceSettings)
    assert "cpus (env LENSBUS_INFERENCE_CPUS)" in str(info.value), info.value
    assert "not usable here" in str(info.value)


def test_capture_yields_the_cpu_by_default_the_others_do_not() -> None:
    assert CaptureSettings().nice == 10
    assert InferenceSettings(group="g").nice == 0


def _threads(pid: int) -> dict[int, tuple[int, str]]:
    """Each thread's nice value and allowed CPUs, as the kernel has them."""
    out = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        stat = Path(f"/proc/{pid}/task/{tid}/stat").read_text().rsplit(")", 1)[1].split()
        status = Path(f"/proc/{pid}/task/{tid}/status").read_text()
        allowed = next(
            line.split(":", 1)[1].strip()
            for line in status.splitlines()
            if line.startswith("Cpus_allowed_list")
        )
        out[int(tid)] = (int(stat[16]), allowed)  # field 19 of stat: nice
    return out


def test_every_thread_of_a_service_runs_where_its_settings_say(
    nats: NatsServer, start_service, demo_models: dict[str, Path]
) -> None:
    cpu = max(os.sched_getaffinity(0))
    cap = start_service("capture", nats.url, camera="placed", source="test", fps=5)
    inf = start_service(
        "inference",
        nats.url,
        model=demo_models["yolov3-tiny-onnx"],
        cameras="placed",
        cpus=str(cpu),
        nice=3,
        threads=2,
    )
    cap.wait_healthy(30)
    inf.wait_healthy(60)  # the model loaded: ONNX Runtime's threads have started
    for proc, nice, allowed in ((cap, 10, None), (inf, 3, str(cpu))):
        threads = _threads(proc.pid)
        assert len(threads) > 2, threads
        for tid, (got_nice, got_allowed) in threads.items():
            assert got_nice == nice, (proc.name, tid, threads)
            if allowed is not None:
                assert got_allowed == allowed, (proc.name, tid, threads)
    assert cap.stop() == 0 and inf.stop() == 0
