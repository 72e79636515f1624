#!/usr/bin/env python
"""The page's upload-to-result time: tools/serve.py started as a user starts it, driven over HTTP as the page
drives it (upload the photo, submit the job, poll until it is done, fetch result.png), timed end to end.

    python tools/bench/page_latency.py                                   # examples/, the default model, 3 runs
    python tools/bench/page_latency.py --photo examples/coffee-rain.jpg --task derain --runs 5
    python tools/bench/page_latency.py --serve-flag=--fake-weights       # any serve.py flag, repeated

Each run uploads the photo anew (a fresh upload id) and submits one job: with --task, that plugin; otherwise
the photo's prompt from examples/prompts.json (the selector chooses). Prints every run and the median, and
with --json writes them. The first run includes nothing of the model load: serve.py loads before it serves.
"""
import json
import os
import statistics
import subprocess
import sys
import time
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path[:0] = [ROOT, os.path.join(ROOT, "tools")]
from _cli import OneLineParser, int_range, run  # noqa: E402
from minidiff.errors import UsageError  # noqa: E402
from minidiff.io.files import save_json_atomic  # noqa: E402


def call(url, method="GET", body=None):
    """(status, parsed JSON or bytes) of one request."""
    data = json.dumps(body).encode() if isinstance(body, dict) else body
    req = urllib.request.Request(url, data=data, method=method)
    with urllib.request.urlopen(req, timeout=600) as r:
        raw = r.read()
        return r.status, json.loads(raw) if "json" in (r.headers["Content-Type"] or "") else raw


def start_server(flags):
    """tools/serve.py on a free port -> (process, base URL), once it prints its 'serving on' line."""
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "tools", "serve.py"), "--port", "0", *flags],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    for line in proc.stdout:
        if line.startswith("serving on"):
            return proc, line.split()[2].rstrip("/")
    raise UsageError(f"tools/serve.py {' '.join(flags)} stopped before serving (exit {proc.wait()})")


def one_run(url, photo, job):
    """Seconds from the upload's first byte to result.png in hand, and the job's record."""
    t0 = time.perf_counter()
    with open(photo, "rb") as f:
        _, up = call(f"{url}/api/upload?name={os.path.basename(photo)}", "POST", f.read())
    _, submitted = call(f"{url}/api/jobs", "POST", {"upload": up["id"], **job})
    while True:
        _, state = call(f"{url}/api/jobs/{submitted['id']}")
        if state["state"] in ("done", "failed", "cancelled"):
            break
        time.sleep(0.3)  # the page polls every 300 ms (minidiff/data/web/app.js)
    if state["state"] != "done":
        raise UsageError(f"job {state['state']}: {state.get('error')}")
    call(f"{url}/api/jobs/{submitted['id']}/result.png")
    return time.perf_counter() - t0, state


def main(argv=None):
    p = OneLineParser(__doc__)
    a = p.add_argument
    a("--photo", default=os.path.join(ROOT, "examples", "coffee-rain.jpg"), help="the photo uploaded")
    a("--task", help="run this plugin (default: the photo's prompt in examples/prompts.json)")
    a("--runs", type=int_range(1), default=3, help="timed runs")
    a("--serve-flag", action="append", default=[], help="a flag for tools/serve.py (repeat for several)")
    a("--json", help="write the runs here")
    args = p.parse_args(argv)
    if not os.path.isfile(args.photo):
        raise UsageError(f"--photo {args.photo}: no such file")
    if args.task:
        job = {"tasks": [args.task]}
    else:
        with open(os.path.join(ROOT, "examples", "prompts.json")) as f:
            prompts = json.load(f)
        job = {"prompt": prompts.get(os.path.splitext(os.path.basename(args.photo))[0], "remove the rain")}
    proc, url = start_server(args.serve_flag)
    try:
        _, info = call(f"{url}/api/info")
        times = []
        for k in range(args.runs):
            seconds, state = one_run(url, args.photo, job)
            times.append(round(seconds, 3))
            print(f"run {k + 1}: {seconds:.2f} s  tasks {state['record']['tasks']}  "
                  f"restore timings {state['record'].get('timings_s')}  "
                  f"{state['record']['processed_size']}", flush=True)
    finally:
        proc.terminate()
        proc.wait()
    print(f"upload to result: median {statistics.median(times):.2f} s over {len(times)} runs "
          f"({os.path.basename(args.photo)}, {job})")
    if args.json:
        save_json_atomic({"photo": args.photo, "job": job, "serve_flags": args.serve_flag, "seconds": times,
                          "median_s": statistics.median(times), "info": info}, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(run(main))
