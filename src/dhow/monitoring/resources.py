"""What the machine spends on the models, read when Prometheus scrapes (nothing runs between scrapes).

- ``GpuCollector``: per GPU, through NVML (``nvidia-ml-py``): utilisation, memory used and total, power and
  temperature; and the GPU memory each process instance uses. Without NVML, a driver or a GPU it yields nothing:
  the metrics are absent, never an error. A reading a GPU does not support (power on some boards) is left out.
- ``InstanceCollector``: per process instance (``instances.kind: process``), its CPU time and resident memory,
  from ``/proc``. The server's own process is prometheus_client's ``process_*`` metrics.
- ``HeapCollector``: the server process's garbage collector as ``core/heap.py`` settles it once the server is
  ready: the objects frozen out of the collections' reach (as ``settle_heap`` counted them: counting them again
  walks them all, milliseconds on the event loop at each scrape), and each generation's threshold.
"""

from __future__ import annotations

import gc
import logging
import os
from collections.abc import Callable, Iterable, Iterator
from typing import Any, NamedTuple

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from dhow.core.heap import frozen_objects

__all__ = ["GpuCollector", "HeapCollector", "InstanceCollector", "InstanceProcess"]

log = logging.getLogger("dhow.monitoring")

_GPU_LABELS = ["gpu", "uuid", "name"]
_INSTANCE_LABELS = ["model", "version", "instance"]


class InstanceProcess(NamedTuple):
    """One process instance of a loaded model version."""

    model: str
    version: str
    instance: int
    pid: int


#: the live process instances, asked at each scrape
Instances = Callable[[], Iterable[InstanceProcess]]


class GpuCollector(Collector):
    """NVML's figures per GPU; ``instances`` names the pids whose GPU memory is a model version's."""

    def __init__(self, instances: Instances | None = None) -> None:
        self._instances = instances
        self._nvml: Any = None
        try:
            import pynvml

            pynvml.nvmlInit()
            if pynvml.nvmlDeviceGetCount() > 0:
                self._nvml = pynvml
        except Exception as exc:  # no package, no driver, no GPU: no GPU metrics
            log.debug("no GPU metrics: %s", exc)

    @property
    def available(self) -> bool:
        return self._nvml is not None

    def collect(self) -> Iterator[Metric]:
        nvml = self._nvml
        if nvml is None:
            return
        families = {
            "utilization": GaugeMetricFamily(
                "dhow_gpu_utilization_ratio", "Share of the last sample period a kernel ran", labels=_GPU_LABELS
            ),
            "used": GaugeMetricFamily("dhow_gpu_memory_used_bytes", "GPU memory in use", labels=_GPU_LABELS),
            "total": GaugeMetricFamily("dhow_gpu_memory_total_bytes", "GPU memory installed", labels=_GPU_LABELS),
            "power": GaugeMetricFamily("dhow_gpu_power_watts", "GPU power draw", labels=_GPU_LABELS),
            "temperature": GaugeMetricFamily(
                "dhow_gpu_temperature_celsius", "GPU core temperature", labels=_GPU_LABELS
            ),
        }
        by_pid = {p.pid: p for p in self._instances()} if self._instances is not None else {}
        instance_memory = GaugeMetricFamily(
            "dhow_instance_gpu_memory_bytes",
            "GPU memory used by a model version's process instance",
            labels=[*_INSTANCE_LABELS, "gpu"],
        )
        try:
            count = nvml.nvmlDeviceGetCount()
        except nvml.NVMLError as exc:
            log.warning("NVML cannot count the GPUs: %s", exc)
            return
        for index in range(count):
            self._read_gpu(nvml, index, families, by_pid, instance_memory)
        yield from families.values()
        if by_pid:
            yield instance_memory

    @staticmethod
    def _read_gpu(
        nvml: Any,
        index: int,
        families: dict[str, GaugeMetricFamily],
        by_pid: dict[int, InstanceProcess],
        instance_memory: GaugeMetricFamily,
    ) -> None:
        try:
            handle = nvml.nvmlDeviceGetHandleByIndex(index)
            labels = [str(index), _text(nvml.nvmlDeviceGetUUID(handle)), _text(nvml.nvmlDeviceGetName(handle))]
        except nvml.NVMLError as exc:
            log.warning("NVML cannot read GPU %d: %s", index, exc)
            return
        readings: dict[str, Callable[[], float]] = {
            "utilization": lambda: nvml.nvmlDeviceGetUtilizationRates(handle).gpu / 100.0,
            "used": lambda: float(nvml.nvmlDeviceGetMemoryInfo(handle).used),
            "total": lambda: float(nvml.nvmlDeviceGetMemoryInfo(handle).total),
            "power": lambda: nvml.nvmlDeviceGetPowerUsage(handle) / 1000.0,
            "temperature": lambda: float(nvml.nvmlDeviceGetTemperature(handle, nvml.NVML_TEMPERATURE_GPU)),
        }
        for name, read in readings.items():
            try:
                families[name].add_metric(labels, read())
            except nvml.NVMLError:  # not supported on this board: left out
                continue
        if not by_pid:
            return
        try:
            processes = nvml.nvmlDeviceGetComputeRunningProcesses(handle)
        except nvml.NVMLError:
            return
        for process in processes:
            owner = by_pid.get(process.pid)
            if owner is not None and process.usedGpuMemory is not None:
                instance_memory.add_metric(
                    [owner.model, owner.version, str(owner.instance), str(index)], float(process.usedGpuMemory)
                )


def _text(value: str | bytes) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else value


class InstanceCollector(Collector):
    """CPU time and resident memory of each process instance, read from ``/proc/<pid>/stat``."""

    def __init__(self, instances: Instances) -> None:
        self._instances = instances
        self._ticks = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
        self._page = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096

    def collect(self) -> Iterator[Metric]:
        cpu = CounterMetricFamily(
            "dhow_instance_cpu_seconds", "CPU time (user and system) of a process instance", labels=_INSTANCE_LABELS
        )
        memory = GaugeMetricFamily(
            "dhow_instance_resident_memory_bytes", "Resident memory of a process instance", labels=_INSTANCE_LABELS
        )
        for process in self._instances():
            try:
                with open(f"/proc/{process.pid}/stat", "rb") as stat:
                    # after the command name (in parentheses, which may hold spaces): state is field 3
                    fields = stat.read().rpartition(b")")[2].split()
            except OSError:  # it has just exited (and is being restarted): nothing to read this time
                continue
            labels = [process.model, process.version, str(process.instance)]
            cpu.add_metric(labels, (int(fields[11]) + int(fields[12])) / self._ticks)
            memory.add_metric(labels, float(int(fields[21]) * self._page))
        yield cpu
        yield memory


class HeapCollector(Collector):
    """This process's garbage collector, as ``settle_heap`` leaves it once the server is ready: how many objects
    start-up built are frozen (none before; the count ``settle_heap`` kept, never ``gc.get_freeze_count``, which
    walks them all), and the generations' thresholds (the youngest raised then)."""

    def collect(self) -> Iterator[Metric]:
        frozen = GaugeMetricFamily(
            "dhow_gc_frozen_objects", "Objects out of the garbage collector's reach (frozen once start-up is done)"
        )
        frozen.add_metric([], float(frozen_objects()))
        threshold = GaugeMetricFamily(
            "dhow_gc_threshold", "The garbage collector's threshold of a generation", labels=["generation"]
        )
        for generation, value in enumerate(gc.get_threshold()):
            threshold.add_metric([str(generation)], float(value))
        yield frozen
        yield threshold
