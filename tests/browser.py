"""Open a page in headless Chromium and report what a person would see and what the page asked for.

Chromium is driven over its DevTools protocol (a WebSocket, `websocket-client`), not through a screenshot
alone: every network request the page makes, every console message and uncaught exception, and the state
of each `<img>` are read from the browser itself. `.ci/run` installs Debian's `chromium`.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import websocket

BROWSERS = ("chromium", "chromium-browser", "google-chrome")
LOAD_TIMEOUT = 60.0


def browser() -> str | None:
    """The Chromium executable on PATH, or None."""
    return next((path for name in BROWSERS if (path := shutil.which(name))), None)


@dataclass
class PageVisit:
    """What loading one page did."""

    requests: list[str] = field(default_factory=list)
    """URL of every request (data: URLs shortened to their scheme and type)."""
    failed: list[str] = field(default_factory=list)
    """Requests that failed, with the browser's reason."""
    console_errors: list[str] = field(default_factory=list)
    images: int = 0
    broken_images: list[str] = field(default_factory=list)
    """`<img>`s that did not decode (complete with no natural width), by alt text."""
    svg_points: int = 0
    titles: list[str] = field(default_factory=list)
    """Text of the `<title>`s inside inline SVGs (what hovering shows), the first 20."""
    headings: list[str] = field(default_factory=list)
    screenshot: bytes = b""


class _Session:
    def __init__(self, url: str):
        self.ws = websocket.create_connection(url, timeout=LOAD_TIMEOUT, suppress_origin=True)
        self.next_id = 0
        self.events: list[dict] = []

    def call(self, method: str, **params) -> dict:
        self.next_id += 1
        self.ws.send(json.dumps({"id": self.next_id, "method": method, "params": params}))
        while True:
            message = json.loads(self.ws.recv())
            if message.get("id") == self.next_id:
                if "error" in message:
                    raise RuntimeError(f"{method}: {message['error']}")
                return message.get("result", {})
            self.events.append(message)

    def wait_for(self, method: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not any(e.get("method") == method for e in self.events):
            if time.monotonic() > deadline:
                raise TimeoutError(f"no {method} within {timeout:.0f} s")
            self.events.append(json.loads(self.ws.recv()))

    def evaluate(self, expression: str):
        return self.call("Runtime.evaluate", expression=expression, returnByValue=True)["result"].get("value")


def visit(page: Path, *, width: int = 1200, height: int = 1600) -> PageVisit:
    """Load `page` (a local file) in a fresh headless Chromium profile, wait for its load event and for
    the network to settle, and return what happened, with a full-page screenshot (PNG bytes)."""
    executable = browser()
    if executable is None:
        raise RuntimeError("no Chromium on PATH: install Debian's `chromium` (.ci/run does)")
    # Chromium's helper processes may still write into the profile for a moment after the browser is
    # killed: the whole process group is killed, and a file they leave does not fail the cleanup
    with tempfile.TemporaryDirectory(prefix="chromium-", ignore_cleanup_errors=True) as profile:
        proc = subprocess.Popen(
            [
                executable,
                "--headless=new",
                "--no-sandbox",  # CI runs as root, where the sandbox cannot start
                "--disable-gpu",
                "--no-first-run",
                "--disable-extensions",
                "--disable-background-networking",  # the browser's own update and safe-browsing requests
                "--disable-component-update",
                "--remote-debugging-port=0",
                f"--user-data-dir={profile}",
                f"--window-size={width},{height}",
                "about:blank",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,  # its renderer and GPU processes share its group, killed with it
        )
        try:
            port_file = Path(profile) / "DevToolsActivePort"
            deadline = time.monotonic() + LOAD_TIMEOUT
            while not (port_file.is_file() and port_file.read_text().strip()):
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise RuntimeError(f"{executable} did not start its DevTools endpoint")
                time.sleep(0.1)
            port = int(port_file.read_text().split()[0])
            targets = json.loads(urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=10).read())
            target = next(t for t in targets if t["type"] == "page")
            session = _Session(target["webSocketDebuggerUrl"])
            for domain in ("Page", "Network", "Runtime", "Log"):
                session.call(f"{domain}.enable")
            session.call("Page.navigate", url=page.resolve().as_uri())
            session.wait_for("Page.loadEventFired", LOAD_TIMEOUT)
            time.sleep(0.5)  # anything the page would fetch after its load event
            result = _read(session)
            shot = session.call("Page.captureScreenshot", format="png", captureBeyondViewport=True)
            result.screenshot = base64.b64decode(shot["data"])
            session.ws.close()
            return result
        finally:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def _read(session: _Session) -> PageVisit:
    result = PageVisit()
    for event in session.events:
        method, params = event.get("method"), event.get("params", {})
        if method == "Network.requestWillBeSent":
            url = params["request"]["url"]
            result.requests.append(url.split(",", 1)[0][:40] if url.startswith("data:") else url)
        elif method == "Network.loadingFailed":
            result.failed.append(f"{params.get('errorText')} ({params.get('type')})")
        elif method == "Runtime.exceptionThrown":
            result.console_errors.append(params["exceptionDetails"].get("text", "exception"))
        elif method == "Runtime.consoleAPICalled" and params.get("type") in ("error", "assert"):
            result.console_errors.append(" ".join(str(a.get("value")) for a in params.get("args", [])))
        elif method == "Log.entryAdded" and params["entry"].get("level") == "error":
            result.console_errors.append(params["entry"].get("text", ""))
    result.images = session.evaluate("document.images.length")
    result.broken_images = session.evaluate(
        "Array.from(document.images).filter(i => !(i.complete && i.naturalWidth > 0))"
        ".map(i => i.alt || i.src.slice(0, 40))"
    )
    result.svg_points = session.evaluate("document.querySelectorAll('svg circle').length")
    result.titles = session.evaluate(
        "Array.from(document.querySelectorAll('svg circle title')).slice(0, 20).map(t => t.textContent)"
    )
    result.headings = session.evaluate("Array.from(document.querySelectorAll('h1, h2')).map(h => h.textContent)")
    return result
