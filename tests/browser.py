"""A small headless-Chromium driver over the DevTools protocol (CDP), for the page tests.

Starts Debian's ``chromium`` with a fresh profile and ``--remote-debugging-port=0``, reads
the browser's websocket address from its stderr, and talks CDP over aiohttp's websocket
client (no new dependency)::

    async with Browser.launch(tmp_path) as browser:
        page = await browser.new_page(1400, 900)
        await page.goto("http://127.0.0.1:8080/")
        title = await page.eval("document.title")
        png = await page.screenshot()
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import itertools
import json
import re
import shutil
from pathlib import Path
from types import TracebackType
from typing import Any

import aiohttp

CHROMIUM = Path("/usr/bin/chromium")
FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-quic",
    "--disable-default-apps",
    "--disable-extensions",
    "--mute-audio",
    "--hide-scrollbars",
)
_WS = re.compile(rb"DevTools listening on (ws://\S+)")


class CDPError(RuntimeError):
    pass


def available() -> bool:
    return CHROMIUM.is_file() or shutil.which("chromium") is not None


class Browser:
    """One Chromium process and its browser-level CDP connection (flattened sessions)."""

    def __init__(self, proc: asyncio.subprocess.Process, profile: Path) -> None:
        self.proc = proc
        self.profile = profile
        self._http: aiohttp.ClientSession | None = None
        self._ws: aiohttp.ClientWebSocketResponse | None = None
        self._ids = itertools.count(1)
        self._pending: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self._listeners: list[tuple[str | None, asyncio.Queue[dict[str, Any]]]] = []
        self._reader: asyncio.Task[None] | None = None
        self._drain: asyncio.Task[None] | None = None
        self.stderr = b""

    @classmethod
    def launch(cls, workdir: Path, *extra: str) -> _Launch:
        return _Launch(workdir, extra)

    async def _connect(self, url: str) -> None:
        self._http = aiohttp.ClientSession()
        self._ws = await self._http.ws_connect(url, max_msg_size=0, heartbeat=None)
        self._reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        assert self._ws is not None
        async for msg in self._ws:
            if msg.type != aiohttp.WSMsgType.TEXT:
                continue
            data = json.loads(msg.data)
            if "id" in data:
                fut = self._pending.pop(data["id"], None)
                if fut is not None and not fut.done():
                    if "error" in data:
                        fut.set_exception(CDPError(json.dumps(data["error"])))
                    else:
                        fut.set_result(data.get("result", {}))
            else:
                for session, queue in self._listeners:
                    if session is None or data.get("sessionId") == session:
                        queue.put_nowait(data)
        for fut in self._pending.values():
            if not fut.done():
                fut.set_exception(CDPError("browser connection closed"))

    async def send(
        self,
        method: str,
        params: dict[str, Any] | None = None,
        session: str | None = None,
        timeout: float = 30.0,
    ) -> dict[str, Any]:
        assert self._ws is not None
        ident = next(self._ids)
        fut: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._pending[ident] = fut
        msg: dict[str, Any] = {"id": ident, "method": method, "params": params or {}}
        if session is not None:
            msg["sessionId"] = session
        await self._ws.send_str(json.dumps(msg))
        return await asyncio.wait_for(fut, timeout)

    def listen(self, session: str | None = None) -> asyncio.Queue[dict[str, Any]]:
        queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self._listeners.append((session, queue))
        return queue

    async def new_page(self, width: int = 1400, height: int = 900) -> Page:
        target = await self.send("Target.createTarget", {"url": "about:blank"})
        attached = await self.send(
            "Target.attachToTarget", {"targetId": target["targetId"], "flatten": True}
        )
        page = Page(self, attached["sessionId"])
        await page.start(width, height)
        return page

    async def close(self) -> None:
        if self._ws is not None and not self._ws.closed:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.send("Browser.close"), 5)
            await self._ws.close()
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader
        if self._http is not None:
            await self._http.close()
        if self.proc.returncode is None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.proc.wait(), 5)
        if self.proc.returncode is None:
            self.proc.kill()
            await self.proc.wait()


class _Launch:
    def __init__(self, workdir: Path, extra: tuple[str, ...]) -> None:
        self.workdir = workdir
        self.extra = extra
        self.browser: Browser | None = None

    async def __aenter__(self) -> Browser:
        profile = self.workdir / "chromium-profile"
        profile.mkdir(parents=True, exist_ok=True)
        exe = str(CHROMIUM) if CHROMIUM.is_file() else shutil.which("chromium") or "chromium"
        proc = await asyncio.create_subprocess_exec(
            exe,
            *FLAGS,
            f"--user-data-dir={profile}",
            "--remote-debugging-port=0",
            "--remote-debugging-address=127.0.0.1",
            *self.extra,
            "about:blank",
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE,
        )
        browser = Browser(proc, profile)
        self.browser = browser
        assert proc.stderr is not None
        try:
            async with asyncio.timeout(30):
                while True:
                    line = await proc.stderr.readline()
                    if not line:
                        raise CDPError(
                            f"chromium exited:\n{browser.stderr.decode(errors='replace')}"
                        )
                    browser.stderr += line
                    found = _WS.search(line)
                    if found:
                        break
        except BaseException:
            proc.kill()
            await proc.wait()
            raise
        # Keep draining stderr so Chromium never blocks on a full pipe.
        browser._drain = asyncio.create_task(_drain(proc.stderr))
        await browser._connect(found.group(1).decode())
        return browser

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self.browser is not None:
            await self.browser.close()
            drain = self.browser._drain
            if drain is not None:
                drain.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await drain


async def _drain(stream: asyncio.StreamReader) -> None:
    while await stream.read(65536):
        pass


class Page:
    """One tab, through its flattened CDP session."""

    def __init__(self, browser: Browser, session: str) -> None:
        self.browser = browser
        self.session = session
        self.events = browser.listen(session)
        self.console: list[str] = []
        self.errors: list[str] = []
        self.log: list[str] = []  # the browser's own messages: CSP refusals, failed loads

    async def send(self, method: str, params: dict[str, Any] | None = None) -> dict[str, Any]:
        return await self.browser.send(method, params, session=self.session)

    async def start(self, width: int, height: int) -> None:
        await self.send("Page.enable")
        await self.send("Runtime.enable")
        await self.send("Log.enable")
        await self.send(
            "Emulation.setDeviceMetricsOverride",
            {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": False},
        )

    def _handle(self, ev: dict[str, Any]) -> str | None:
        method, params = ev.get("method"), ev.get("params", {})
        if method == "Runtime.consoleAPICalled":
            args = params.get("args", [])
            text = " ".join(str(a.get("value", a.get("description", ""))) for a in args)
            self.console.append(f"{params.get('type')}: {text}")
        elif method == "Log.entryAdded":
            entry = params.get("entry", {})
            self.log.append(f"{entry.get('level')} {entry.get('source')}: {entry.get('text')}")
        elif method == "Runtime.exceptionThrown":
            d = params["exceptionDetails"]
            self.errors.append(d.get("exception", {}).get("description") or d.get("text", ""))
        return method

    def _collect(self) -> None:
        """Move console messages and uncaught exceptions seen so far into lists."""
        while not self.events.empty():
            self._handle(self.events.get_nowait())

    async def goto(self, url: str, timeout: float = 30.0) -> None:
        """Navigate and wait for the new document's DOM (streams never "finish" loading)."""
        self._collect()
        nav = await self.send("Page.navigate", {"url": url})
        if nav.get("errorText"):
            raise CDPError(f"navigation to {url} failed: {nav['errorText']}")
        async with asyncio.timeout(timeout):
            while self._handle(await self.events.get()) != "Page.domContentEventFired":
                pass

    async def eval(self, expression: str, timeout: float = 30.0) -> Any:
        res = await self.browser.send(
            "Runtime.evaluate",
            {"expression": expression, "awaitPromise": True, "returnByValue": True},
            session=self.session,
            timeout=timeout,
        )
        self._collect()
        if "exceptionDetails" in res:
            d = res["exceptionDetails"]
            raise CDPError(d.get("exception", {}).get("description") or d.get("text", ""))
        return res["result"].get("value")

    async def wait_for(self, expression: str, timeout: float = 30.0, every: float = 0.2) -> Any:
        """Evaluate until the result is truthy; return it."""
        deadline = asyncio.get_running_loop().time() + timeout
        last: Any = None
        while True:
            last = await self.eval(expression)
            if last:
                return last
            if asyncio.get_running_loop().time() > deadline:
                raise TimeoutError(f"{expression!r} still {last!r} after {timeout}s")
            await asyncio.sleep(every)

    def csp_violations(self) -> list[str]:
        """What the Content-Security-Policy refused so far (Chromium logs each refusal)."""
        self._collect()
        return [m for m in self.log + self.console if "Content Security Policy" in m]

    async def screenshot(self) -> bytes:
        res = await self.send("Page.captureScreenshot", {"format": "png"})
        return base64.b64decode(res["data"])
