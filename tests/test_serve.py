"""tools/serve.py as a user runs it: a subprocess on a free loopback port with --fake-weights (random tiny
models), driven over HTTP with urllib only. Covers the page and /api/info, upload, plan (the dry run), jobs
(progress, result PNG, record, same seed same image), two jobs queued in order, cancel (running and
waiting), a full queue, history, every kind of bad request (JSON error + status, never a traceback), and a
clean stop on Ctrl-C (exit 0, private folder removed). The queue's crash isolation is tested in process.
About 30 s on 2 CPU cores:
    python -m pytest tests/test_serve.py -q
"""
import io
import json
import socket
import struct
import subprocess
import sys
import threading
import time
import urllib.request
import zlib

import numpy as np
import pytest
from PIL import Image

from minidiff.plugin.plugin import TASKS
from web import ROOT, Server

sys.path.insert(0, str(ROOT / "tools"))
from _jobs import JobQueue  # noqa: E402  (a helper module of tools/serve.py)

PRESETS = ["remove snow", "remove haze", "enhance face appearance", "remove rain", "enhance brightness",
           "clear blur", "remove highlight", "I would like to remove the moire"]  # demo.py l.253-268


def png(size=(64, 64), seed=0):
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


def bomb_png(width=100_000, height=100_000):
    """A 100-byte PNG whose header claims 10 gigapixels (a decompression bomb)."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\0" * 64)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


@pytest.fixture(scope="module")
def server():
    """The server with small limits (1 MiB, 1 Mpx, 3 waiting jobs, 4 kept) and --max-side 64 (fast)."""
    with Server("--fake-weights", "--max-side", "64", "--max-upload-mb", "1", "--max-megapixels", "1",
                "--max-queue", "3", "--history", "4") as url:
        yield url


def call(url, method="GET", body=None, headers=None, raw=False):
    """(status, decoded JSON or bytes) of one request; HTTP errors are answers too."""
    if isinstance(body, (dict, list)):
        body = json.dumps(body).encode()
    req = urllib.request.Request(url, data=body, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            status, data, ctype = r.status, r.read(), r.headers["Content-Type"]
    except urllib.error.HTTPError as e:
        status, data, ctype = e.code, e.read(), e.headers["Content-Type"]
    return status, data if raw or "json" not in ctype else json.loads(data)


def upload(server, data=None, name="photo.png"):
    status, up = call(f"{server}/api/upload?name={name}", "POST", data or png())
    assert status == 201, up
    return up["id"]


def wait(server, job_id, until=("done", "failed", "cancelled"), timeout=60):
    end, seen = time.monotonic() + timeout, []
    while time.monotonic() < end:
        job = call(f"{server}/api/jobs/{job_id}")[1]
        seen.append(job)
        if job["state"] in until:
            return job, seen
        time.sleep(0.05)
    raise TimeoutError(f"job {job_id} still {job['state']} after {timeout} s")


def test_page_and_info(server):
    status, page = call(server + "/", raw=True)
    assert status == 200 and b'src="/app.js"' in page
    assert all(call(server + p, raw=True)[0] == 200 for p in ("/app.js", "/style.css"))
    info = call(server + "/api/info")[1]
    assert [p["prompt"] for p in info["presets"]] == PRESETS and len(info["tasks"]) == 8
    assert info["resolution"] == {"min": 512, "max": 1024, "step": 64, "default": 512}
    assert info["steps"] == {"min": 1, "max": 100, "default": 20} and info["settings"]["fake_weights"]
    assert info["settings"]["chain_steps"] == 3 and info["settings"]["device"] == "cpu"
    example = info["examples"][0]
    assert example["prompt"] and call(server + example["url"], raw=True)[1][:2] == b"\xff\xd8"  # a JPEG


def test_upload_plan_run_result(server):
    t0 = time.monotonic()
    up_id = upload(server)
    status, rec = call(server + "/api/plan", "POST", {"upload": up_id, "prompt": "please remove the rain"})
    assert status == 200 and rec["dry_run"] and set(rec["scores"]) == {*TASKS, "null"}
    assert list(rec["scores"])[-1] == "null" and rec["plan"]
    body = {"upload": up_id, "tasks": ["dehaze", "derain"], "steps": 4, "seed": 7}
    status, rec = call(server + "/api/plan", "POST", body)
    assert rec["tasks"] == ["dehaze", "derain"] and rec["scores"] is None and rec["chain_steps_used"] == 3
    status, job = call(server + "/api/jobs", "POST", body)
    assert status == 201 and job["seed"] == 7 and job["state"] in ("queued", "running")
    job, seen = wait(server, job["id"])
    first = next(j for j in seen if j["progress"]["step"] >= 1)
    print(f"upload to first progress: {time.monotonic() - t0:.2f} s (fake weights)")
    assert job["state"] == "done" and job["progress"]["fraction"] == 1.0 and first["progress"]["plugin"]
    record = job["record"]
    assert record["seed"] == 7 and record["tasks"] == ["dehaze", "derain"] and not record["dry_run"]
    assert record["input"] == "photo.png" and record["fake_weights"] and record["processed_size"] == [64, 64]
    result = Image.open(io.BytesIO(call(server + job["files"]["result.png"], raw=True)[1]))
    before = Image.open(io.BytesIO(call(server + job["files"]["input.png"], raw=True)[1]))
    assert result.size == before.size == (64, 64)
    assert call(server + job["files"]["record.json"])[1] == record
    again = wait(server, call(server + "/api/jobs", "POST", body)[1]["id"])[0]  # same seed: same image
    first, second = (call(server + j["files"]["result.png"], raw=True)[1] for j in (job, again))
    assert first == second


def test_same_image_and_record_as_sample_py(server, tmp_path):
    """The page's job and `tools/sample.py` on the same photo and settings: same pixels, same record."""
    (tmp_path / "photo.png").write_bytes(png(seed=3))
    body = {"upload": upload(server, png(seed=3)), "prompt": "please remove the rain", "steps": 4, "seed": 7}
    job = wait(server, call(server + "/api/jobs", "POST", body)[1]["id"])[0]
    cmd = [sys.executable, str(ROOT / "tools" / "sample.py"), "--fake-weights", "--no-progress", "--input",
           str(tmp_path / "photo.png"), "--prompt", body["prompt"], "--steps", "4", "--seed", "7",
           "--max-side", "64", "--output", str(tmp_path / "out")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    cli = json.loads((tmp_path / "out" / "photo.json").read_text())
    page = call(server + job["files"]["record.json"])[1]
    # rank/world_size: the CLI's place in a torchrun run (tools/_shard.py), here one process of one; the
    # page is one process by design, so its record has no such keys. Everything else is the same record.
    assert (cli.pop("rank"), cli.pop("world_size")) == (0, 1)
    assert set(page) == set(cli) and page["tasks"]
    for key in set(cli) - {"input", "timings_s"}:  # input: the upload's name, not a path of ours
        assert page[key] == cli[key], key
    shown = np.asarray(Image.open(io.BytesIO(call(server + job["files"]["result.png"], raw=True)[1])))
    assert (shown == np.asarray(Image.open(tmp_path / "out" / "photo.png"))).all()


def test_small_family_page_runs_at_its_working_size_as_sample_py(tmp_path):
    """--model small: the page plans and runs the photo at the family's working size (short side 128, not the
    slider's 512: the run once resized to the slider while the plan said 128), with sample.py's pixels."""
    (tmp_path / "photo.png").write_bytes(png(size=(300, 200), seed=5))
    with Server("--model", "small") as url:
        body = {"upload": upload(url, png(size=(300, 200), seed=5)), "tasks": ["derain"], "steps": 3,
                "seed": 7, "resolution": 512}
        job = wait(url, call(url + "/api/jobs", "POST", body)[1]["id"], timeout=120)[0]
        assert job["state"] == "done" and job["record"]["processed_size"] == [192, 128]
        shown = Image.open(io.BytesIO(call(url + job["files"]["result.png"], raw=True)[1]))
        assert shown.size == (192, 128)
    cmd = [sys.executable, str(ROOT / "tools" / "sample.py"), "--model", "small", "--no-progress", "--input",
           str(tmp_path / "photo.png"), "--task", "derain", "--steps", "3", "--seed", "7", "--output",
           str(tmp_path / "out")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (np.asarray(shown) == np.asarray(Image.open(tmp_path / "out" / "photo.png"))).all()


def test_two_jobs_run_in_order(server):
    up_id = upload(server)
    jobs = [None, None]

    def submit(i):
        jobs[i] = call(server + "/api/jobs", "POST", {"upload": up_id, "tasks": ["deblur"], "steps": 6})[1]
    for i in range(2):  # two clients at once, the second a moment later
        threading.Thread(target=submit, args=(i,)).start()
        time.sleep(0.05)
    while None in jobs:
        time.sleep(0.01)
    assert jobs[1]["position"] >= 1  # waits behind the first
    a, b = (wait(server, j["id"])[0] for j in jobs)
    assert a["state"] == b["state"] == "done" and b["started"] >= a["finished"]
    history = call(server + "/api/history")[1]
    assert [j["id"] for j in history[:2]] == [b["id"], a["id"]] and len(history) <= 4  # newest first


def test_cancel_and_full_queue(server):
    up_id = upload(server)
    body = {"upload": up_id, "tasks": ["derain"], "steps": 100}
    running = call(server + "/api/jobs", "POST", body)[1]
    wait(server, running["id"], until=("running",))
    waiting = [call(server + "/api/jobs", "POST", body)[1] for _ in range(3)]
    assert [j["position"] for j in waiting] == [1, 2, 3]
    status, full = call(server + "/api/jobs", "POST", body)
    assert status == 503 and "waiting" in full["error"]
    assert call(server + f"/api/jobs/{waiting[0]['id']}/cancel", "POST", {})[1]["state"] == "cancelled"
    while call(server + f"/api/jobs/{running['id']}")[1]["progress"]["step"] < 1:
        time.sleep(0.02)
    for j in [running] + waiting[1:]:
        call(server + f"/api/jobs/{j['id']}/cancel", "POST", {})
    job = wait(server, running["id"], timeout=10)[0]
    assert job["state"] == "cancelled" and job["progress"]["step"] < 100
    assert call(server + f"/api/jobs/{waiting[0]['id']}")[1]["started"] is None  # never ran
    assert call(server + f"/api/jobs/{running['id']}/result.png")[0] == 409


BAD = [  # (method, path, body, headers, status)
    ("GET", "/nope", None, {}, 404), ("GET", "/api/plan", None, {}, 405), ("PUT", "/api/jobs", b"", {}, 501),
    ("POST", "/api/upload", b"not an image", {}, 415), ("POST", "/api/upload", b"", {}, 400),
    ("POST", "/api/upload", b"\0" * (1 << 20 | 1), {}, 413), ("POST", "/api/upload", bomb_png(), {}, 413),
    ("POST", "/api/upload", png((1200, 1000)), {}, 413), ("POST", "/api/plan", b"{", {}, 400),
    ("POST", "/api/plan", [1], {}, 400), ("POST", "/api/plan", {"upload": "abc", "prompt": "x"}, {}, 404),
    ("GET", "/api/jobs/1-ffff", None, {}, 404), ("POST", "/api/jobs/1-ffff/cancel", {}, {}, 404),
    ("GET", "/api/jobs/1-ffff/result.png", None, {}, 404),
    ("GET", "/api/uploads/abc/preview.png", None, {}, 404),
    ("GET", "/api/examples/..%2Fsetup.py", None, {}, 404),  # names listed at start, never a path
    ("GET", "/api/info", None, {"Host": "evil.com"}, 403),  # DNS rebinding
    ("POST", "/api/plan", {}, {"Origin": "http://evil.com"}, 403),
]
BAD_PARAMS = [{"tasks": ["sharpen"]}, {"tasks": ["derain", "derain"]}, {"tasks": "derain"}, {},
              {"prompt": "x", "tasks": ["derain"]}, {"prompt": "   "}, {"prompt": "x", "resolution": 500},
              {"prompt": "x", "resolution": 520}, {"prompt": "x", "steps": 0}, {"prompt": "x", "steps": 101},
              {"prompt": "x", "steps": "20"}, {"prompt": "x", "steps": 2.5}, {"prompt": "x", "steps": True},
              {"prompt": "x", "seed": -5}, {"prompt": "x", "seed": 2**63}, {"prompt": "x", "colour": 1},
              {"prompt": "x" * 1001}]


def test_bad_requests(server):
    for method, path, body, headers, expected in BAD:
        status, answer = call(server + path, method, body, headers)
        assert status == expected and isinstance(answer, dict) and answer["error"], (method, path, answer)
        assert "Traceback" not in answer["error"]
    up_id = upload(server)
    for params in BAD_PARAMS:
        status, answer = call(server + "/api/jobs", "POST", {"upload": up_id, **params})
        assert status == 400 and answer["error"], (params, answer)
    thin = upload(server, png((2000, 20)))  # too elongated: the 64 px cap leaves a side under 64
    status, answer = call(server + "/api/jobs", "POST", {"upload": thin, "prompt": "x"})
    assert status == 400 and "under 64" in answer["error"], answer
    host = server.split("//")[1].split(":")
    for raw in (b"GET / extra HTTP/1.0\r\n\r\n", b"POST /api/upload HTTP/1.0\r\n\r\n",  # no length: 411
                b"POST /api/upload HTTP/1.0\r\nContent-Length: 99999999999\r\n\r\nxx"):
        with socket.create_connection((host[0], int(host[1])), timeout=10) as s:
            s.sendall(raw)
            reply = s.makefile("rb").read().decode()
        assert reply.split()[1] in ("400", "411", "413") and '{"error": ' in reply, reply


def test_failed_job_leaves_the_queue_working():
    def run(job):
        if job.params["crash"]:
            raise RuntimeError("boom\nsecond line")
        return {"ok": True}
    q = JobQueue(run)
    bad, good = q.submit({"crash": True}), q.submit({"crash": False})
    for _ in range(200):
        if good.state == "done":
            break
        time.sleep(0.01)
    assert (bad.state, bad.error) == ("failed", "boom") and good.result == {"ok": True}
    q.close()


def test_time_left_counts_every_plugin_and_its_encode_and_decode():
    """The page's estimate (tools/_jobs.time_left) on a simulated job: 20 + 3 steps (2 plugins, chain 3) of
    1 s, each plugin with a 3 s lead-in (TPB + encode) and a 6 s decode: 41 s in all. Elapsed time per step,
    the old rule, said 3.1 s left after step 21 (8 s remained) and 0 s during the last decode. Exact here:
    the decode is twice the lead-in, the rule's guess until a decode is measured."""
    from _jobs import time_left
    lead, step, decode, steps = 3.0, 1.0, 6.0, [20, 3]
    starts, marks, t, events = [], [], 0.0, []  # events: (time, starts so far, marks so far)
    for k, n in enumerate(steps):
        starts.append(t)
        events.append((t, list(starts), list(marks)))
        t += lead
        for _ in range(n):
            t += step
            marks.append((k, t))
            events.append((t, list(starts), list(marks)))
        t += decode
    end = t
    assert end == 41.0
    for when, s, m in events[2:]:  # from the second step on (the first step alone cannot tell a step's cost)
        left = time_left(s, m, sum(steps), len(steps), when)
        assert abs(left - (end - when)) <= 1e-9, (when, left, end - when)
    first = time_left(*events[1][1:], sum(steps), len(steps), events[1][0])
    assert first > end - events[1][0]  # after one step: the lead-in counted as step time, an overestimate
    assert time_left([0.0], [], 23, 2, 1.0) is None
