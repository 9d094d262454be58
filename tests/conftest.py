"""Shared test helpers, and the real ComfyUI of the host suite (`test_comfyui_*.py`, see comfy_server.py).

The suite runs on pytest-xdist workers (pyproject's addopts); the host suite is one xdist group: one worker,
one ComfyUI server, beside the unit tests. Each worker computes on its share of the cores: torch.set_num_threads
here, and OMP_NUM_THREADS for the CLI and ComfyUI processes the tests start, so that they compute as the tests
themselves do (bit-equality tests compare them; CPU kernels split sums by thread count).
Two workers of two threads on 2 cores wait on each other at every small op: tests/test_dcae.py took 240 s that
way under load, 30 s on one thread.
"""
import os
from types import SimpleNamespace

import pytest
import torch

if os.environ.get("PYTEST_XDIST_WORKER_COUNT"):
    os.environ.setdefault("OMP_NUM_THREADS",
                          str(max(1, (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"]))))
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))  # this worker too, whenever torch was imported


@pytest.fixture
def recording_ops():
    """An `ops` namespace whose Linear/Conv2d record every layer they build: (ops, built layers)."""
    made = []

    class Linear(torch.nn.Linear):
        def __init__(self, *a, **k):
            super().__init__(*a, **k)
            made.append(self)

    class Conv2d(torch.nn.Conv2d):
        def __init__(self, *a, **k):
            super().__init__(*a, **k)
            made.append(self)

    return SimpleNamespace(Linear=Linear, Conv2d=Conv2d), made


@pytest.hookimpl(tryfirst=True)  # before xdist reads the group marks
def pytest_collection_modifyitems(config, items):
    """The host suite is one xdist group and runs last, so that a ComfyUI build from the snapshot (started here,
    in the background) overlaps the unit tests."""
    host = [item for item in items if item.path.name.startswith("test_comfyui")]
    if host:
        import comfy_server

        for item in host:
            item.add_marker(pytest.mark.xdist_group("comfyui"))
        items[:] = [item for item in items if item not in host] + host
        if not config.option.collectonly:
            comfy_server.start_setup()


@pytest.fixture(scope="session")
def server(tmp_path_factory):
    """One real ComfyUI server for the whole run (`comfy_server.serve`)."""
    import comfy_server

    yield from comfy_server.serve(tmp_path_factory.mktemp("comfy"))


_FILE_SECONDS: dict[str, float] = {}


def pytest_runtest_logreport(report):
    """Sums setup + call + teardown time per test file (reports from xdist workers arrive here too)."""
    path = report.nodeid.split("::")[0]
    _FILE_SECONDS[path] = _FILE_SECONDS.get(path, 0.0) + report.duration


def pytest_terminal_summary(terminalreporter):
    """Test time per file, largest first: the CI time budget's ledger (the sum is CPU-worker time, not wall time)."""
    if not _FILE_SECONDS:
        return
    terminalreporter.section("seconds per test file")
    for path, seconds in sorted(_FILE_SECONDS.items(), key=lambda kv: -kv[1]):
        terminalreporter.write_line(f"{seconds:8.1f}  {path}")
    terminalreporter.write_line(f"{sum(_FILE_SECONDS.values()):8.1f}  (all files, summed over workers)")
