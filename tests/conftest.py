"""pytest markers and the CI rule for parity tests.

Markers: `parity` (needs a reference library, a test-only extra), `slow` (skipped unless --runslow),
`gpu` (skipped without CUDA). When the environment variable CI is set, a skipped parity test fails:
CI must run every comparison against the reference libraries.
"""
import os

import pytest
import torch


def pytest_addoption(parser):
    parser.addoption("--runslow", action="store_true", help="also run tests marked slow")


def pytest_configure(config):
    config.addinivalue_line("markers", "parity: compares minidiff with a reference library (test extras)")
    config.addinivalue_line("markers", "slow: long-running; skipped unless --runslow")
    config.addinivalue_line("markers", "gpu: needs CUDA")


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


@pytest.fixture(scope="module")
def one_thread():
    """Torch on one thread for a test module of tiny models: on a shared 2-core machine two oversubscribed
    threads run them several times slower. Use with `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
