"""The subject catalogue: every subject under one prefix, ids validated to safe tokens."""

from __future__ import annotations

import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from lensbus import InvalidName, Subjects, validate_camera_id
from lensbus.subjects import DEFAULT_PREFIX, DEPLOYER_VERBS, validate_prefix, validate_token

BAD_CAMERA_IDS = [
    pytest.param("cam.1", id="dot"),
    pytest.param("cam*", id="star"),
    pytest.param("*", id="only-star"),
    pytest.param(">", id="gt"),
    pytest.param("cam>", id="trailing-gt"),
    pytest.param("cam 1", id="space"),
    pytest.param("cam\t1", id="tab"),
    pytest.param("cam1\n", id="trailing-newline"),  # would end a NATS protocol line
    pytest.param("cam1\r\nPUB x 1", id="protocol-injection"),
    pytest.param("", id="empty"),
    pytest.param("c" * 65, id="too-long"),
    pytest.param("caméra", id="unicode-accent"),
    pytest.param("камера", id="unicode-cyrillic"),
    pytest.param("cam\u00a01", id="nbsp"),
    pytest.param("cam/1", id="slash"),
    pytest.param("cam:1", id="colon"),
]


def test_default_prefix_subjects() -> None:
    s = Subjects()
    assert s.prefix == DEFAULT_PREFIX == "lensbus"
    assert s.frames("cam1") == "lensbus.frames.cam1"
    assert s.results("cam1") == "lensbus.results.cam1"
    assert s.events("cam1") == "lensbus.events.cam1"
    assert s.status("capture", "host-1") == "lensbus.status.capture.host-1"
    assert s.deployer_api("activate") == "lensbus.api.deployer.activate"
    for verb in DEPLOYER_VERBS:
        assert s.deployer_api(verb) == f"lensbus.api.deployer.{verb}"
    assert s.all_frames() == "lensbus.frames.*"
    assert s.all_results() == "lensbus.results.*"
    assert s.all_events() == "lensbus.events.*"
    assert s.all_status() == "lensbus.status.>"


@pytest.mark.parametrize("prefix", ["site1", "site-1.lensbus", "a.b.c", "A_B"])
def test_custom_prefix_subjects(prefix: str) -> None:
    s = Subjects(prefix)
    assert s.frames("cam1") == f"{prefix}.frames.cam1"
    assert s.results("cam_2") == f"{prefix}.results.cam_2"
    assert s.events("door-3") == f"{prefix}.events.door-3"
    assert s.status("inference", "gpu-0") == f"{prefix}.status.inference.gpu-0"
    assert s.deployer_api("rollback") == f"{prefix}.api.deployer.rollback"
    assert s.all_frames() == f"{prefix}.frames.*"
    assert s.all_status() == f"{prefix}.status.>"
    # Two installations on one server never see each other's frames.
    assert s.frames("cam1") != Subjects().frames("cam1")


@pytest.mark.parametrize("camera", ["a", "cam1", "Door-2_b", "0", "c" * 64])
def test_valid_camera_ids(camera: str) -> None:
    assert validate_camera_id(camera) == camera
    s = Subjects()
    for subject in (s.frames(camera), s.results(camera), s.events(camera)):
        assert subject.split(".")[-1] == camera
        assert s.camera_of(subject) == camera


@pytest.mark.parametrize("camera", BAD_CAMERA_IDS)
def test_invalid_camera_id_is_refused_naming_it(camera: str) -> None:
    with pytest.raises(InvalidName) as info:
        validate_camera_id(camera)
    assert repr(camera) in str(info.value)
    assert "camera id" in str(info.value)
    # Every builder that takes a camera validates it: none may build a wildcard or a
    # subject with an extra token.
    s = Subjects()
    for build in (s.frames, s.results, s.events):
        with pytest.raises(InvalidName, match="camera id"):
            build(camera)


@pytest.mark.parametrize("value", [None, 5, b"cam1", ["cam1"]])
def test_non_string_camera_id_is_refused(value: object) -> None:
    with pytest.raises(InvalidName, match="invalid camera id"):
        validate_camera_id(value)


def test_invalid_name_is_a_value_error() -> None:
    # pydantic turns a ValueError in a validator into a field error: CameraId relies on it.
    assert issubclass(InvalidName, ValueError)


def test_status_and_api_tokens_are_validated_naming_what() -> None:
    s = Subjects()
    with pytest.raises(InvalidName, match=r"service name 'cap\.ture'"):
        s.status("cap.ture", "i1")
    with pytest.raises(InvalidName, match=r"instance id 'host 1'"):
        s.status("capture", "host 1")
    for verb in (">", "*", "deploy", "list.all", ""):
        with pytest.raises(InvalidName, match=re.escape(f"unknown deployer verb {verb!r}")):
            s.deployer_api(verb)
    with pytest.raises(InvalidName, match="'thing' 'x.y'"):
        validate_token("x.y", "'thing'")


@pytest.mark.parametrize(
    "prefix",
    [
        "",
        ".lensbus",
        "lensbus.",
        "a..b",
        "lens bus",
        "lens*",
        ">",
        "lensbus.>",
        "lensbus.*",
        "préfixe",
        "lensbus\n",
        "a." + "b" * 65,
    ],
)
def test_invalid_prefix_is_refused_naming_it(prefix: str) -> None:
    with pytest.raises(InvalidName) as info:
        validate_prefix(prefix)
    assert repr(prefix) in str(info.value) and "prefix" in str(info.value)
    with pytest.raises(InvalidName):
        Subjects(prefix)


@given(st.text(max_size=80))
def test_any_text_is_a_single_safe_token_or_refused(camera: str) -> None:
    try:
        subject = Subjects().frames(camera)
    except InvalidName as exc:
        assert repr(camera) in str(exc)
        return
    assert subject.count(".") == 2 and subject.startswith("lensbus.frames.")
    assert not any(c in camera for c in ".*> \t\r\n")
    assert camera.isascii() and 1 <= len(camera) <= 64
    assert Subjects().camera_of(subject) == camera


@given(st.from_regex(r"\A[A-Za-z0-9_-]{1,64}\Z"))
def test_every_token_of_the_documented_alphabet_is_accepted(camera: str) -> None:
    assert Subjects().results(camera).endswith("." + camera)
