"""Open a page in headless Chromium through the DevTools protocol: console errors, images, and a screenshot.

Chromium comes from the system's packages (Debian: ``apt-get install chromium``; ``scripts/test.sh`` installs it
where apt exists). The protocol is spoken over a WebSocket with aiohttp, which Ray's ``default`` extra installs.
"""

from __future__ import annotations

import asyncio
import io
import json
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

CANDIDATES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")


def find_chromium() -> str | None:
    """The first Chromium-like browser on PATH, or None."""
    for name in CANDIDATES:
        path = shutil.which(name)
        if path:
            return path
    return None


@dataclass
class PageLoad:
    """What the browser saw."""

    errors: list[str] = field(default_factory=list)  # console errors, uncaught exceptions, failed loads
    images: list[dict] = field(default_factory=list)  # per <img>: naturalWidth, complete, x, y, width, height
    screenshot: bytes = b""  # PNG of the whole page
    title: str = ""


async def _open(browser: str, url: str, width: int) -> PageLoad:
    import aiohttp

    profile = Path(tempfile.mkdtemp(prefix="geximpute-chromium-"))
    proc = subprocess.Popen(
        [browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--hide-scrollbars",
         "--no-first-run", "--remote-debugging-port=0", f"--user-data-dir={profile}",
         f"--window-size={width},1000", "about:blank"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        port_file = profile / "DevToolsActivePort"
        deadline = time.monotonic() + 60
        while not (port_file.is_file() and port_file.read_text().strip()):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{browser} did not start its DevTools endpoint (exit status {proc.poll()})")
            await asyncio.sleep(0.1)
        port = int(port_file.read_text().splitlines()[0])
        result = PageLoad()
        async with aiohttp.ClientSession() as http:
            async with http.get(f"http://127.0.0.1:{port}/json") as resp:
                targets = await resp.json()
            page = next(t for t in targets if t["type"] == "page")
            async with http.ws_connect(page["webSocketDebuggerUrl"], max_msg_size=0) as ws:
                events: list[dict] = []
                counter = 0

                async def call(method: str, **params) -> dict:
                    nonlocal counter
                    counter += 1
                    await ws.send_str(json.dumps({"id": counter, "method": method, "params": params}))
                    while True:
                        msg = json.loads((await ws.receive(timeout=60)).data)
                        if msg.get("id") == counter:
                            if "error" in msg:
                                raise RuntimeError(f"{method}: {msg['error']}")
                            return msg.get("result", {})
                        events.append(msg)

                for domain in ("Page", "Runtime", "Log"):
                    await call(f"{domain}.enable")
                await call("Page.navigate", url=url)
                deadline = time.monotonic() + 60
                while not any(e.get("method") == "Page.loadEventFired" for e in events):
                    if time.monotonic() > deadline:
                        raise RuntimeError(f"{url} did not finish loading in 60 s")
                    events.append(json.loads((await ws.receive(timeout=60)).data))
                probe = ("JSON.stringify({title: document.title, height: document.documentElement.scrollHeight, "
                         "images: [...document.images].map(i => {const r = i.getBoundingClientRect(); return "
                         "{naturalWidth: i.naturalWidth, complete: i.complete, x: r.x + scrollX, y: r.y + scrollY, "
                         "width: r.width, height: r.height};})})")
                info = json.loads((await call("Runtime.evaluate", expression=probe, returnByValue=True))
                                  ["result"]["value"])
                result.title, result.images = info["title"], info["images"]
                shot = await call("Page.captureScreenshot", format="png", captureBeyondViewport=True,
                                  clip={"x": 0, "y": 0, "width": width, "height": info["height"], "scale": 1})
                import base64

                result.screenshot = base64.b64decode(shot["data"])
                for e in events:
                    method, params = e.get("method"), e.get("params", {})
                    if method == "Runtime.exceptionThrown":
                        result.errors.append(params["exceptionDetails"].get("text", "exception"))
                    elif method == "Runtime.consoleAPICalled" and params.get("type") in ("error", "assert"):
                        result.errors.append(" ".join(str(a.get("value", a.get("description"))) for a in
                                                      params.get("args", [])))
                    elif method == "Log.entryAdded" and params["entry"].get("level") == "error":
                        result.errors.append(params["entry"].get("text", ""))
        return result
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
        shutil.rmtree(profile, ignore_errors=True)


def open_page(browser: str, path: Path, width: int = 1400) -> PageLoad:
    """Load ``path`` in headless ``browser`` and return its console errors, images and a full-page screenshot."""
    return asyncio.run(_open(browser, path.resolve().as_uri(), width))


def non_blank_fraction(png: bytes, box: dict) -> float:
    """Share of the pixels inside ``box`` (x, y, width, height in CSS pixels) that are not near-white."""
    import numpy as np
    from PIL import Image

    image = np.asarray(Image.open(io.BytesIO(png)).convert("L"), dtype=np.float32)
    x0, y0 = int(box["x"]), int(box["y"])
    crop = image[y0:y0 + int(box["height"]), x0:x0 + int(box["width"])]
    return float((crop < 235).mean()) if crop.size else 0.0
