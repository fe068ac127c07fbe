"""Resource metrics of a real server: CPU time and resident memory per process instance (and of the server), GPU
figures through NVML when the machine has a GPU, and none (never an error) when it has not."""

from __future__ import annotations

import re
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from dhow.core.heap import YOUNG_THRESHOLD
from tests.conftest import DhowProcess, start_dhow
from tests.monitoring_models import doubler_repository

INSTANCES = "instances: {count: 2, kind: process}\n"


def _gpu_present() -> bool:
    try:
        import pynvml

        pynvml.nvmlInit()
        return bool(pynvml.nvmlDeviceGetCount())
    except Exception:
        return False


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DhowProcess]:
    root = tmp_path_factory.mktemp("resources")
    served = start_dhow(doubler_repository(root, INSTANCES), root)
    yield served
    assert served.stop() == 0, served.log()


def _metrics(server: DhowProcess) -> str:
    with urllib.request.urlopen(f"http://{server.http_url}/metrics", timeout=30) as answer:
        return str(answer.read().decode())


def _children(pid: int) -> set[int]:
    found = set()
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_bytes().rpartition(b")")[2].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.add(int(stat.parent.name))
    return found


def test_each_process_instance_reports_its_cpu_time_and_resident_memory(server: DhowProcess) -> None:
    text = _metrics(server)
    for instance in ("0", "1"):
        labels = f'instance="{instance}",model="doubler",version="1"'
        cpu = re.search(r"dhow_instance_cpu_seconds_total\{" + labels + r"\} ([0-9.e+-]+)", text)
        rss = re.search(r"dhow_instance_resident_memory_bytes\{" + labels + r"\} ([0-9.e+-]+)", text)
        assert cpu is not None and rss is not None, text
        assert float(cpu.group(1)) > 0, "an instance that loaded numpy and its model has used CPU"
        assert float(rss.group(1)) > 10e6, "a Python process with numpy holds more than 10 MB"
    assert len(_children(server.process.pid)) >= 2, "the two instances are processes of the server"
    assert re.search(r"^process_resident_memory_bytes [0-9.e+]+$", text, re.M), "the server's own process"


def test_the_server_settles_its_heap_once_ready(server: DhowProcess) -> None:
    """``settle_heap`` ran before the server said ready: start-up's objects are frozen and the young threshold is
    raised (an unsettled process has none frozen and Python's 700)."""
    metrics = _metrics(server)
    frozen = re.search(r"^dhow_gc_frozen_objects (\S+)$", metrics, re.M)
    young = re.search(r'^dhow_gc_threshold\{generation="0"\} (\S+)$', metrics, re.M)
    assert frozen is not None and young is not None, metrics
    assert float(frozen.group(1)) > 10_000 and float(young.group(1)) == YOUNG_THRESHOLD


def test_no_gpu_no_gpu_metrics_and_no_error(server: DhowProcess) -> None:
    if _gpu_present():
        pytest.skip("this machine has a GPU: its metrics are tested by test_gpu_metrics_per_gpu")
    text = _metrics(server)
    assert "dhow_gpu_" not in text and "dhow_instance_gpu_memory_bytes" not in text
    assert "Traceback" not in server.log() and "NVML" not in server.log()


def test_gpu_metrics_per_gpu(server: DhowProcess) -> None:
    if not _gpu_present():
        pytest.skip("no GPU (NVML finds none): test_no_gpu_no_gpu_metrics_and_no_error shows them absent")
    import pynvml

    text = _metrics(server)
    for index in range(pynvml.nvmlDeviceGetCount()):
        handle = pynvml.nvmlDeviceGetHandleByIndex(index)
        total = pynvml.nvmlDeviceGetMemoryInfo(handle).total
        found = re.search(r'dhow_gpu_memory_total_bytes\{gpu="' + str(index) + r'",[^}]*\} ([0-9.e+]+)', text)
        assert found is not None and float(found.group(1)) == float(total), text
        for name in ("dhow_gpu_utilization_ratio", "dhow_gpu_memory_used_bytes", "dhow_gpu_temperature_celsius"):
            assert re.search(name + r'\{gpu="' + str(index) + '"', text), f"{name} of GPU {index}"
