"""Open an HTML file in a real headless Chromium and check it; write a full-page screenshot.

Used by tests/test_report.py (and by hand: ``python tools/browser_check.py FILE.html
--screenshot out.png``; exit status 1 when a check fails). Needs only the standard library and
a ``chromium`` binary (Debian: ``apt-get install -y --no-install-recommends chromium``).

How: Chromium is started with ``--remote-debugging-pipe`` and driven over the DevTools
protocol (NUL-terminated JSON messages on file descriptors 3 and 4: no websocket, no port, no
third-party client). With the Page, Runtime, Log and Network domains enabled before the
navigation, the check sees

* every console message of level error and every uncaught exception (``console_errors``),
  plus browser-side errors from the Log domain (failed resource loads, blocked requests);
* every request the page makes other than the page itself and ``data:`` URIs (``requests``:
  a self-contained report makes none);
* each ``<img>``: whether it loaded and decoded (``HTMLImageElement.decode()``), its natural
  size and the start of its ``src``.

The screenshot covers the whole page (``captureBeyondViewport``) at ``width`` CSS pixels.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import fcntl
import json
import os
import select
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, NamedTuple

CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")

_IMAGES_JS = """
(async () => {
  const imgs = Array.from(document.images);
  const decoded = await Promise.all(imgs.map(i => i.decode().then(() => true, () => false)));
  return {
    title: document.title,
    height: document.documentElement.scrollHeight,
    images: imgs.map((i, k) => ({
      src: i.getAttribute('src') ? i.getAttribute('src').slice(0, 48) : '',
      complete: i.complete, decoded: decoded[k],
      width: i.naturalWidth, height: i.naturalHeight, alt: i.alt})),
  };
})()
"""


class PageCheck(NamedTuple):
    """What the browser saw."""

    title: str
    height: int
    """Document height in CSS pixels."""
    images: list[dict[str, Any]]
    console_errors: list[str]
    requests: list[str]
    """URLs requested other than the page and data: URIs."""
    screenshot: Path

    def problems(self) -> list[str]:
        """Human-readable failures (empty when the page is fine)."""
        out = [f"console error: {e}" for e in self.console_errors]
        out += [f"network request: {u}" for u in self.requests]
        for img in self.images:
            if not (img["complete"] and img["decoded"] and img["width"] > 0):
                out.append(f"image not loaded: {img['alt'] or img['src']}")
        return out


def find_chromium() -> str | None:
    """The first Chromium-like binary on PATH, or None."""
    for name in CHROMIUM_NAMES:
        path = shutil.which(name)
        if path:
            return path
    return None


class DevToolsPipe:
    """A minimal DevTools-protocol client over Chromium's ``--remote-debugging-pipe``."""

    def __init__(self, write_fd: int, read_fd: int) -> None:
        self.write_fd = write_fd
        self.read_fd = read_fd
        self.buffer = b""
        self.next_id = 0
        self.events: list[dict[str, Any]] = []

    def send(self, method: str, params: dict[str, Any] | None = None, session: str | None = None):
        self.next_id += 1
        message: dict[str, Any] = {"id": self.next_id, "method": method, "params": params or {}}
        if session is not None:
            message["sessionId"] = session
        data = json.dumps(message).encode() + b"\0"
        while data:
            data = data[os.write(self.write_fd, data) :]
        return self.next_id

    def receive(self, deadline: float) -> dict[str, Any]:
        while b"\0" not in self.buffer:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("Chromium did not answer in time")
            ready, _, _ = select.select([self.read_fd], [], [], left)
            if not ready:
                continue
            chunk = os.read(self.read_fd, 1 << 20)
            if not chunk:
                raise ConnectionError("Chromium closed the DevTools pipe (it crashed or exited)")
            self.buffer += chunk
        raw, self.buffer = self.buffer.split(b"\0", 1)
        return json.loads(raw)

    def call(
        self,
        method: str,
        params: dict[str, Any] | None = None,
        session: str | None = None,
        timeout: float = 30.0,
    ) -> dict[str, Any]:
        """Send a command and return its result; events that arrive meanwhile are kept."""
        wanted = self.send(method, params, session)
        deadline = time.monotonic() + timeout
        while True:
            message = self.receive(deadline)
            if message.get("id") == wanted:
                if "error" in message:
                    raise RuntimeError(f"{method} failed: {message['error']}")
                return message.get("result", {})
            if "method" in message:
                self.events.append(message)

    def wait_event(self, method: str, session: str | None, timeout: float) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        for event in self.events:
            if event["method"] == method and event.get("sessionId") == session:
                return event
        while True:
            message = self.receive(deadline)
            if "method" in message:
                self.events.append(message)
                if message["method"] == method and message.get("sessionId") == session:
                    return message


def _move_to(fd: int, target: int) -> None:
    high = fcntl.fcntl(fd, fcntl.F_DUPFD, 10)  # never clobber the other pipe's end
    os.dup2(high, target)  # dup2 leaves the new descriptor inheritable


def _console_errors(events: list[dict[str, Any]], session: str) -> list[str]:
    out = []
    for e in events:
        if e.get("sessionId") != session:
            continue
        params = e.get("params", {})
        if e["method"] == "Runtime.consoleAPICalled" and params.get("type") in ("error", "assert"):
            args = params.get("args", [])
            out.append(" ".join(str(a.get("value", a.get("description", ""))) for a in args))
        elif e["method"] == "Runtime.exceptionThrown":
            details = params.get("exceptionDetails", {})
            out.append(
                details.get("exception", {}).get("description") or details.get("text", "exception")
            )
        elif e["method"] == "Log.entryAdded" and params.get("entry", {}).get("level") == "error":
            entry = params["entry"]
            out.append(f"{entry.get('source', '')}: {entry.get('text', '')} {entry.get('url', '')}")
        elif e["method"] == "Network.loadingFailed":
            out.append(f"loading failed: {params.get('errorText', '')}")
    return out


def _requests(events: list[dict[str, Any]], session: str, page_url: str) -> list[str]:
    urls = []
    for e in events:
        if e.get("sessionId") == session and e["method"] == "Network.requestWillBeSent":
            url = e["params"]["request"]["url"]
            if url != page_url and not url.startswith("data:"):
                urls.append(url)
    return urls


def check_page(
    html_path: str | os.PathLike[str],
    screenshot: str | os.PathLike[str],
    *,
    width: int = 1280,
    timeout: float = 60.0,
    chromium: str | None = None,
) -> PageCheck:
    """Load ``html_path`` in headless Chromium, collect errors, images and requests, and
    write a full-page PNG screenshot to ``screenshot``."""
    binary = chromium or find_chromium()
    if binary is None:
        raise FileNotFoundError(f"no Chromium binary on PATH (looked for {CHROMIUM_NAMES})")
    page_url = Path(html_path).resolve().as_uri()
    screenshot = Path(screenshot)
    cmd_read, cmd_write = os.pipe()  # we write commands, Chromium reads them on fd 3
    res_read, res_write = os.pipe()  # Chromium writes answers on fd 4, we read them

    def child_fds() -> None:
        _move_to(cmd_read, 3)
        _move_to(res_write, 4)

    with tempfile.TemporaryDirectory(prefix="nlrw-chromium-") as profile:
        log = open(Path(profile) / "chromium.log", "wb")  # noqa: SIM115 (closed below)
        proc = subprocess.Popen(
            [
                binary,
                "--headless=new",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-dev-shm-usage",
                "--disable-extensions",
                "--disable-background-networking",
                "--disable-sync",
                "--no-first-run",
                "--no-default-browser-check",
                "--hide-scrollbars",
                "--mute-audio",
                "--remote-debugging-pipe",
                f"--user-data-dir={profile}",
                "about:blank",
            ],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=log,
            pass_fds=(3, 4),
            preexec_fn=child_fds,  # single-threaded callers only: tests, the CLI
        )
        os.close(cmd_read)
        os.close(res_write)
        pipe = DevToolsPipe(cmd_write, res_read)
        try:
            target = pipe.call("Target.createTarget", {"url": "about:blank"}, timeout=timeout)
            session = pipe.call(
                "Target.attachToTarget", {"targetId": target["targetId"], "flatten": True}
            )["sessionId"]
            for domain in ("Page", "Runtime", "Log", "Network"):
                pipe.call(f"{domain}.enable", session=session)
            pipe.call(
                "Emulation.setDeviceMetricsOverride",
                {"width": width, "height": 900, "deviceScaleFactor": 1, "mobile": False},
                session=session,
            )
            pipe.events.clear()
            nav = pipe.call("Page.navigate", {"url": page_url}, session=session)
            if nav.get("errorText"):
                raise RuntimeError(f"navigation to {page_url} failed: {nav['errorText']}")
            pipe.wait_event("Page.loadEventFired", session, timeout)
            seen = pipe.call(
                "Runtime.evaluate",
                {"expression": _IMAGES_JS, "awaitPromise": True, "returnByValue": True},
                session=session,
                timeout=timeout,
            )
            if "exceptionDetails" in seen:
                raise RuntimeError(f"page inspection failed: {seen['exceptionDetails']}")
            info = seen["result"]["value"]
            metrics = pipe.call("Page.getLayoutMetrics", session=session)
            size = metrics.get("cssContentSize") or metrics["contentSize"]
            shot = pipe.call(
                "Page.captureScreenshot",
                {
                    "format": "png",
                    "captureBeyondViewport": True,
                    "clip": {
                        "x": 0,
                        "y": 0,
                        "width": width,
                        "height": max(1, int(size["height"])),
                        "scale": 1,
                    },
                },
                session=session,
                timeout=timeout,
            )
            screenshot.parent.mkdir(parents=True, exist_ok=True)
            screenshot.write_bytes(base64.b64decode(shot["data"]))
            # Let late events (a failed load after the load event) arrive before judging.
            with contextlib.suppress(TimeoutError):
                pipe.wait_event("__never__", session, 0.3)
            return PageCheck(
                title=info["title"],
                height=int(info["height"]),
                images=info["images"],
                console_errors=_console_errors(pipe.events, session),
                requests=_requests(pipe.events, session, page_url),
                screenshot=screenshot,
            )
        finally:
            with contextlib.suppress(Exception):
                pipe.send("Browser.close")
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            os.close(cmd_write)
            os.close(res_read)
            log.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("html", type=Path)
    parser.add_argument("--screenshot", type=Path, default=Path("screenshot.png"))
    parser.add_argument("--width", type=int, default=1280)
    parser.add_argument("--timeout", type=float, default=60.0)
    args = parser.parse_args(argv)
    result = check_page(args.html, args.screenshot, width=args.width, timeout=args.timeout)
    report = result._asdict()
    report["screenshot"] = str(result.screenshot)
    report["problems"] = result.problems()
    print(json.dumps(report, indent=2))
    return 1 if result.problems() else 0


if __name__ == "__main__":
    sys.exit(main())
