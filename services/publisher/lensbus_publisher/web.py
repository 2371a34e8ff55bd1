"""The publisher's HTTP routes: the page, the MJPEG streams, results as Server-Sent Events,
the JSON API, and the token check in front of them all.

Every stream writes the newest item there is when its viewer is ready for one: nothing
queues per viewer but one item (and the socket's buffer). A viewer that takes nothing for
``viewer_stall_s`` is cut off.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import time
from collections.abc import Awaitable, Callable, Iterator
from importlib import resources
from urllib.parse import quote

from aiohttp import web

from lensbus import __version__
from lensbus.errors import InvalidName, LensbusError
from lensbus.logs import RateLimit, log_limited
from lensbus.subjects import validate_token
from lensbus_publisher import metrics
from lensbus_publisher.camera import Camera, ProjectView, Signal
from lensbus_publisher.config import PublisherSettings
from lensbus_publisher.hub import Hub
from lensbus_publisher.media import Media
from lensbus_publisher.project import ProjectRenderer
from lensbus_publisher.sse import Subscribers

log = logging.getLogger(__name__)

BOUNDARY = "lensbusframe"
OPEN_PATHS = frozenset({"/healthz"})  # health probes carry no token
GONE_CHECK_S = 5.0  # how often a stream waiting for its next frame checks its viewer is there
# No 'unsafe-inline': the page's script and styles are files (static/), so markup that got
# into the page some other way can neither run script nor restyle it.
CSP = (
    "default-src 'self'; img-src 'self' data: blob:; style-src 'self'; script-src 'self'; "
    "connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'none'"
)
ASSETS = {"app.js": "text/javascript", "live.js": "text/javascript", "app.css": "text/css"}
STREAM_HEADERS = {
    "Cache-Control": "no-cache, no-store, must-revalidate",
    "Pragma": "no-cache",
    "X-Accel-Buffering": "no",
}

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class Stalled(LensbusError):
    """A viewer took no data for viewer_stall_s."""


def part_head(length: int, headers: dict[str, object]) -> bytes:
    lines = [f"--{BOUNDARY}", "Content-Type: image/jpeg", f"Content-Length: {length}"]
    lines += [f"{k}: {v}" for k, v in headers.items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def static_file(name: str) -> bytes:
    return resources.files("lensbus_publisher").joinpath("static", name).read_bytes()


def page_html() -> bytes:
    return static_file("index.html")


def token_of(request: web.Request) -> str | None:
    auth = request.headers.get("Authorization", "")
    scheme, _, value = auth.partition(" ")
    if scheme.lower() == "bearer" and value.strip():
        return value.strip()
    return request.query.get("token")


class Web:
    def __init__(self, settings: PublisherSettings, hub: Hub, renderer: ProjectRenderer) -> None:
        self.s = settings
        self.hub = hub
        self.renderer = renderer
        self.media = Media(settings, hub)  # events, snapshots, clips (bound once started)
        self.open_streams = 0
        self.started = time.monotonic()
        self._page = page_html()
        self._assets = {name: static_file(name) for name in ASSETS}
        self._token = settings.token.get_secret_value().encode() if settings.token else None
        self._limit = RateLimit(60.0)

    def install(self, app: web.Application) -> None:
        """Add the routes and the token check to ``app`` (the Runtime's server)."""
        app.middlewares.append(self._auth)
        app.on_response_prepare.append(self._headers)
        r = app.router
        r.add_get("/", self.page)
        r.add_get("/static/{name}", self.asset)
        r.add_get("/api/cameras", self.api_cameras)
        r.add_get("/api/status", self.api_status)
        r.add_get("/api/cameras/{camera}/zones", self.api_zones)
        # Streams answer GET only: a HEAD would hold a handler that never writes a byte.
        r.add_get("/results", self.results_all, allow_head=False)
        r.add_get("/cameras/{camera}/device.mjpeg", self.device, allow_head=False)
        r.add_get("/cameras/{camera}/project.mjpeg", self.project, allow_head=False)
        r.add_get("/cameras/{camera}/results", self.results, allow_head=False)
        self.media.install(app)

    # ---- cross-cutting -------------------------------------------------------------------

    @web.middleware
    async def _auth(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        if self._token is not None and request.path not in OPEN_PATHS:
            given = token_of(request)
            if given is None or not hmac.compare_digest(given.encode(), self._token):
                metrics.UNAUTHORIZED.inc()
                return web.json_response(
                    {"error": "unauthorized: send 'Authorization: Bearer <token>' or ?token="},
                    status=401,
                    headers={"WWW-Authenticate": 'Bearer realm="lensbus"'},
                )
        return await handler(request)

    async def _headers(self, request: web.Request, response: web.StreamResponse) -> None:
        response.headers.setdefault("Content-Security-Policy", CSP)
        response.headers.setdefault("Referrer-Policy", "no-referrer")  # ?token= stays here
        response.headers.setdefault("X-Content-Type-Options", "nosniff")

    def _camera(self, request: web.Request) -> Camera:
        cam = self.hub.cameras.get(request.match_info["camera"])
        if cam is None:
            raise web.HTTPNotFound(
                text='{"error": "no such camera (see /api/cameras)"}',
                content_type="application/json",
            )
        return cam

    @contextlib.contextmanager
    def _viewing(self, camera: str, stream: str, cam: Camera | None) -> Iterator[None]:
        if self.open_streams >= self.s.max_viewers:
            raise web.HTTPServiceUnavailable(
                text='{"error": "too many open streams (max_viewers)"}',
                content_type="application/json",
            )
        self.open_streams += 1
        if cam is not None:
            cam.viewers[stream] += 1
        gauge = metrics.VIEWERS.labels(camera, stream)
        gauge.inc()
        try:
            yield
        finally:
            self.open_streams -= 1
            if cam is not None:
                cam.viewers[stream] -= 1
            gauge.dec()

    async def _write(self, resp: web.StreamResponse, *chunks: bytes) -> None:
        try:
            async with asyncio.timeout(self.s.viewer_stall_s):
                for chunk in chunks:
                    await resp.write(chunk)
        except TimeoutError:
            raise Stalled from None

    async def _next(self, request: web.Request, signal: Signal, version: int) -> None:
        """Wait for something newer than ``version``; raise ConnectionResetError if the
        viewer went away meanwhile (a camera that stopped would otherwise keep it counted)."""
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(signal.wait(version), GONE_CHECK_S)
                return
            if request.transport is None or request.transport.is_closing():
                raise ConnectionResetError("viewer gone")

    def _cut_off(self, request: web.Request, stream: str, camera: str) -> None:
        metrics.VIEWER_DROPS.labels(stream, "stalled").inc()
        log_limited(
            log,
            self._limit,
            f"stall:{stream}",
            logging.WARNING,
            "cut off a %s viewer of %s: took nothing for %.0f s",
            stream,
            camera,
            self.s.viewer_stall_s,
        )
        if request.transport is not None:
            request.transport.abort()

    # ---- page and API --------------------------------------------------------------------

    async def page(self, request: web.Request) -> web.Response:
        return web.Response(
            body=self._page_for(request),
            content_type="text/html",
            charset="utf-8",
            headers={"Cache-Control": "no-cache"},
        )

    def _page_for(self, request: web.Request) -> bytes:
        """The page; opened with ?token=, its script and styles URLs carry that token too
        (a browser sends nothing else with them). Only the right token goes in, URL-quoted:
        it is in the address bar already, and no markup can come from it."""
        given = request.query.get("token")
        if self._token is None or not given:
            return self._page
        if not hmac.compare_digest(given.encode(), self._token):
            return self._page  # the header let this request in, not the query's value
        page, tail = self._page, "?token=" + quote(given, safe="")
        for name in ASSETS:
            page = page.replace(f'"/static/{name}"'.encode(), f'"/static/{name}{tail}"'.encode())
        return page

    async def asset(self, request: web.Request) -> web.Response:
        name = request.match_info["name"]
        if name not in ASSETS:
            raise web.HTTPNotFound(
                text='{"error": "no such file"}', content_type="application/json"
            )
        return web.Response(
            body=self._assets[name],
            content_type=ASSETS[name],
            charset="utf-8",
            headers={"Cache-Control": "no-cache"},
        )

    async def api_cameras(self, request: web.Request) -> web.Response:
        return web.json_response({"cameras": self.hub.cameras_view()})

    async def api_zones(self, request: web.Request) -> web.Response:
        """The camera's zones and lines with their occupancy and in/out counts."""
        cam = self._camera(request)
        newest = next(reversed(cam.results.values()), None) if cam.results else None
        result = None if newest is None else newest.result
        overlays = self.renderer.overlays
        if overlays is None:  # not started yet
            raise web.HTTPServiceUnavailable(text='{"error": "starting"}')
        return web.json_response(overlays.view(cam.id, result))

    async def api_status(self, request: web.Request) -> web.Response:
        return web.json_response(
            {
                "services": self.hub.status_view(),
                "publisher": {
                    "version": __version__,
                    "instance": self.s.instance,
                    "uptime_s": round(time.monotonic() - self.started, 1),
                    "open_streams": self.open_streams,
                },
            }
        )

    # ---- MJPEG -----------------------------------------------------------------------------

    async def _mjpeg(self, request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(
            headers={
                "Content-Type": f"multipart/x-mixed-replace; boundary={BOUNDARY}",
                **STREAM_HEADERS,
            }
        )
        await resp.prepare(request)
        return resp

    async def device(self, request: web.Request) -> web.StreamResponse:
        """The frames as published: the JPEG bytes untouched."""
        cam = self._camera(request)
        with self._viewing(cam.id, "device", cam):
            resp = await self._mjpeg(request)
            served = metrics.FRAMES_SERVED.labels(cam.id, "device")
            sent = None
            try:
                while not self.hub.closing:
                    version = cam.frame_signal.version
                    frame = cam.newest
                    if frame is not None and frame is not sent:
                        head = part_head(
                            len(frame.jpeg), {"X-Seq": frame.seq, "X-Capture-Ns": frame.capture_ns}
                        )
                        await self._write(resp, head, frame.jpeg, b"\r\n")
                        served.inc()
                        sent = frame
                        if cam.frame_signal.version != version:
                            continue  # a newer frame came while this one was written
                    await self._next(request, cam.frame_signal, version)
            except Stalled:
                self._cut_off(request, "device", cam.id)
            except ConnectionError:
                pass
            return resp

    @contextlib.contextmanager
    def _watching(self, request: web.Request, cam: Camera) -> Iterator[ProjectView]:
        """Watching the project stream asked for: every project's (``""``), or
        ``?project=NAME``'s."""
        key = request.query.get("project", "")
        try:
            view = cam.view(validate_token(key, "project name") if key else "")
        except InvalidName as exc:
            error = json.dumps({"error": str(exc)})
            raise web.HTTPBadRequest(text=error, content_type="application/json") from None
        if view is None:
            raise web.HTTPServiceUnavailable(
                text='{"error": "too many project streams of this camera"}',
                content_type="application/json",
            )
        with cam.watching(view):
            yield view

    async def project(self, request: web.Request) -> web.StreamResponse:
        """The frames with the model's output and the projects' overlays drawn, each drawn
        once for every viewer; or, while a project sends them, the frames it drew."""
        cam = self._camera(request)
        with self._viewing(cam.id, "project", cam), self._watching(request, cam) as view:
            self.renderer.watch(cam, view)
            resp = await self._mjpeg(request)
            served = metrics.FRAMES_SERVED.labels(cam.id, "project")
            sent = view.out
            if sent is not None and (
                sent.fresh(time.monotonic())
                and (sent.drawn_by or cam.newest is None or sent.seq == cam.newest.seq)
            ):
                sent = None  # current: show it at once; else wait for the next one
            try:
                while not self.hub.closing:
                    version = view.signal.version
                    out = view.out
                    if out is not None and out is not sent:
                        head = part_head(
                            len(out.jpeg),
                            {
                                "X-Seq": out.seq,
                                "X-Capture-Ns": out.capture_ns,
                                "X-Result-Seq": out.result_seq,
                                "X-Project": out.drawn_by or "-",
                            },
                        )
                        await self._write(resp, head, out.jpeg, b"\r\n")
                        served.inc()
                        sent = out
                        if view.signal.version != version:
                            continue
                    await self._next(request, view.signal, version)
            except Stalled:
                self._cut_off(request, "project", cam.id)
            except ConnectionError:
                pass
            return resp

    # ---- Server-Sent Events ----------------------------------------------------------------

    async def _sse(
        self,
        request: web.Request,
        camera: str,
        cam: Camera | None,
        subscribers: Subscribers,
        first: bytes | None,
    ) -> web.StreamResponse:
        with self._viewing(camera, "results", cam):
            resp = web.StreamResponse(
                headers={"Content-Type": "text/event-stream; charset=utf-8", **STREAM_HEADERS}
            )
            await resp.prepare(request)
            queue = subscribers.add(self.s.sse_queue)
            served = metrics.FRAMES_SERVED.labels(camera, "results")
            try:
                await self._write(resp, b"retry: 2000\n\n" + (first or b""))
                while not self.hub.closing:
                    try:
                        item = await asyncio.wait_for(queue.get(), self.s.sse_keepalive_s)
                    except TimeoutError:
                        await self._write(resp, b": keep-alive\n\n")
                        continue
                    if item is None:
                        break
                    await self._write(resp, item)
                    served.inc()
            except Stalled:
                self._cut_off(request, "results", camera)
            except ConnectionError:
                pass
            finally:
                subscribers.remove(queue)
            return resp

    async def results(self, request: web.Request) -> web.StreamResponse:
        """One camera's results (and the events raised on it) as they come."""
        cam = self._camera(request)
        first = cam.newest_result.sse if cam.newest_result else None
        return await self._sse(request, cam.id, cam, cam.subscribers, first)

    async def results_all(self, request: web.Request) -> web.StreamResponse:
        """Every camera's results and events (the page uses this one connection)."""
        first = b"".join(c.newest_result.sse for c in self.hub.cameras.values() if c.newest_result)
        return await self._sse(request, "*", None, self.hub.all_results, first or None)
