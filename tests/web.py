"""Helpers of the web page tests: tools/serve.py as a subprocess, and a headless Chromium driven over the
DevTools protocol through a pipe (--remote-debugging-pipe): the standard library only, no Selenium, no
chromedriver, no websocket client. For tests/test_serve.py and tests/test_serve_browser.py.

    with Server("--fake-weights") as url, Browser() as b:
        b.goto(url)
        b.wait("document.title !== ''")
        b.click("#run")
"""
import base64
import fcntl
import json
import os
import queue
import signal
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = "/usr/bin/chromium"
# Flags that work on these machines (root in a container, no GPU, no network wanted)
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--remote-debugging-pipe"]


class Server:
    """tools/serve.py on a free loopback port (--port 0), one torch thread; `with` gives its URL and stops it
    with Ctrl-C (SIGINT), checking a clean exit: status 130, one line, no traceback, the private folder removed."""

    def __init__(self, *flags, timeout=120):
        cmd = [sys.executable, str(ROOT / "tools" / "serve.py"), "--port", "0", *flags]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                     env={**os.environ, "OMP_NUM_THREADS": "1"})
        lines = queue.Queue()
        threading.Thread(target=lambda: [lines.put(x) for x in self.proc.stdout], daemon=True).start()
        self.url = self.folder = None
        while self.url is None:
            try:
                line = lines.get(timeout=timeout)
            except queue.Empty:
                self.proc.kill()
                raise TimeoutError(f"no 'serving on' line in {timeout} s: {self.proc.stderr.read()[-2000:]}")
            if line.startswith("temporary files:"):
                self.folder = line.split()[2]
            if line.startswith("serving on"):
                self.url = line.split()[2].rstrip("/")

    def stop(self):
        self.proc.send_signal(signal.SIGINT)
        code, err = self.proc.wait(timeout=30), self.proc.stderr.read()
        lines = err.strip().splitlines()  # Ctrl-C: exit status 130 and one line (tools/_cli.py)
        assert code == 130 and lines[-1].startswith("interrupted: ") and "Traceback" not in err, err[-3000:]
        assert not os.path.exists(self.folder), "the private folder was left behind"

    def __enter__(self):
        return self.url

    def __exit__(self, *exc):
        if exc[0] is None:
            self.stop()
        else:
            self.proc.kill()
            self.proc.wait()


class Browser:
    """One Chromium process and one page (a flat session); every call waits for its answer."""

    def __init__(self, path=CHROMIUM, timeout=30):
        self.timeout = timeout
        self.profile = tempfile.mkdtemp(prefix="minidiff-chromium-")
        to_browser, self._send_fd = os.pipe()  # the browser reads commands on its fd 3
        self._recv_fd, from_browser = os.pipe()  # and writes answers and events on its fd 4

        def fds():  # in the child, before exec: the pipe ends as fds 3 and 4 (moved up first: no clash)
            high = [fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 10) for fd in (to_browser, from_browser)]
            os.dup2(high[0], 3)  # dup2 leaves them inheritable; every other fd of ours is close-on-exec
            os.dup2(high[1], 4)
        self.proc = subprocess.Popen([path, *FLAGS, f"--user-data-dir={self.profile}", "about:blank"],
                                     preexec_fn=fds, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                     close_fds=False)
        os.close(to_browser)
        os.close(from_browser)
        self._ids, self._answers, self._cv = iter(range(1, 1 << 30)), {}, threading.Condition()
        self.events, self.session = [], None
        threading.Thread(target=self._read, daemon=True).start()
        target = self.send("Target.createTarget", url="about:blank")["targetId"]
        self.session = self.send("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]
        for domain in ("Page", "Runtime"):
            self.send(f"{domain}.enable")

    def _read(self):
        buf = b""
        while True:
            chunk = os.read(self._recv_fd, 1 << 16)
            if not chunk:
                break
            buf += chunk
            *messages, buf = buf.split(b"\0")
            with self._cv:
                for raw in messages:
                    msg = json.loads(raw)
                    if "id" in msg:
                        self._answers[msg["id"]] = msg
                    else:
                        self.events.append(msg)
                self._cv.notify_all()
        with self._cv:
            self._answers[None] = {"error": {"message": "the browser closed the pipe"}}
            self._cv.notify_all()

    def send(self, method, **params):
        """One DevTools command (on the page's session once attached); returns its result or raises."""
        msg_id = next(self._ids)
        msg = {"id": msg_id, "method": method, "params": params}
        if self.session:
            msg["sessionId"] = self.session
        os.write(self._send_fd, json.dumps(msg).encode() + b"\0")
        with self._cv:
            if not self._cv.wait_for(lambda: msg_id in self._answers or None in self._answers, self.timeout):
                raise TimeoutError(f"{method}: no answer in {self.timeout} s")
            answer = self._answers.pop(msg_id, None) or self._answers[None]
        if "error" in answer:
            raise RuntimeError(f"{method}: {answer['error'].get('message')}")
        return answer["result"]

    def js(self, expression):
        """Evaluate JavaScript in the page (promises awaited); returns the value."""
        out = self.send("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in out:
            error = out["exceptionDetails"].get("exception", {}).get("description")
            raise RuntimeError(f"{expression}: {error}")
        return out["result"].get("value")

    def wait(self, expression, timeout=None, every=0.1):
        """Poll a JavaScript expression until it is truthy; returns its value."""
        end = time.monotonic() + (timeout or self.timeout)
        while time.monotonic() < end:
            value = self.js(expression)
            if value:
                return value
            time.sleep(every)
        raise TimeoutError(f"still false after {timeout or self.timeout} s: {expression}")

    def goto(self, url):
        self.send("Page.navigate", url=url)

    def viewport(self, width, height, mobile=False, scale=1):
        self.send("Emulation.setDeviceMetricsOverride", width=width, height=height, deviceScaleFactor=scale,
                  mobile=mobile)

    def set_files(self, selector, paths):
        """Choose files in an <input type=file> as a user would (the page gets its change event)."""
        root = self.send("DOM.getDocument")["root"]["nodeId"]
        node = self.send("DOM.querySelector", nodeId=root, selector=selector)["nodeId"]
        self.send("DOM.setFileInputFiles", nodeId=node, files=[os.path.abspath(p) for p in paths])

    def click(self, selector, fx=0.5, fy=0.5):
        """A real mouse click (press + release) at a point of the element, after scrolling it into view."""
        r = self.js(f"(() => {{ const e = document.querySelector({json.dumps(selector)}); e.scrollIntoView("
                    "{block: 'center'}); const r = e.getBoundingClientRect(); "
                    "return {x: r.left, y: r.top, w: r.width, h: r.height}; })()")
        x, y = r["x"] + fx * r["w"], r["y"] + fy * r["h"]
        for kind in ("mousePressed", "mouseReleased"):
            self.send("Input.dispatchMouseEvent", type=kind, x=x, y=y, button="left", clickCount=1)

    def screenshot(self, path, full_page=True, colors=None):
        """Save a PNG of the page (all of it with full_page); colors: reduce to a palette (smaller files)."""
        data = self.send("Page.captureScreenshot", format="png", captureBeyondViewport=full_page)["data"]
        with open(path, "wb") as f:
            f.write(base64.b64decode(data))
        if colors:
            from PIL import Image
            with Image.open(path) as im:
                small = im.convert("RGB").quantize(colors, method=Image.Quantize.MEDIANCUT)
            small.save(path, optimize=True)

    def close(self):
        try:
            self.session = None
            self.send("Browser.close")
        except (RuntimeError, TimeoutError, OSError):
            pass
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        for fd in (self._send_fd, self._recv_fd):
            try:
                os.close(fd)
            except OSError:
                pass
        shutil.rmtree(self.profile, ignore_errors=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
