"""Settings: env, an optional YAML/TOML file, and failing fast naming the field."""

from __future__ import annotations

import os
from pathlib import Path
from typing import ClassVar

import pytest
from pydantic import Field
from pydantic_settings import SettingsConfigDict

from lensbus.settings import ServiceSettings, SettingsError, load_settings
from lensbus_capture.config import CaptureSettings


class DemoSettings(ServiceSettings):
    """A tiny service of our own, declared the way the settings docstring asks."""

    model_config = SettingsConfigDict(env_prefix="LENSBUS_DEMO_", extra="forbid")
    service: ClassVar[str] = "demo"

    threshold: float = Field(default=0.5, ge=0.0, le=1.0)
    labels: list[str] = Field(default_factory=lambda: ["person"])
    batch: int = Field(default=1, gt=0, le=64)


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """No LENSBUS_* variable of the machine running the tests leaks into them."""
    for key in list(os.environ):
        if key.startswith("LENSBUS_"):
            monkeypatch.delenv(key)


def write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_defaults_without_file_or_env() -> None:
    s = load_settings(CaptureSettings)
    assert (s.camera, s.source, s.fps, s.jpeg_quality) == ("cam1", "test", 15.0, 85)
    cam = s.camera_config()  # the camera these settings describe
    assert (cam.width, cam.height) == (640, 480)  # the test pattern's default size
    assert s.nats_servers == ["nats://127.0.0.1:4222"] and s.prefix == "lensbus"


def test_yaml_file(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "capture.yaml",
        """\
camera: porch
source: rtsp://10.0.0.5/stream1
fps: 12.5
width: 1280
height: 720
jpeg_quality: 70
loop: false
nats_url: nats://10.0.0.2:4222,nats://10.0.0.3:4222
prefix: site1.lensbus
""",
    )
    s = load_settings(CaptureSettings, path)
    assert s.camera == "porch" and s.source == "rtsp://10.0.0.5/stream1"
    assert (s.fps, s.width, s.height, s.jpeg_quality) == (12.5, 1280, 720, 70)
    assert s.nats_servers == ["nats://10.0.0.2:4222", "nats://10.0.0.3:4222"]
    assert s.prefix == "site1.lensbus"


def test_toml_file(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "capture.toml",
        """\
camera = "garage"
source = "/data/videos/garage.mp4"
fps = 8
loop = true
metrics_port = 9300
""",
    )
    s = load_settings(CaptureSettings, path)
    assert (s.camera, s.source, s.fps, s.loop, s.metrics_port) == (
        "garage",
        "/data/videos/garage.mp4",
        8.0,
        True,
        9300,
    )


def test_config_file_from_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write(tmp_path, "c.yml", "camera: attic\n")
    monkeypatch.setenv("LENSBUS_CAPTURE_CONFIG", str(path))
    assert load_settings(CaptureSettings).camera == "attic"


@pytest.mark.parametrize("suffix", [".yaml", ".toml"])
def test_env_overrides_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, suffix: str) -> None:
    text = "camera: porch\nfps: 5\n" if suffix == ".yaml" else 'camera = "porch"\nfps = 5\n'
    path = write(tmp_path, f"capture{suffix}", text)
    monkeypatch.setenv("LENSBUS_CAPTURE_FPS", "25")
    s = load_settings(CaptureSettings, path)
    assert s.fps == 25.0  # env wins
    assert s.camera == "porch"  # the file still supplies what env does not


def test_overrides_beat_env_and_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write(tmp_path, "capture.yaml", "fps: 5\n")
    monkeypatch.setenv("LENSBUS_CAPTURE_FPS", "25")
    assert load_settings(CaptureSettings, path, fps=30).fps == 30.0


def test_file_is_not_sticky_between_loads(tmp_path: Path) -> None:
    path = write(tmp_path, "capture.yaml", "camera: porch\n")
    assert load_settings(CaptureSettings, path).camera == "porch"
    assert load_settings(CaptureSettings).camera == "cam1"


@pytest.mark.parametrize(
    ("name", "text"),
    [
        ("capture.yaml", "camera: porch\nfsp: 10\n"),
        ("capture.toml", 'camera = "porch"\nfsp = 10\n'),
    ],
)
def test_unknown_key_in_file_names_it(tmp_path: Path, name: str, text: str) -> None:
    with pytest.raises(SettingsError) as info:
        load_settings(CaptureSettings, write(tmp_path, name, text))
    msg = str(info.value)
    assert "invalid capture settings" in msg
    assert "fsp: unknown setting" in msg


def test_misspelt_env_var_names_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LENSBUS_CAPTURE_JPEG_QUALTY", "90")
    monkeypatch.setenv("LENSBUS_CAPTURE_FPS", "10")  # a correct one beside it is fine
    with pytest.raises(SettingsError) as info:
        load_settings(CaptureSettings)
    msg = str(info.value)
    assert "LENSBUS_CAPTURE_JPEG_QUALTY" in msg and "unknown setting" in msg
    assert "LENSBUS_CAPTURE_FPS" not in msg


def test_env_var_of_another_service_is_not_ours(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LENSBUS_INFERENCE_WHATEVER", "1")
    monkeypatch.setenv("LENSBUS_DEMO_FPS", "1")  # unknown to demo, but demo is not loaded
    assert load_settings(CaptureSettings).camera == "cam1"


@pytest.mark.parametrize(
    ("var", "value", "field"),
    [
        ("LENSBUS_CAPTURE_FPS", "-5", "fps"),
        ("LENSBUS_CAPTURE_FPS", "fast", "fps"),
        ("LENSBUS_CAPTURE_JPEG_QUALITY", "0", "jpeg_quality"),
        ("LENSBUS_CAPTURE_WIDTH", "100000", "width"),
        ("LENSBUS_CAPTURE_CAMERA", "front.door", "camera"),
        ("LENSBUS_CAPTURE_PREFIX", "lens bus", "prefix"),
        ("LENSBUS_CAPTURE_INSTANCE", "host 1", "instance"),
        ("LENSBUS_CAPTURE_NATS_URL", "http://10.0.0.2:4222", "nats_url"),
        ("LENSBUS_CAPTURE_METRICS_PORT", "70000", "metrics_port"),
        ("LENSBUS_CAPTURE_LOG_LEVEL", "LOUD", "log_level"),
        ("LENSBUS_CAPTURE_LOOP", "maybe", "loop"),
    ],
)
def test_bad_env_value_names_field_and_env_var(
    monkeypatch: pytest.MonkeyPatch, var: str, value: str, field: str
) -> None:
    monkeypatch.setenv(var, value)
    with pytest.raises(SettingsError) as info:
        load_settings(CaptureSettings)
    msg = str(info.value)
    assert f"{field} (env {var})" in msg, msg
    assert repr(value) in msg or value in msg  # says what it got


def test_bad_file_value_names_field(tmp_path: Path) -> None:
    with pytest.raises(SettingsError) as info:
        load_settings(CaptureSettings, write(tmp_path, "capture.yaml", "jpeg_quality: 101\n"))
    assert "jpeg_quality" in str(info.value) and "101" in str(info.value)


def test_every_bad_field_is_named_at_once(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LENSBUS_CAPTURE_FPS", "0")
    monkeypatch.setenv("LENSBUS_CAPTURE_JPEG_QUALITY", "500")
    with pytest.raises(SettingsError) as info:
        load_settings(CaptureSettings)
    assert "fps (env LENSBUS_CAPTURE_FPS)" in str(info.value)
    assert "jpeg_quality (env LENSBUS_CAPTURE_JPEG_QUALITY)" in str(info.value)


def test_missing_config_file_names_it(tmp_path: Path) -> None:
    with pytest.raises(SettingsError, match="nope.yaml not found"):
        load_settings(CaptureSettings, tmp_path / "nope.yaml")


def test_config_file_of_unknown_type(tmp_path: Path) -> None:
    with pytest.raises(SettingsError, match=r"must be \.yaml, \.yml or \.toml"):
        load_settings(CaptureSettings, write(tmp_path, "capture.json", "{}"))


def test_toml_syntax_error_is_a_settings_error(tmp_path: Path) -> None:
    with pytest.raises(SettingsError, match="invalid capture settings"):
        load_settings(CaptureSettings, write(tmp_path, "capture.toml", "fps = \n"))


@pytest.mark.parametrize(
    "text", ["fps: [1, 2\ncamera: x\n", "- 1\n- 2\n"], ids=["syntax-error", "not-a-mapping"]
)
def test_broken_yaml_file_is_a_settings_error(tmp_path: Path, text: str) -> None:
    with pytest.raises(SettingsError, match="invalid capture settings"):
        load_settings(CaptureSettings, write(tmp_path, "capture.yaml", text))


# --- a service of our own ------------------------------------------------------------------


def test_subclass_reads_its_own_prefix(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write(tmp_path, "demo.toml", 'threshold = 0.25\nlabels = ["cat", "dog"]\n')
    monkeypatch.setenv("LENSBUS_DEMO_BATCH", "8")
    monkeypatch.setenv("LENSBUS_DEMO_NATS_URL", "tls://nats.example:4222")
    monkeypatch.setenv("LENSBUS_CAPTURE_FPS", "99")  # another service's: ignored
    s = load_settings(DemoSettings, path)
    assert (s.threshold, s.labels, s.batch) == (0.25, ["cat", "dog"], 8)
    assert s.nats_servers == ["tls://nats.example:4222"]


def test_subclass_env_list_is_json(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LENSBUS_DEMO_LABELS", '["car", "bus"]')
    assert load_settings(DemoSettings).labels == ["car", "bus"]


def test_subclass_errors_name_its_fields(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LENSBUS_DEMO_THRESHOLD", "1.5")
    monkeypatch.setenv("LENSBUS_DEMO_BACTH", "8")
    with pytest.raises(SettingsError) as info:
        load_settings(DemoSettings)
    # The typo is reported first, and alone: it is the likelier cause.
    assert "invalid demo settings" in str(info.value)
    assert "LENSBUS_DEMO_BACTH" in str(info.value)
    monkeypatch.delenv("LENSBUS_DEMO_BACTH")
    with pytest.raises(SettingsError, match=r"threshold \(env LENSBUS_DEMO_THRESHOLD\)"):
        load_settings(DemoSettings)


def test_secrets_do_not_show(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LENSBUS_DEMO_NATS_PASSWORD", "hunter2")
    s = load_settings(DemoSettings)
    assert s.nats_password is not None and s.nats_password.get_secret_value() == "hunter2"
    assert "hunter2" not in repr(s) and "hunter2" not in str(s.model_dump())


@pytest.mark.parametrize("cls", [CaptureSettings, DemoSettings])
def test_env_prefix_matches_service_name(cls: type[ServiceSettings]) -> None:
    # The typo check uses env_prefix(); pydantic-settings reads model_config["env_prefix"].
    # If they ever differ, every variable is silently ignored.
    assert cls.model_config.get("env_prefix") == cls.env_prefix()


def test_jetstream_replicas_empty_is_unset_and_zero_names_the_field(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """compose passes ``${LENSBUS_JETSTREAM_REPLICAS:-}``: empty means "not mine to decide"
    (None: an existing count is left alone), a number is checked."""
    monkeypatch.setenv("LENSBUS_DEMO_JETSTREAM_REPLICAS", "")
    assert load_settings(DemoSettings).jetstream_replicas is None
    monkeypatch.setenv("LENSBUS_DEMO_JETSTREAM_REPLICAS", "3")
    assert load_settings(DemoSettings).jetstream_replicas == 3
    monkeypatch.setenv("LENSBUS_DEMO_JETSTREAM_REPLICAS", "0")
    with pytest.raises(SettingsError, match="jetstream_replicas"):
        load_settings(DemoSettings)
