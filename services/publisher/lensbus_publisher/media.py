"""What the page shows of the events: the recent events with their snapshot and clip, the
snapshots and the clips themselves (read from the object stores), and a clip played back in
the browser as an MJPEG stream (browsers do not play AVI in a page; the file downloads).

These routes sit behind the same token check as every other (web.py installs them).
"""

from __future__ import annotations

import asyncio
import re

from aiohttp import web
from nats.js.object_store import ObjectStore

from lensbus.clips import CONTENT_TYPE, ClipError, list_clips, read_avi, read_clip
from lensbus.schemas import parse_clip_id
from lensbus.subjects import TOKEN_PATTERN
from lensbus_publisher.clips import Clips
from lensbus_publisher.config import PublisherSettings
from lensbus_publisher.durable import Durable
from lensbus_publisher.hub import Hub

_SNAPSHOT_FILE = re.compile(r"^[0-9]{1,20}-[0-9]{1,20}\.jpg$")
_CAMERA = re.compile(TOKEN_PATTERN)
BOUNDARY = "lensbusclip"
MAX_PLAY_FPS = 60.0


def _error(cls: type[web.HTTPError], text: str) -> web.HTTPError:
    return cls(text=f'{{"error": "{text}"}}', content_type="application/json")


class Media:
    def __init__(self, settings: PublisherSettings, hub: Hub) -> None:
        self.s = settings
        self.hub = hub
        self.durable: Durable | None = None
        self.clips: Clips | None = None

    def bind(self, durable: Durable, clips: Clips | None) -> None:
        self.durable = durable
        self.clips = clips

    def install(self, app: web.Application) -> None:
        r = app.router
        r.add_get("/api/events", self.api_events)
        r.add_get("/api/clips", self.api_clips)
        r.add_get("/snapshots/{camera}/{file}", self.snapshot)
        r.add_get("/clips/{clip}", self.clip)
        r.add_get("/clips/{clip}/play.mjpeg", self.play, allow_head=False)

    async def api_events(self, request: web.Request) -> web.Response:
        states = dict(self.clips.states) if self.clips is not None else {}
        return web.json_response({"events": self.hub.events_view(states)})

    def _store(self, which: str) -> ObjectStore:
        d = self.durable
        store = None if d is None else (d.clips if which == "clips" else d.snapshots)
        if store is None:
            raise _error(web.HTTPServiceUnavailable, f"the {which} store is not in place")
        return store

    async def api_clips(self, request: web.Request) -> web.Response:
        camera = request.query.get("camera")
        store = self._store("clips")
        clips = await list_clips(store, camera)
        return web.json_response({"clips": [c.model_dump(mode="json") for c in reversed(clips)]})

    async def snapshot(self, request: web.Request) -> web.Response:
        camera, file = request.match_info["camera"], request.match_info["file"]
        if not _CAMERA.match(camera) or not _SNAPSHOT_FILE.match(file):
            raise _error(web.HTTPNotFound, "no such snapshot")
        store = self._store("snapshots")
        try:
            got = await store.get(f"{camera}/{file}")
        except Exception:
            raise _error(web.HTTPNotFound, "no such snapshot") from None
        return web.Response(
            body=got.data, content_type="image/jpeg", headers={"Cache-Control": "max-age=3600"}
        )

    async def _clip(self, request: web.Request) -> tuple[str, bytes]:
        clip = request.match_info["clip"]
        try:
            parse_clip_id(clip)
        except ValueError:
            raise _error(web.HTTPNotFound, "no such clip") from None
        store = self._store("clips")
        try:
            _, data = await read_clip(store, clip)
        except ClipError:
            raise _error(web.HTTPNotFound, "no such clip (not kept, or not yet)") from None
        return clip, data

    async def clip(self, request: web.Request) -> web.Response:
        """The clip as stored: an MJPEG AVI, downloaded as ``<id>.avi``."""
        clip, data = await self._clip(request)
        return web.Response(
            body=data,
            content_type=CONTENT_TYPE,
            headers={
                "Content-Disposition": f'attachment; filename="{clip}.avi"',
                "Cache-Control": "max-age=3600",
            },
        )

    async def play(self, request: web.Request) -> web.StreamResponse:
        """The clip's frames once, at its frame rate, as multipart MJPEG (an <img> plays it)."""
        _, data = await self._clip(request)
        try:
            avi = await asyncio.to_thread(read_avi, data)
        except ClipError as exc:
            raise _error(web.HTTPInternalServerError, str(exc)) from None
        resp = web.StreamResponse(
            headers={
                "Content-Type": f"multipart/x-mixed-replace; boundary={BOUNDARY}",
                "Cache-Control": "no-cache, no-store",
            }
        )
        await resp.prepare(request)
        interval = 1.0 / min(avi.fps, MAX_PLAY_FPS)
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        try:
            for i, jpeg in enumerate(avi.frames):
                head = (
                    f"--{BOUNDARY}\r\nContent-Type: image/jpeg\r\n"
                    f"Content-Length: {len(jpeg)}\r\nX-Frame: {i}\r\n\r\n"
                ).encode()
                async with asyncio.timeout(self.s.viewer_stall_s):
                    await resp.write(head + jpeg + b"\r\n")
                await asyncio.sleep(max(0.0, t0 + (i + 1) * interval - loop.time()))
        except (ConnectionError, TimeoutError):
            pass
        return resp
