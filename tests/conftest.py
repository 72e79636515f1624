"""pytest markers, the CI rule for parity tests, and one thread per test.

Markers: `parity` (needs a reference library, a test-only extra), `slow` (longer than ~20 s on 2 cores, or a
full-size network: skipped unless --runslow; .ci/run passes it), `gpu` (skipped without CUDA). When the
environment variable CI is set, a skipped parity test fails: CI must run every comparison against the
reference libraries, the slow ones included.

Threads: every test runs torch on ONE thread, and subprocesses the tests start inherit OMP_NUM_THREADS=1.
The networks here are tiny, and on a shared 2-core machine two oversubscribed threads run them several times
slower. MINIDIFF_TEST_THREADS=N gives each test N threads instead; 0 leaves torch's default (all cores).

Watchdog: a test that runs longer than MINIDIFF_TEST_TIMEOUT seconds (default 1500; 0 = none) fails there,
after printing every thread's stack and the processes it started, so that one hung test (a subprocess that
never answers, a collective waiting for a lost rank) costs one test and says where, not the whole CI budget.
"""
import faulthandler
import os
import signal
import subprocess
import sys

import pytest
import torch

THREADS_ENV = "MINIDIFF_TEST_THREADS"
TIMEOUT_ENV = "MINIDIFF_TEST_TIMEOUT"


def threads_per_test():
    """Torch threads per test: $MINIDIFF_TEST_THREADS, default 1; 0 = torch's default."""
    value = os.environ.get(THREADS_ENV, "1")
    if not value.isdigit():
        raise pytest.UsageError(f"{THREADS_ENV}={value!r}: give a number of threads (0 = torch's default)")
    return int(value)


def pytest_addoption(parser):
    parser.addoption("--runslow", action="store_true", help="also run tests marked slow")


def pytest_configure(config):
    config.addinivalue_line("markers", "parity: compares minidiff with a reference library (test extras)")
    config.addinivalue_line("markers", "slow: over ~20 s or a full-size network; skipped unless --runslow")
    config.addinivalue_line("markers", "gpu: needs CUDA")
    if threads_per_test():
        torch.set_num_threads(threads_per_test())  # module- and session-scoped fixtures too
        # tools and oracle scripts run in subprocesses: the same limit for them
        os.environ.setdefault("OMP_NUM_THREADS", str(threads_per_test()))


def pytest_collection_modifyitems(config, items):
    if config.getoption("--runslow"):
        return
    skip = pytest.mark.skip(reason="slow: pass --runslow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if os.environ.get("CI") and report.skipped and "parity" in item.keywords:
        report.outcome = "failed"
        report.longrepr = f"parity test skipped under CI: {report.longrepr}"


@pytest.fixture(autouse=True)
def one_thread():
    """Every test: torch on threads_per_test() threads (1 unless MINIDIFF_TEST_THREADS says otherwise), even
    when an earlier test or the code under test changed the number."""
    n, wanted = torch.get_num_threads(), threads_per_test()
    if wanted:
        torch.set_num_threads(wanted)
    yield
    torch.set_num_threads(n)


def timeout_per_test():
    """Seconds a test may run: $MINIDIFF_TEST_TIMEOUT, default 1500 (the slowest test takes ~9 min); 0 = none."""
    value = os.environ.get(TIMEOUT_ENV, "1500")
    if not value.isdigit():
        raise pytest.UsageError(f"{TIMEOUT_ENV}={value!r}: give whole seconds (0 = no limit)")
    return int(value)


@pytest.fixture(autouse=True)
def watchdog(request):
    """SIGALRM after timeout_per_test() seconds: the stacks of every thread and this process's children go to
    stderr, then the test fails with one line (the exception interrupts a blocking wait in the test)."""
    limit = timeout_per_test()
    if not limit or not hasattr(signal, "SIGALRM"):
        yield
        return

    def expired(signum, frame):
        sys.stderr.write(f"\n{request.node.nodeid}: over {limit} s; stacks and child processes:\n")
        faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
        ps = subprocess.run(["ps", "-o", "pid,etimes,pcpu,rss,args", "--ppid", str(os.getpid())],
                            capture_output=True, text=True)
        sys.stderr.write(ps.stdout)
        raise pytest.fail.Exception(f"test ran over {limit} s ({TIMEOUT_ENV})")
    previous = signal.signal(signal.SIGALRM, expired)
    signal.alarm(limit)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, previous)
