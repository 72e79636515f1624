"""The web page's server (tools/serve.py): the standard library's ThreadingHTTPServer, uploads, the page.

The official Gradio demo (yuhaoliu7456/Diff-Plugin @ 79e12bb, demo.py) with the same reach: upload a photo,
type an instruction or press one of its eight presets (or pick plugins by hand), set the short side
(512-1024, step 64), steps (1-100) and seed (random unless given), see the selector's scores and the plan
before running (tools/sample.py's dry run), then the result beside the photo, with tools/sample.py's
outputs and record. Jobs go through one worker thread (_jobs.JobQueue): one model copy, jobs in submission
order, progress and cancel through polled JSON. What a job does: _serve_restore.Restorer.

Safe by default: uploads are capped in bytes and pixels (the header is read before any decoding, so a
decompression bomb is refused unread), decoded by minidiff.io.imageio.load_image, and written only to a private
temporary folder that App.close() removes; no endpoint takes a path from the client (photos, examples and
results are named by ids the server made); every bad request gets a JSON {"error": ...} with its status.

Endpoints (JSON unless said otherwise):
    GET  /  /app.js  /style.css         the page (package data: minidiff/data/web/)
    GET  /api/info                      presets, tasks, ranges, limits, settings shown read-only, examples
    GET  /api/examples/<name>           an example photo (bytes), <name> from /api/info
    POST /api/upload?name=<file name>   body: the image file's bytes -> {"id", "width", "height", ...}, 201
    GET  /api/uploads/<id>/preview.png  the photo as decoded (upright RGB), long side <= 1024
    POST /api/plan                      {"upload", "prompt" | "tasks", "resolution", "steps"} -> dry run
    POST /api/jobs                      the same + "seed" (null: random) -> job status, 201
    GET  /api/jobs/<id>                 state, place in the queue, progress, error, record, file URLs
    POST /api/jobs/<id>/cancel          job status
    GET  /api/jobs/<id>/<file>          result.png, compare.png, input.png (before/after), record.json
    GET  /api/history                   finished jobs since the server started, newest first
"""
import json
import os
import random
import re
import shutil
import sys
import tempfile
import threading
import traceback
import urllib.parse
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources

from PIL import Image, UnidentifiedImageError

from _jobs import JobQueue, QueueFull
from _restore_cli import outputs, stem_of
from _serve_restore import RANDOM_SEED_MAX, RESOLUTION, STEPS, ParamError
from minidiff.io.imageio import IMAGE_SUFFIXES, ImageError, list_images, load_image
from minidiff.models.prepack import return_freed_memory

DEFAULT_PORT = 7860  # Gradio's port, where the official demo is
# The official demo's eight task buttons (demo.py l.253-268 set the prompt; labels l.296-321), in its order
PRESETS = [("Desnowing", "remove snow"), ("Dehazing", "remove haze"),
           ("Face Restoration", "enhance face appearance"), ("Deraining", "remove rain"),
           ("Lowlight Enhancement", "enhance brightness"), ("Deblurring", "clear blur"),
           ("Highlight Removal", "remove highlight"), ("Demoireing", "I would like to remove the moire")]
MAX_UPLOAD_BYTES = 25 << 20  # a large camera JPEG is 5-15 MB
MAX_UPLOAD_PIXELS = 50_000_000  # 8660x5773, a 50 Mpx camera; decoded RGB 150 MB (the size rule shrinks it)
MAX_JSON_BYTES = 64 << 10
KEEP_UPLOADS = 32  # uploads kept on disk; older ones are deleted (a job keeps its own copy of the photo)
KEEP_PLANS = 64  # dry-run records kept (the page asks again at every change of its options)
PREVIEW_SIDE = 1024
HTML, JS, CSS = "text/html; charset=utf-8", "text/javascript; charset=utf-8", "text/css; charset=utf-8"
WEB_FILES = {"": ("index.html", HTML), "index.html": ("index.html", HTML), "app.js": ("app.js", JS),
             "style.css": ("style.css", CSS)}
# a finished job's files: URL name -> key of _restore_cli.outputs (named after the photo, as the CLI does)
JOB_FILES = {"result.png": "result", "compare.png": "compare", "record.json": "record"}
LOOPBACK_NAMES = ("127.0.0.1", "localhost", "[::1]")
# The page loads nothing from elsewhere; images are the server's or the page's own blob: previews
CSP = "default-src 'self'; img-src 'self' blob: data:; object-src 'none'; frame-ancestors 'none'"


class ApiError(Exception):
    """A bad request: HTTP status and a one-line message for the page."""

    def __init__(self, status, message):
        super().__init__(message)
        self.status = int(status)


def safe_name(name):
    """A client's file name as a plain file name (letters, digits, '.', '-', '_'): the outputs are named
    after its stem, as tools/sample.py names them after the input file."""
    stem, ext = os.path.splitext(os.path.basename(name))
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", stem).strip("._")[:80] or "photo"
    return stem + re.sub(r"[^A-Za-z0-9.]+", "", ext)[:8]


class Uploads:
    """Uploaded photos in the private folder, by id: bytes and pixels capped, decoded by load_image.
    Upload <id> is stored as <id>/<its safe name>, beside <id>-preview.png and <id>-plan/ (dry runs)."""

    def __init__(self, folder, max_bytes=MAX_UPLOAD_BYTES, max_pixels=MAX_UPLOAD_PIXELS, keep=KEEP_UPLOADS):
        self.folder, self.max_bytes, self.max_pixels, self.keep = folder, max_bytes, max_pixels, keep
        self._lock = threading.Lock()
        self._entries = {}  # id -> {"id", "name", "path", "size", "notes"}; insertion order = age

    def add(self, data, name):
        """Store and decode an uploaded file; ApiError 413 when too large, 415 when not a usable image."""
        if len(data) > self.max_bytes:
            raise ApiError(413, f"file too large: {len(data)} bytes, the limit is {self.max_bytes}")
        upload_id = os.urandom(8).hex()
        base = os.path.join(self.folder, upload_id)
        os.makedirs(base)
        path = os.path.join(base, safe_name(name))
        with open(path, "wb") as f:
            f.write(data)
        try:
            image, notes = self._decode(path, name)
            preview = image.copy()
            preview.thumbnail((PREVIEW_SIDE, PREVIEW_SIDE), Image.LANCZOS)
            preview.save(base + "-preview.png")
        except BaseException:
            self._remove(upload_id)
            raise
        entry = {"id": upload_id, "name": name, "path": path, "size": list(image.size), "notes": notes,
                 "preview": base + "-preview.png", "plans": base + "-plan"}
        with self._lock:
            self._entries[upload_id] = entry
            while len(self._entries) > self.keep:
                self._remove(self._entries.pop(next(iter(self._entries)))["id"])
        return entry

    def _remove(self, upload_id):
        base = os.path.join(self.folder, upload_id)
        for folder in (base, base + "-plan"):
            shutil.rmtree(folder, ignore_errors=True)
        if os.path.exists(base + "-preview.png"):
            os.remove(base + "-preview.png")

    def _decode(self, path, name):
        """(RGB image, notes) of an uploaded file; the size is checked from the header before decoding."""
        try:
            with Image.open(path) as im:  # reads the header only
                width, height = im.size
        except Image.DecompressionBombError:  # PIL's own check, at twice its MAX_IMAGE_PIXELS
            raise ApiError(413, f"{name}: too many pixels: refused before decoding") from None
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError):
            raise ApiError(415, f"{name}: not an image file (or an unsupported format)") from None
        if width * height > self.max_pixels:
            raise ApiError(413, f"{name}: {width}x{height} is {width * height} pixels, the limit is "
                                f"{self.max_pixels}: refused before decoding")
        notes = []
        try:
            return load_image(path, notes), notes
        except ImageError as e:  # its message names the private file: name the client's instead
            raise ApiError(415, str(e).replace(path, name)) from None

    def get(self, upload_id):
        with self._lock:
            entry = self._entries.get(upload_id) if isinstance(upload_id, str) else None
        if entry is None:
            raise ApiError(404, "unknown upload (expired or never sent): upload the photo again")
        return entry

    def image(self, entry):
        """The photo as loaded (decoded again from the stored bytes) and its notes."""
        notes = []
        try:
            return load_image(entry["path"], notes), notes
        except ImageError:
            raise ApiError(404, "the upload was removed: upload the photo again") from None


def plan_key(params):
    return (params["upload"], params["prompt"], tuple(params["tasks"] or ()), params["resolution"],
            params["steps"])


def find_examples(folder):
    """{name: (path, prompt)} of the photos in `folder` and their instructions from its prompts.json."""
    if not folder or not os.path.isdir(folder):
        return {}
    prompts = {}
    table = os.path.join(folder, "prompts.json")
    if os.path.isfile(table):
        with open(table, encoding="utf-8") as f:
            prompts = json.load(f)
    return {os.path.basename(p): (p, prompts.get(os.path.splitext(os.path.basename(p))[0], ""))
            for p in list_images(folder)}


class App:
    """The server's state: private folder, uploads, the restorer, the job queue, the examples."""

    def __init__(self, restorer, examples=None, max_bytes=MAX_UPLOAD_BYTES, max_pixels=MAX_UPLOAD_PIXELS,
                 history=12, max_waiting=16):
        self.folder = tempfile.mkdtemp(prefix="minidiff-serve-")  # mode 0700: this user only
        self.uploads = Uploads(os.path.join(self.folder, "uploads"), max_bytes, max_pixels)
        os.makedirs(self.uploads.folder)
        self.restorer = restorer
        self.examples = find_examples(examples)
        self.plan_lock = threading.Lock()  # one plan at a time beside the worker
        self.plans = {}  # plan_key -> dry-run record, oldest first
        self.queue = JobQueue(self._run, history=history, max_waiting=max_waiting,
                              on_finish=lambda job: job.params.pop("image", None),  # a decoded photo: memory
                              on_forget=lambda job: shutil.rmtree(self._job_dir(job), ignore_errors=True))

    def close(self):
        self.queue.close()
        shutil.rmtree(self.folder, ignore_errors=True)

    def _job_dir(self, job):
        return os.path.join(self.folder, "jobs", job.id)

    def info(self):
        return {"presets": [{"label": a, "prompt": b} for a, b in PRESETS], "tasks": self.restorer.tasks,
                "resolution": dict(zip(("min", "max", "step", "default"), RESOLUTION)),
                "steps": dict(zip(("min", "max", "default"), STEPS)),
                "seed": {"min": 0, "max": RANDOM_SEED_MAX},
                "limits": {"bytes": self.uploads.max_bytes, "pixels": self.uploads.max_pixels,
                           "suffixes": list(IMAGE_SUFFIXES)},
                "settings": self.restorer.shown_settings(),
                "examples": [{"name": n, "prompt": p, "url": f"/api/examples/{urllib.parse.quote(n)}"}
                             for n, (_, p) in self.examples.items()]}

    def plan(self, body):
        """The dry run's record for a request (cached: the page asks again at every change)."""
        params = self.restorer.check_params(body)
        entry = self.uploads.get(params["upload"])
        key = plan_key(params)
        with self.plan_lock:
            if key not in self.plans:
                try:
                    self.plans[key] = self.restorer.plan(entry, params, entry["plans"])
                except ImageError as e:  # e.g. a side under the smallest size: the photo, not the server
                    raise ApiError(400, str(e).replace(entry["path"], entry["name"])) from None
                while len(self.plans) > KEEP_PLANS:
                    self.plans.pop(next(iter(self.plans)))
            return self.plans[key]

    def submit(self, body):
        params = self.restorer.check_params(body)
        entry = self.uploads.get(params["upload"])
        if params["seed"] is None:  # the official slider's randomize=True: drawn now, shown, reusable
            params["seed"] = random.SystemRandom().randint(0, RANDOM_SEED_MAX)
        image, notes = self.uploads.image(entry)  # the job keeps its photo even if the upload expires
        try:
            self.restorer.check_size(image, params)
        except ImageError as e:
            raise ApiError(400, str(e).replace(entry["path"], entry["name"])) from None
        with self.plan_lock:
            plan = self.plans.get(plan_key(params))  # planned for the page already: no second selection
        params.update(image=image, entry=entry, plan=plan)
        try:
            return self.queue.submit(params)
        except QueueFull as e:
            raise ApiError(503, str(e)) from None

    def _run(self, job):
        folder = self._job_dir(job)
        os.makedirs(folder)
        try:
            return self.restorer.run(job, folder)
        finally:  # the job's activations: back to the OS, so the resident set between jobs is the models'
            return_freed_memory()

    def status(self, job):
        """What the page polls: state, place in the queue, progress, error, record and file URLs."""
        p = job.params
        out = {"id": job.id, "state": job.state, "position": self.queue.position(job), "error": job.error,
               "progress": job.progress(), "created": job.created, "started": job.started,
               "finished": job.finished, "seed": p["seed"], "name": p["entry"]["name"], "prompt": p["prompt"],
               "tasks": p["tasks"], "resolution": p["resolution"], "steps": p["steps"], "record": None,
               "files": None}
        if job.state == "done":
            out["record"] = job.result
            out["files"] = {k: f"/api/jobs/{job.id}/{k}" for k in ("input.png", *JOB_FILES)}
        return out

    def job_file(self, job_id, name):
        """(path, download name) of a finished job's file."""
        job = self.queue.get(job_id)
        if job is None:
            raise ApiError(404, "unknown job (finished long ago, or never submitted)")
        if job.state != "done":
            raise ApiError(409, f"job {job_id} is {job.state}: no result")
        if name == "input.png":
            return os.path.join(self._job_dir(job), name), None
        stored = outputs(stem_of(job.params["entry"]["path"]))[JOB_FILES[name]]
        return os.path.join(self._job_dir(job), stored), stored


class Handler(BaseHTTPRequestHandler):
    """Routes; every answer JSON except the page, images and the record download."""

    server_version = "minidiff-serve"
    quiet = True

    def log_message(self, fmt, *args):
        if not self.quiet:
            super().log_message(fmt, *args)

    def send_error(self, code, message=None, explain=None):
        """The stdlib's own errors (malformed request, unsupported method) as JSON too."""
        self.close_connection = True
        text = message or HTTPStatus(code).phrase
        self._send(code, json.dumps({"error": text}).encode(), "application/json")

    def _send(self, status, body, ctype, extra=None):
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.send_header("X-Content-Type-Options", "nosniff")
        self.send_header("Content-Security-Policy", CSP)
        for k, v in (extra or {}).items():
            self.send_header(k, v)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _json(self, obj, status=200):
        self._send(status, json.dumps(obj, allow_nan=False).encode(), "application/json")

    def _file(self, path, download=None):
        """A file the server wrote (or an example photo); `download`: the name a browser saves it under."""
        try:
            with open(path, "rb") as f:
                data = f.read()
        except OSError:
            raise ApiError(404, "file not found") from None
        ext = os.path.splitext(path)[1].lower()
        ctype = "application/json" if ext == ".json" else "image/" + {".jpg": "jpeg", ".tif": "tiff"}.get(
            ext, ext.lstrip("."))
        extra = {"Content-Disposition": f'inline; filename="{download}"'} if download else None
        self._send(200, data, ctype, extra)

    def _body(self, limit):
        """The request body, at most `limit` bytes (413 beyond, after reading the rest away)."""
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            raise ApiError(411, "send a Content-Length (chunked bodies are not accepted)")
        try:
            length = int(self.headers.get("Content-Length", ""))
        except ValueError:
            raise ApiError(411, "Content-Length missing or not a number") from None
        if length < 0:
            raise ApiError(400, "negative Content-Length")
        if length > limit:
            self.close_connection = True
            self._discard(min(length, 4 * limit))
            raise ApiError(413, f"request body too large: over {limit} bytes")
        return self.rfile.read(length)

    def _discard(self, length):
        """Read away up to `length` bytes of a refused body, so that the client reads the answer instead of
        a connection reset; stops when the client pauses for half a second."""
        self.connection.settimeout(0.5)
        try:
            while length > 0:
                chunk = self.rfile.read1(min(1 << 16, length))
                if not chunk:
                    break
                length -= len(chunk)
        except OSError:
            pass

    def _json_body(self):
        try:
            body = json.loads(self._body(MAX_JSON_BYTES) or b"null")
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise ApiError(400, "the request body is not JSON") from None
        if not isinstance(body, dict):
            raise ApiError(400, "send a JSON object")
        return body

    def _check_origin(self):
        """Refuse requests made for another host name (DNS rebinding) or posted by another site's page."""
        host = self.headers.get("Host", "")
        if self.server.loopback and host and host.rsplit(":", 1)[0] not in LOOPBACK_NAMES:
            raise ApiError(403, f"Host {host!r}: this server answers to 127.0.0.1 and localhost only")
        origin = self.headers.get("Origin")
        if self.command == "POST" and origin and urllib.parse.urlsplit(origin).netloc != host:
            raise ApiError(403, f"cross-origin request from {origin} refused")

    def _dispatch(self, routes):
        try:
            self._check_origin()
            path = urllib.parse.urlsplit(self.path).path
            for pattern, handle in routes:
                m = re.fullmatch(pattern, path)
                if m:
                    return handle(*m.groups())
            others = self._get_routes() if self.command == "POST" else self._post_routes()
            if any(re.fullmatch(p, path) for p, _ in others):
                raise ApiError(405, f"{self.command} is not allowed on {path}")
            raise ApiError(404, f"no such endpoint: {path}")
        except ApiError as e:
            self._json({"error": str(e)}, e.status)
        except ParamError as e:
            self._json({"error": str(e)}, 400)
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True
        except Exception as e:  # a bug: logged here in full, one line in the page, the server goes on
            traceback.print_exc(file=sys.stderr)
            self._json({"error": f"internal error ({type(e).__name__}); see the server's log"}, 500)

    def _get_routes(self):
        app = self.server.app
        return [
            (r"/(|index\.html|app\.js|style\.css)", self._web),
            (r"/api/info", lambda: self._json(app.info())),
            (r"/api/examples/([^/]+)", self._example),
            (r"/api/uploads/([0-9a-f]+)/preview\.png", lambda i: self._file(app.uploads.get(i)["preview"])),
            (r"/api/jobs/([0-9a-f-]+)", lambda i: self._json(app.status(self._job(i)))),
            (r"/api/jobs/([0-9a-f-]+)/(result\.png|compare\.png|input\.png|record\.json)",
             lambda i, n: self._file(*app.job_file(i, n))),
            (r"/api/history", lambda: self._json([app.status(j) for j in app.queue.history()])),
        ]

    def _post_routes(self):
        app = self.server.app
        return [
            (r"/api/upload", self._upload),
            (r"/api/plan", lambda: self._json(app.plan(self._json_body()))),
            (r"/api/jobs", lambda: self._json(app.status(app.submit(self._json_body())), 201)),
            (r"/api/jobs/([0-9a-f-]+)/cancel",
             lambda i: self._json(app.status(app.queue.cancel(i) or self._job(i)))),
        ]

    def do_GET(self):
        self._dispatch(self._get_routes())

    def do_POST(self):
        self._dispatch(self._post_routes())

    def _job(self, job_id):
        job = self.server.app.queue.get(job_id)
        if job is None:
            raise ApiError(404, "unknown job (finished long ago, or never submitted)")
        return job

    def _web(self, name):
        name, ctype = WEB_FILES[name]
        self._send(200, resources.files("minidiff").joinpath("data", "web", name).read_bytes(), ctype)

    def _example(self, name):
        name = urllib.parse.unquote(name)
        if name not in self.server.app.examples:  # names listed at start only: never a client's path
            raise ApiError(404, f"no example named {name!r}")
        self._file(self.server.app.examples[name][0])

    def _upload(self):
        query = urllib.parse.parse_qs(urllib.parse.urlsplit(self.path).query)
        # only a display name: never used as a path (the file is stored under a random id)
        name = os.path.basename(query.get("name", ["photo"])[0])[:120] or "photo"
        data = self._body(self.server.app.uploads.max_bytes)
        if not data:
            raise ApiError(400, "empty upload: send the image file's bytes as the request body")
        entry = self.server.app.uploads.add(data, name)
        self._json({"id": entry["id"], "name": name, "width": entry["size"][0], "height": entry["size"][1],
                    "notes": entry["notes"], "preview": f"/api/uploads/{entry['id']}/preview.png"}, 201)


class Server(ThreadingHTTPServer):
    daemon_threads = True  # a stuck client never holds up Ctrl-C
    allow_reuse_address = True

    def __init__(self, app, host, port, verbose=False):
        handler = type("BoundHandler", (Handler,), {"quiet": not verbose})
        super().__init__((host, port), handler)
        self.app = app
        self.loopback = host in LOOPBACK_NAMES or host == "::1"


def serve(app, host="127.0.0.1", port=DEFAULT_PORT, verbose=False):
    """Serve until Ctrl-C; then (and on any other exit, SIGTERM included) stop the worker and remove the
    private folder, and let KeyboardInterrupt / Terminated go on to the tool's exit status (130 / 143, one
    line). An address that cannot be bound raises OSError after the same clean-up."""
    try:
        server = Server(app, host, port, verbose)
    except OSError as e:  # the port is taken, the address is not this machine's: one line, naming them
        app.close()
        raise OSError(e.errno, e.strerror, f"{host}:{port}") from None
    except BaseException:
        app.close()
        raise
    shown = f"[{host}]" if ":" in host else host
    print(f"serving on http://{shown}:{server.server_address[1]}/  (Ctrl-C stops)", flush=True)
    try:
        server.serve_forever(poll_interval=0.2)
    except KeyboardInterrupt:
        print("stopping: cancelling jobs, removing temporary files", flush=True)
        raise  # tools/_cli.run: exit status 130, one line
    finally:
        server.server_close()
        app.close()
