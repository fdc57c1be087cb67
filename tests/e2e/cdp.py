"""Headless Chromium driven over the DevTools protocol on a pipe, with nothing but the standard library.

Chromium reads protocol commands on its file descriptor 3 and writes replies and events on 4, each message a JSON
object followed by a NUL byte (--remote-debugging-pipe). Every host name except the loopback address resolves to
nothing, so a page that needs the internet fails to load in it.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path
from typing import Any

NO_INTERNET = "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1"


class Browser:
    def __init__(self, chromium: str, profile: Path) -> None:
        commands_read, self._commands = os.pipe()
        self._replies, replies_write = os.pipe()

        def onto_protocol_fds() -> None:
            os.dup2(commands_read, 3)
            os.dup2(replies_write, 4)

        self.proc = subprocess.Popen(
            [
                chromium,
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--no-first-run",
                f"--user-data-dir={profile}",
                "--remote-debugging-pipe",
                NO_INTERNET,
                "about:blank",
            ],
            preexec_fn=onto_protocol_fds,
            pass_fds=(3, 4),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        os.close(commands_read)
        os.close(replies_write)
        self._pending = b""
        self._last_id = 0

    def command(self, method: str, params: dict[str, Any] | None = None, session: str | None = None) -> dict:
        self._last_id += 1
        message: dict[str, Any] = {"id": self._last_id, "method": method, "params": params or {}}
        if session is not None:
            message["sessionId"] = session
        os.write(self._commands, json.dumps(message).encode() + b"\0")
        while True:
            while b"\0" not in self._pending:
                chunk = os.read(self._replies, 1 << 16)
                if not chunk:
                    raise RuntimeError(f"chromium exited during {method}")
                self._pending += chunk
            raw, _, self._pending = self._pending.partition(b"\0")
            reply = json.loads(raw)
            if reply.get("id") == self._last_id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply["result"]

    def open(self, url: str) -> Page:
        target = self.command("Target.createTarget", {"url": url})["targetId"]
        session = self.command("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        return Page(self, session)

    def close(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
        os.close(self._commands)
        os.close(self._replies)


class Page:
    def __init__(self, browser: Browser, session: str) -> None:
        self.browser = browser
        self.session = session

    def evaluate(self, expression: str) -> Any:
        result = self.browser.command(
            "Runtime.evaluate", {"expression": expression, "returnByValue": True, "awaitPromise": True}, self.session
        )
        if "exceptionDetails" in result:
            raise RuntimeError(f"{expression}: {result['exceptionDetails']}")
        return result["result"].get("value")

    def wait_for(self, expression: str, timeout: float = 30.0) -> Any:
        """Poll a JavaScript expression until it is truthy; its value."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = self.evaluate(expression)
            if value:
                return value
            time.sleep(0.1)
        raise TimeoutError(f"still falsy after {timeout:.0f} s: {expression}")

    def set_files(self, selector: str, paths: list[Path]) -> None:
        """Choose files in a file input, as a person would in the file dialog."""
        root = self.browser.command("DOM.getDocument", {}, self.session)["root"]["nodeId"]
        node = self.browser.command("DOM.querySelector", {"nodeId": root, "selector": selector}, self.session)
        assert node["nodeId"], f"no element matches {selector}"
        self.browser.command(
            "DOM.setFileInputFiles", {"nodeId": node["nodeId"], "files": [str(path) for path in paths]}, self.session
        )
