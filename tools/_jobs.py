"""A first-in first-out job queue with one worker thread: what tools/serve.py runs photos through.

One model copy, one worker: jobs wait in submission order, each knows its place in the line, reports its
progress (which plugin, which step, time left) through a tqdm-like bar, and can be cancelled while waiting
(it never runs) or while running (it stops at its next step). A job that raises fails alone; the worker
goes on with the next one. The last `history` finished jobs are kept; older ones are forgotten, and
`on_forget(job)` lets the owner delete their files.

    queue = JobQueue(run=lambda job: {"answer": 42})   # run(job) -> result; may use job.bar(...), job.check()
    job = queue.submit({"photo": "..."})
    job.state, queue.position(job), job.progress()   # "queued" | "running" | "done" | "failed" | "cancelled"
"""
import itertools
import secrets
import sys
import threading
import time
import traceback
from collections import deque
from statistics import median

class Cancelled(Exception):
    """Raised inside a running job, at its next step, after cancel() was called."""


class QueueFull(Exception):
    """submit() refused: `max_waiting` jobs are already waiting."""


class StepBar:
    """The tqdm subset minidiff.plugin.plugin.run_plugin calls (update); checks for cancellation at every step."""

    def __init__(self, job):
        self.job = job

    def update(self, n=1):
        self.job.step += n
        self.job.step_time = time.monotonic()
        self.job.marks += [(len(self.job.plugin_starts) - 1, self.job.step_time)] * n
        self.job.check()


class Job:
    """One request: its parameters, state, progress and, when done, its result (a dict the runner returns)."""

    _numbers = itertools.count(1)

    def __init__(self, params):
        # a short unguessable id: another tab on the same server cannot walk through the jobs by number
        self.id = f"{next(self._numbers)}-{secrets.token_hex(4)}"
        self.params = params
        self.state = "queued"
        self.created, self.started, self.finished = time.time(), None, None
        self.error, self.result = None, None
        self.cancel_event = threading.Event()
        # progress: `stage` in words, the plugin running (index of `plugins`), steps done of `total_steps`
        self.stage, self.plugin, self.plugins, self.step, self.total_steps = "waiting", None, [], 0, 0
        self.started_mono, self.finished_mono, self.step_time = None, None, None
        self.plugin_starts, self.marks = [], []  # when each plugin began; (plugin index, time) of each step

    def check(self):
        """Raise Cancelled when cancel() was called (a runner calls it before work a step does not cover)."""
        if self.cancel_event.is_set():
            raise Cancelled()

    def bar(self, total_steps, plugins):
        """A progress bar (StepBar) for `total_steps` steps over `plugins` (task names, in order)."""
        self.total_steps, self.plugins, self.step = total_steps, list(plugins), 0
        self.plugin_starts, self.marks = [], []
        return StepBar(self)

    def start_plugin(self, task):
        """The runner begins plugin `task` (its TPB and VAE encode come before its first step)."""
        self.plugin, self.stage = task, "running"
        self.plugin_starts.append(time.monotonic())

    def progress(self):
        """Plugin, step, fraction done and an estimate of the seconds left (None until a step is done)."""
        end = self.finished_mono or time.monotonic()
        elapsed = end - self.started_mono if self.started_mono is not None else 0.0
        done = 1.0 if self.state == "done" else 0.0
        fraction = self.step / self.total_steps if self.total_steps else done
        left = None
        if self.state == "running" and self.step and self.total_steps:
            left = time_left(self.plugin_starts, self.marks, self.total_steps, len(self.plugins),
                             time.monotonic())
        index = self.plugins.index(self.plugin) if self.plugin in self.plugins else None
        return {"stage": self.stage, "plugin": self.plugin, "plugin_index": index, "plugins": self.plugins,
                "step": self.step,
                "total_steps": self.total_steps, "fraction": round(min(fraction, 1.0), 4),
                "elapsed_s": round(elapsed, 2), "eta_s": None if left is None else round(left, 1)}


def time_left(starts, marks, total_steps, n_plugins, now):
    """Seconds a restore still needs at time `now`, from what this job measured: `starts` (when each plugin
    began), `marks` ((plugin index, time) of every step done), `total_steps` = steps + chain_steps *
    (plugins - 1). A step costs the median interval between two steps of one plugin (the same UNet + SCB
    call whichever plugin runs); each plugin adds a lead-in (TPB + VAE encode: its start to its first step,
    less a step) and a tail (the VAE decode: its last step to the next plugin's start; until one is seen,
    twice the lead-in: SD's VAE decoder costs about twice its encoder). None before the first step.
    (Elapsed time per step over the job, the earlier rule, left the encodes and decodes out: 2-5 s shown
    for a 57 s job.)"""
    if not marks or not starts:
        return None
    first, last = {}, {}
    for k, t in marks:
        first.setdefault(k, t)
        last[k] = t
    gaps = [b - a for (i, a), (j, b) in zip(marks, marks[1:]) if i == j and b > a]
    step = median(gaps) if gaps else max(first[0] - starts[0], 0.0)
    leads = [max(first[k] - starts[k] - step, 0.0) for k in first if k < len(starts)]
    tails = [max(starts[k + 1] - last[k], 0.0) for k in last if k + 1 < len(starts)]
    lead = sum(leads) / len(leads) if leads else 0.0
    tail = sum(tails) / len(tails) if tails else 2 * lead
    now_at = len(starts) - 1  # the plugin running: it made the last step, or its lead-in is under way
    later = max(n_plugins - 1 - now_at, 0)
    left = step * max(total_steps - len(marks), 0) + tail * (1 + later) + lead * later
    left += lead if now_at > marks[-1][0] else 0.0
    return max(left - (now - max(starts[-1], marks[-1][1])), 0.0)


class JobQueue:
    """FIFO of jobs run one at a time by a worker thread calling run(job) -> result dict."""

    def __init__(self, run, history=12, max_waiting=16, on_finish=None, on_forget=None):
        """on_finish(job): when a job ends, however (e.g. drop what only running needed); on_forget(job): when
        it leaves the history (e.g. delete its files)."""
        self._run, self._history, self._max_waiting = run, history, max_waiting
        self._on_finish = on_finish or (lambda job: None)
        self._on_forget = on_forget or (lambda job: None)
        self._cv = threading.Condition()
        self._waiting = deque()  # queued jobs, oldest first
        self._running = None
        self._finished = deque()  # finished jobs, oldest first, at most `history`
        self._jobs = {}  # id -> Job, for every job waiting, running or in the history
        self._closed = False
        self._thread = threading.Thread(target=self._work, name="minidiff-worker", daemon=True)
        self._thread.start()

    def submit(self, params):
        """Queue a job; QueueFull when `max_waiting` are already waiting."""
        with self._cv:
            if self._closed:
                raise QueueFull("the server is shutting down")
            if len(self._waiting) >= self._max_waiting:
                raise QueueFull(f"{len(self._waiting)} jobs are waiting already: try again later")
            job = Job(params)
            self._jobs[job.id] = job
            self._waiting.append(job)
            self._cv.notify_all()
            return job

    def get(self, job_id):
        with self._cv:
            return self._jobs.get(job_id)

    def position(self, job):
        """0 while running, k when k - 1 jobs wait before it (1 = next), None once finished."""
        with self._cv:
            if job is self._running:
                return 0
            return self._waiting.index(job) + 1 if job in self._waiting else None

    def cancel(self, job_id):
        """Cancel a waiting job (it never runs) or a running one (it stops at its next step).
        Returns the job, or None for an unknown id; a finished job is left as it is."""
        with self._cv:
            job = self._jobs.get(job_id)
            if job is None or job.state not in ("queued", "running"):
                return job
            job.cancel_event.set()
            if job.state == "queued":
                self._waiting.remove(job)
                self._finish(job, "cancelled")
            return job

    def history(self):
        """Finished jobs, newest first."""
        with self._cv:
            return list(reversed(self._finished))

    def close(self, timeout=30.0):
        """Cancel everything, stop the worker (waits up to `timeout` s for the running job's next step)."""
        with self._cv:
            self._closed = True
            for job in list(self._waiting):
                job.cancel_event.set()
                self._finish(job, "cancelled")
            self._waiting.clear()
            if self._running is not None:
                self._running.cancel_event.set()
            self._cv.notify_all()
        self._thread.join(timeout)

    def _finish(self, job, state, error=None, result=None):
        """Move a job to the history (the caller holds the lock); forget the oldest beyond `history`."""
        job.state, job.error, job.result, job.finished = state, error, result, time.time()
        job.finished_mono = time.monotonic()
        job.stage = state
        self._on_finish(job)
        self._finished.append(job)
        while len(self._finished) > self._history:
            old = self._finished.popleft()
            self._jobs.pop(old.id, None)
            self._on_forget(old)

    def _work(self):
        while True:
            with self._cv:
                while not self._waiting and not self._closed:
                    self._cv.wait()
                if self._closed:
                    return
                job = self._running = self._waiting.popleft()
                job.state, job.stage = "running", "starting"
                job.started, job.started_mono = time.time(), time.monotonic()
            state, error, result = "done", None, None
            try:
                result = self._run(job)
            except Cancelled:
                state = "cancelled"
            except Exception as e:  # a crash fails this job only; the server keeps serving
                state = "failed"
                error = (str(e).splitlines() or [""])[0] or type(e).__name__
                print(f"job {job.id} failed:", file=sys.stderr)
                traceback.print_exc()
            with self._cv:
                self._running = None
                self._finish(job, state, error, result)
