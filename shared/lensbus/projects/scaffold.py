"""``lensbus project init NAME [DIR]``: a project that runs at once.

It needs no model of its own (it handles whatever its group's model finds), counts the
results holding its ``label`` setting, publishes the count on its ``count`` topic, draws a
box per detection on the project stream, and raises an event when the label is first seen
on a camera. It passes every check of :mod:`lensbus.projects.package`.
"""

from __future__ import annotations

import json
from pathlib import Path

from lensbus.errors import PackageError
from lensbus.schemas.project import DEFAULT_HANDLER, MANIFEST_FILE
from lensbus.subjects import InvalidName, validate_token

DEFAULT_LABEL = "person"

HANDLER = '''"""{name}: counts the results whose detections hold the label of its settings.

Every result of every camera of its groups comes to on_result, one at a time. See the
project's README.md for what ctx offers.
"""


def on_start(ctx):
    ctx.log.info("counting %r on every camera of the group", ctx.settings["label"])


def on_result(result, ctx):
    label = ctx.settings["label"]
    if result.detections:
        # Drawn on the project stream (/cameras/<id>/project.mjpeg) for a second.
        ctx.overlay(
            [
                {{
                    "shape": "box",
                    "points": [[d.box.xmin, d.box.ymin], [d.box.xmax, d.box.ymax]],
                    "text": f"{{d.label}} {{d.score:.2f}}",
                    "color": "#ff0000" if d.label == label else "#00ff00",
                }}
                for d in result.detections
            ]
        )
    hits = [d for d in result.detections if d.label == label]
    if not hits:
        return
    key = f"count-{{ctx.camera}}"  # state keys are subject tokens: no dots
    count = ctx.state.get(key, 0) + 1
    ctx.state.set(key, count)
    ctx.counter("results_with_label", "results holding the label").inc()
    ctx.publish("count", {{"label": label, "count": count, "in_frame": len(hits)}})
    if count == 1:
        best = max(hits, key=lambda d: d.score)
        ctx.event(label, score=best.score, box=best.box, detail={{"first_seen": True}})


def on_stop(ctx):
    ctx.log.info("stopped")
'''

README = """# {name}

A lensbus project: `handler.py` counts the results holding the label of its settings.

- Check and run it against a live camera:  `lensbus project run . --camera cam1`
- Deploy it to the `default` group:        `lensbus project deploy .`
- Watch what it publishes:                 `lensbus project watch {name} --topic count`
- See it run:                              `lensbus project status {name}`
- Change the label in `project.json` (`settings.label`), bump `version`, deploy again;
  `lensbus project rollback {name}` goes back. ctx: publish, event, overlay, state, frame.
"""


def manifest(name: str) -> dict[str, object]:
    return {
        "name": name,
        "version": "1",
        "description": f"counts the results holding settings.label (lensbus project init {name})",
        "handler": DEFAULT_HANDLER,
        "groups": ["default"],
        "settings": {"label": DEFAULT_LABEL},
        "settings_schema": {
            "type": "object",
            "properties": {
                "label": {
                    "type": "string",
                    "minLength": 1,
                    "description": "the detection label to count",
                }
            },
            "required": ["label"],
            "additionalProperties": False,
        },
        "limits": {"deadline_s": 10.0, "mailbox": 2},
    }


def init(name: str, dest: str | Path | None = None) -> Path:
    """Write the project ``name`` into ``dest`` (default ``./NAME``), which must be empty or
    missing; returns the folder."""
    try:
        validate_token(name, "project name")
    except InvalidName as exc:
        raise PackageError(str(exc)) from None
    folder = Path(dest) if dest is not None else Path(name)
    if folder.exists() and (not folder.is_dir() or any(folder.iterdir())):
        raise PackageError(f"{folder} exists and is not an empty folder: choose another")
    folder.mkdir(parents=True, exist_ok=True)
    (folder / MANIFEST_FILE).write_text(json.dumps(manifest(name), indent=2) + "\n")
    (folder / DEFAULT_HANDLER).write_text(HANDLER.format(name=name))
    (folder / "README.md").write_text(README.format(name=name))
    return folder
