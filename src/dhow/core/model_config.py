"""A model's configuration as every layer sees it, once ``model.yaml`` has been validated.

The manifest parser (``dhow.repository.manifest``) builds these; runtimes read them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

#: the tenant of a model, a key, a token or a record that names none
DEFAULT_TENANT = "default"

InstanceKind = Literal["thread", "process", "gpu"]

#: the ``runtime:`` values a manifest may name
RUNTIME_NAMES: tuple[str, ...] = ("onnx", "torch", "sklearn", "xgboost", "lightgbm", "python")


@dataclass(frozen=True, slots=True)
class TensorSpec:
    name: str
    datatype: str
    #: includes the batch dimension (as -1) when the model batches; -1 marks any variable dim
    shape: tuple[int, ...]
    optional: bool = False


@dataclass(frozen=True, slots=True)
class BatchingConfig:
    #: how long the first request of a batch may wait for others, in milliseconds
    max_queue_delay_ms: float = 0.0
    #: batch sizes to cut at as soon as they are reached
    preferred_batch_sizes: tuple[int, ...] = ()
    #: requests waiting beyond this are refused with 429 (0 = unlimited)
    max_queue_size: int = 0
    #: a request still queued after this is answered with a timeout, never computed (0 = none)
    timeout_ms: float = 0.0


@dataclass(frozen=True, slots=True)
class InstanceConfig:
    count: int = 1
    kind: InstanceKind = "thread"


@dataclass(frozen=True, slots=True)
class WarmupConfig:
    """Requests run on every instance of a version before it reports ready (the ``warmup:`` section).

    Without ``samples`` one request is generated from the declared inputs: ``value`` in every element, -1
    dimensions as 1.
    """

    #: how many times each warm-up request runs on each instance
    requests: int = 1
    #: the value of every element of a generated request
    value: float = 0.0
    #: explicit requests, each a mapping of input name to its data (nested lists, batch dimension included)
    samples: tuple[dict[str, Any], ...] = ()


@dataclass(frozen=True, slots=True)
class VersionPolicy:
    """Which versions on disk are served: the newest ``latest``, ``all``, or ``specific`` ones."""

    latest: int | None = 1
    all: bool = False
    specific: tuple[int, ...] = ()

    def select(self, available: list[int]) -> list[int]:
        ordered = sorted(available)
        if self.all:
            return ordered
        if self.specific:
            return [v for v in ordered if v in self.specific]
        return ordered[-(self.latest or 1) :]


@dataclass(frozen=True, slots=True)
class DriftConfig:
    """Live drift against the version's reference profile (``monitoring.drift``); on when a profile exists."""

    #: share of answered requests whose rows are copied into the version's window
    sample_rate: float = 0.1
    #: rows kept per version (the newest): what each score is computed on
    window: int = 2000
    #: seconds between two scores of a window
    interval_s: float = 30.0
    #: a window with fewer rows is not scored
    min_rows: int = 200
    #: a feature whose score (PSI for numbers, Jensen-Shannon distance for categories) is above this drifts
    threshold: float = 0.2


@dataclass(frozen=True, slots=True)
class FeedbackConfig:
    """Quality from delayed ground truth (``monitoring.feedback``): predictions kept until their label comes."""

    #: classification (accuracy, precision, recall) or regression (MAE, RMSE)
    task: Literal["classification", "regression"] = "classification"
    #: the output holding the prediction ("": the first); a classifier's scores are read as their argmax
    output: str = ""
    #: predictions awaiting their label, per server process (the oldest are dropped)
    pending: int = 100_000
    #: labelled predictions per version the figures are computed on (the newest)
    window: int = 10_000


@dataclass(frozen=True, slots=True)
class LatencyConfig:
    """Latency anomalies (``monitoring.latency``): each window's p50/p99 of queue and compute time against a
    robust baseline (median and MAD of the previous windows)."""

    enabled: bool = True
    window_s: float = 10.0
    #: windows the baseline is made of (the newest normal ones)
    baseline_windows: int = 30
    #: windows needed before anything is judged
    min_windows: int = 5
    #: how many MADs above the baseline's median a window must be to be anomalous
    threshold: float = 6.0
    #: and at least this many times the median (a tiny MAD must not make noise an anomaly)
    min_ratio: float = 1.5
    #: and at least this many milliseconds above it (microsecond queue times jitter by multiples of themselves)
    min_slack_ms: float = 5.0
    #: a window with fewer requests is not judged
    min_requests: int = 20


@dataclass(frozen=True, slots=True)
class MonitoringConfig:
    """The ``monitoring:`` section of model.yaml."""

    drift: DriftConfig = field(default_factory=DriftConfig)
    #: None: the model takes no feedback
    feedback: FeedbackConfig | None = None
    latency: LatencyConfig = field(default_factory=LatencyConfig)


@dataclass(frozen=True, slots=True)
class ModelConfig:
    name: str
    runtime: str
    #: None when the runtime reads them from the artifact (ONNX)
    inputs: tuple[TensorSpec, ...] | None = None
    outputs: tuple[TensorSpec, ...] | None = None
    max_batch_size: int = 0
    version_policy: VersionPolicy = field(default_factory=VersionPolicy)
    #: None: batching off; on by default when ``max_batch_size > 0``
    batching: BatchingConfig | None = None
    instances: InstanceConfig = field(default_factory=InstanceConfig)
    #: "cpu", "cuda" or "cuda:N"
    device: str = "cpu"
    #: weights precision on GPU runtimes: fp32, fp16 or bf16
    precision: str = "fp32"
    #: intra-op threads per instance; 0 lets dhow size them to the cores
    threads: int = 0
    owner: str = ""
    #: the tenant the model belongs to: keys and tokens of other tenants may not touch it
    tenant: str = DEFAULT_TENANT
    #: where the model's data belongs (e.g. ae, eu): the data region of requests that name none
    region: str = ""
    #: PII masking rules (the ``pii:`` section, checked by ``dhow.governance.masking.parse_masking``)
    pii: dict[str, Any] | None = None
    #: share of requests whose (masked) inputs and outputs are kept in the audit trail; 0 = none
    payload_sample_rate: float = 0.0
    #: whether the server's payload log (``--payload-log``) takes this model's requests; false: never logged
    payload_log: bool = True
    description: str = ""
    labels: dict[str, str] = field(default_factory=dict)
    #: runtime-specific settings (e.g. the class name of a Python model)
    parameters: dict[str, Any] = field(default_factory=dict)
    #: requests run before a version reports ready; None: no warm-up
    warmup: WarmupConfig | None = None
    #: drift, feedback and latency-anomaly settings
    monitoring: MonitoringConfig = field(default_factory=MonitoringConfig)
