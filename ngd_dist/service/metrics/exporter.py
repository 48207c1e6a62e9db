"""A per-rank Prometheus exporter hosted by the training worker.

:class:`MetricsExporter` keeps its metrics in a private :class:`~prometheus_client.CollectorRegistry`
and serves them over HTTP from a daemon thread on ``host:(port + local_rank)``:

* ``GET /metrics``: the Prometheus text exposition of every ``ngd_*`` series (each carries a
  ``rank`` label; other labels take values from small fixed sets only).
* ``GET /healthz``: ``200 ok step N`` while the step counter advanced within ``stall_seconds``
  (or no step was seen yet but the exporter started less than ``stall_seconds`` ago), else
  ``503 stalled ...``.

``port=0`` disables the exporter: no server is started and every call is a no-op. A ``host`` that
is not a loopback address logs a warning at start-up: the endpoints are then reachable from other
machines.
"""

from __future__ import annotations

import ipaddress
import logging
import math
import statistics
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Protocol

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

log = logging.getLogger(__name__)

PHASES: tuple[str, ...] = (
    "forward",
    "backward",
    "factor_computation",
    "factor_communication",
    "decomposition",
    "preconditioning",
    "gradient_communication",
    "optimizer",
    "evaluation",
)
"""The phase label values of ``ngd_phase_seconds`` (other phase names are dropped)."""

COMM_KINDS: tuple[str, ...] = ("factors", "decompositions", "gradients", "preconditioned", "meta", "other")
"""The kind label values of ``ngd_communication_bytes_total`` (unknown kinds count as "other")."""

NONFINITE_LOSS = "nonfinite_loss"
"""A step skipped because the loss of at least one rank was NaN or infinite."""
NONFINITE_GRADIENT = "nonfinite_gradient"
"""A step skipped because the (averaged) gradients held NaN or inf (a GradScaler overflow too)."""
SKIP_REASONS: tuple[str, ...] = (NONFINITE_LOSS, NONFINITE_GRADIENT)
"""The reason label values of ``ngd_skipped_steps_total``: why every rank skipped a step."""

RATE_WINDOW = 10
"""Steps over which ``ngd_samples_per_second`` and ``ngd_tokens_per_second`` are computed."""

LISTEN_BACKLOG = 1024
"""Connections the kernel queues for the metrics server until it accepts them (socketserver's default,
5, dropped scrapes under a burst: 110 of 400 timed out). The kernel caps it at ``net.core.somaxconn``."""

MAX_CONNECTIONS = 64
"""Connections the metrics server serves at once, one thread each; more wait in the listen queue."""

CONNECTION_TIMEOUT_S = 5.0
"""Seconds a metrics connection may stall on one read or write before it is dropped."""

_STEP_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
_PHASE_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 60.0)

# stats field of KFACStats -> counter name suffix (all exported as deltas).
_STAT_COUNTERS: tuple[tuple[str, str, str], ...] = (
    ("decompositions", "decompositions", "Factor decompositions computed on this rank."),
    (
        "decomposition_failures",
        "decomposition_failures",
        "Decompositions that failed in float64 too (the previous one was kept).",
    ),
    (
        "decomposition_retries",
        "decomposition_retries",
        "Decompositions that failed in the configured dtype and were retried in float64.",
    ),
    ("nonfinite_rejected", "nonfinite_rejected", "Factor statistics rejected for holding NaN or inf."),
    ("factor_refreshes", "factor_refreshes", "Steps whose statistics were folded into the running factors."),
)


class MetricsPortError(RuntimeError):
    """The metrics port is already taken."""


class PreconditionerLike(Protocol):
    """What :meth:`MetricsExporter.observe_preconditioner` reads (a ``KFACPreconditioner`` fits)."""

    stats: Any

    @property
    def decomposed(self) -> Mapping[Any, int]:
        """How many times this rank decomposed each factor."""
        ...

    @property
    def comm_bytes(self) -> Mapping[str, int]:
        """Payload bytes handed to collectives, by kind, since construction."""
        ...

    def intervals(self) -> Mapping[Any, int]:
        """The current refresh interval of every factor, in steps."""
        ...


class _Server(ThreadingHTTPServer):
    """The exporter's HTTP server: a daemon thread per connection, at most ``MAX_CONNECTIONS`` at once.

    A scrape holds its thread only while its own client talks, so a slow client delays no other
    one (a single-threaded server would queue everyone behind it); the cap keeps a flood of
    connections from creating threads without bound inside the training process: the accept loop
    waits for a free slot and further connections wait in the kernel's listen queue
    (``LISTEN_BACKLOG``). Answering ``/metrics`` takes a few milliseconds, so ``MAX_CONNECTIONS``
    threads keep up with hundreds of concurrent scrapers; a stalled client frees its slot after
    ``CONNECTION_TIMEOUT_S``.
    """

    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = LISTEN_BACKLOG
    exporter: MetricsExporter

    def __init__(self, address: tuple[str, int], handler: type[BaseHTTPRequestHandler]) -> None:
        """Bind and listen on ``address``; connections are answered by ``handler``."""
        self._busy = 0
        self._closing = False
        self._changed = threading.Condition()
        super().__init__(address, handler)

    def process_request(self, request: Any, client_address: Any) -> None:
        """Start the connection's thread once a slot is free (drop the connection when closing)."""
        with self._changed:
            self._changed.wait_for(lambda: self._busy < MAX_CONNECTIONS or self._closing)
            if self._closing:
                self.shutdown_request(request)
                return
            self._busy += 1
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._release()
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        """Serve one connection in its own thread, then free its slot."""
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._release()

    def shutdown(self) -> None:
        """Stop the accept loop, also while it waits for a free slot."""
        with self._changed:
            self._closing = True
            self._changed.notify_all()
        super().shutdown()

    def server_close(self) -> None:
        """Close the listening socket, then wait (at most ``CONNECTION_TIMEOUT_S``) for open connections."""
        super().server_close()
        with self._changed:
            self._changed.wait_for(lambda: self._busy == 0, timeout=CONNECTION_TIMEOUT_S)

    def _release(self) -> None:
        with self._changed:
            self._busy -= 1
            self._changed.notify_all()


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    timeout = CONNECTION_TIMEOUT_S

    def do_GET(self) -> None:
        """Answer ``/metrics`` and ``/healthz``; anything else is 404."""
        path = self.path.split("?", 1)[0]
        exporter = self.server.exporter
        if path == "/metrics":
            self._reply(200, generate_latest(exporter.registry), CONTENT_TYPE_LATEST)
        elif path == "/healthz":
            ok, text = exporter.health()
            self._reply(200 if ok else 503, text.encode() + b"\n", "text/plain; charset=utf-8")
        else:
            self._reply(404, b"not found; try /metrics or /healthz\n", "text/plain; charset=utf-8")

    def _reply(self, code: int, body: bytes, content_type: str) -> None:
        self.send_response(code)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        """Keep scrapes out of the training log."""


class MetricsExporter:
    """Prometheus metrics of one training rank, served on ``host:(port + local_rank)``.

    Metric names follow the Prometheus conventions: prefix ``ngd_``, base units, ``_total``
    counters, ``_seconds`` durations, and a ``rank`` label on every series. Counters read from
    the preconditioner are exported as deltas since the previous call, so they stay monotonic.
    """

    def __init__(
        self,
        *,
        rank: int,
        world_size: int,
        host: str = "127.0.0.1",
        port: int = 9400,
        local_rank: int = 0,
        stall_seconds: float = 120.0,
        registry: CollectorRegistry | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """Create the metrics and, unless ``port`` is 0, start serving them.

        ``clock`` (monotonic seconds) times stalls for ``/healthz`` and the age of the last
        checkpoint; a test passes one it advances by hand instead of sleeping.

        Raises:
            MetricsPortError: ``host:(port + local_rank)`` is already taken.
        """
        self.rank = rank
        self.world_size = world_size
        self.host = host
        self.enabled = port != 0
        self.port = port + local_rank if self.enabled else 0
        self.stall_seconds = stall_seconds
        self.registry = registry if registry is not None else CollectorRegistry(auto_describe=True)
        self._clock = clock
        self._lock = threading.Lock()
        self._started = clock()
        self._last_step: int | None = None
        self._last_advance = self._started
        self._checkpoint_at = self._started
        self._window: deque[tuple[float, int, int]] = deque(maxlen=RATE_WINDOW)
        self._job_window: deque[tuple[float, int, int]] = deque(maxlen=RATE_WINDOW)
        self._seen: dict[str, float] = {}
        self._warned_phases: set[str] = set()
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        if not self.enabled:
            return
        self._make_metrics()
        self._serve()

    # -- public --------------------------------------------------------------------------------

    @property
    def url(self) -> str:
        """Base URL of the server (``""`` when disabled)."""
        if not self.enabled:
            return ""
        return f"http://{self.host}:{self.port}"

    def observe_step(
        self,
        *,
        step: int,
        samples: int,
        tokens: int = 0,
        seconds: float,
        loss: float | None = None,
        grad_norm: float | None = None,
        phases: Mapping[str, float] | None = None,
    ) -> None:
        """Record one optimizer step.

        Args:
            step: the step counter after this step (used by ``/healthz``).
            samples: samples processed by this rank in this step.
            tokens: tokens processed by this rank in this step (0 when not a token model).
            seconds: wall time of the step.
            loss: the step's loss, if known.
            grad_norm: the gradient norm, if known.
            phases: seconds spent in this step per phase name (see :data:`PHASES`).
        """
        if not self.enabled:
            return
        now = self._clock()
        with self._lock:
            if self._last_step is None or step != self._last_step:
                self._last_advance = now
            self._last_step = step
            self._window.append((max(seconds, 0.0), samples, tokens))
            elapsed = sum(s for s, _, _ in self._window)
            n_samples = sum(n for _, n, _ in self._window)
            n_tokens = sum(t for _, _, t in self._window)
        self._steps.inc()
        self._samples.inc(max(samples, 0))
        self._tokens.inc(max(tokens, 0))
        if elapsed > 0:
            self._samples_rate.set(n_samples / elapsed)
            self._tokens_rate.set(n_tokens / elapsed)
        self._step_seconds.observe(max(seconds, 0.0))
        self._last_step_ts.set(time.time())
        if loss is not None:
            self._loss.set(float(loss))
        if grad_norm is not None:
            self._grad_norm.set(float(grad_norm))
        for name, value in (phases or {}).items():
            child = self._phase_children.get(name)
            if child is None:
                if name not in self._warned_phases:
                    self._warned_phases.add(name)
                    log.warning("metrics: unknown phase %r dropped (known: %s)", name, ", ".join(PHASES))
                continue
            child.observe(max(float(value), 0.0))

    def observe_skipped_step(self, *, reason: str, loss: float | None = None) -> None:
        """Record a step every rank skipped (``ngd_skipped_steps_total{reason}``), and its loss, if known.

        The loss gauge shows it (NaN or inf, so the NgdNonFiniteLoss alert sees it); the step
        counter and ``/healthz`` do not advance. ``reason`` is one of :data:`SKIP_REASONS`.
        """
        if not self.enabled:
            return
        if reason not in self._skipped:
            raise ValueError(f"reason: got {reason!r}; expected one of {', '.join(SKIP_REASONS)}")
        self._skipped[reason].inc()
        if loss is not None:
            self._loss.set(float(loss))

    def observe_job(self, *, samples: int, tokens: int = 0, seconds: float) -> None:
        """Record one step's job-wide totals (exported by rank 0 only; a no-op elsewhere).

        Args:
            samples: samples processed in this step by all ranks together.
            tokens: tokens processed in this step by all ranks together (0 when not a token model).
            seconds: wall time of the step on this rank.
        """
        if not self.enabled or self.rank != 0:
            return
        with self._lock:
            self._job_window.append((max(seconds, 0.0), samples, tokens))
            elapsed = sum(s for s, _, _ in self._job_window)
            n_samples = sum(n for _, n, _ in self._job_window)
            n_tokens = sum(t for _, _, t in self._job_window)
        if elapsed > 0:
            self._job_samples_rate.set(n_samples / elapsed)
            self._job_tokens_rate.set(n_tokens / elapsed)

    def observe_quality(self, *, gamma: float, seconds: float) -> None:
        """Record the update-quality indicator γ of a probe and the probe's wall time.

        The ``ngd_quality_*`` series appear at the first call (they are absent while the probe is off).
        """
        if not self.enabled:
            return
        self._quality_gamma.labels(rank=str(self.rank)).set(float(gamma))
        self._quality_seconds.labels(rank=str(self.rank)).set(max(float(seconds), 0.0))

    def observe_eval(self, evaluation: Any) -> None:
        """Export an evaluation (``ngd_eval_loss``, and ``ngd_eval_accuracy`` or ``ngd_eval_perplexity``)."""
        if not self.enabled:
            return
        self._eval["loss"].set(float(evaluation.loss))
        if evaluation.accuracy is not None:
            self._eval["accuracy"].set(float(evaluation.accuracy))
        if evaluation.perplexity is not None:
            self._eval["perplexity"].set(float(evaluation.perplexity))

    def observe_preconditioner(self, precond: PreconditionerLike) -> None:
        """Export the preconditioner's counters, last values, bytes and refresh intervals.

        Reads ``precond.stats`` (a ``KFACStats``), ``precond.comm_bytes``, ``precond.intervals()``
        and ``precond.decomposed``. Counters are advanced by the increase since the previous call;
        a value that went down (a new preconditioner) counts from zero again.
        """
        if not self.enabled:
            return
        stats = precond.stats
        for field, _, _ in _STAT_COUNTERS:
            self._add(f"stats.{field}", float(getattr(stats, field, 0)), self._stat_counters[field])
        by_kind: dict[str, float] = dict.fromkeys(COMM_KINDS, 0.0)
        for kind, count in precond.comm_bytes.items():
            by_kind[kind if kind in by_kind else "other"] += float(count)
        for kind, total in by_kind.items():
            self._add(f"bytes.{kind}", total, self._comm_children[kind])
        self._damping.set(float(stats.damping))
        self._kl_scale.set(float(stats.kl_scale))
        intervals = [int(v) for v in precond.intervals().values()]
        self._factors.set(len(intervals))
        if intervals:
            self._interval["min"].set(min(intervals))
            self._interval["median"].set(statistics.median(intervals))
            self._interval["max"].set(max(intervals))
        self._decomposed_factors.set(sum(1 for v in precond.decomposed.values() if v > 0))
        coverage = getattr(precond, "coverage", None)
        if isinstance(coverage, (int, float)):
            self._coverage.set(float(coverage))
        memory = getattr(precond, "memory", None)
        for kind in ("factors", "decompositions"):
            held = getattr(memory, kind, None)
            if isinstance(held, int):
                self._factor_memory[kind].set(held)

    def mark_checkpoint(self) -> None:
        """Record that a checkpoint was just written (resets ``ngd_seconds_since_checkpoint``)."""
        with self._lock:
            self._checkpoint_at = self._clock()

    def health(self) -> tuple[bool, str]:
        """Whether the rank is healthy, and the ``/healthz`` body text."""
        now = self._clock()
        with self._lock:
            step, since = self._last_step, now - self._last_advance
        if since < self.stall_seconds:
            return True, f"ok step {step if step is not None else 0}"
        what = f"step {step}" if step is not None else "start (no step yet)"
        return False, f"stalled since {since:.1f} seconds at {what} (stall_seconds={self.stall_seconds:g})"

    def close(self) -> None:
        """Stop the server and free the port (idempotent)."""
        server, self._server = self._server, None
        if server is None:
            return
        server.shutdown()
        server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def __enter__(self) -> MetricsExporter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- internals -----------------------------------------------------------------------------

    def _add(self, key: str, total: float, counter: Any) -> None:
        """Advance ``counter`` by the increase of ``total`` since the last call under ``key``."""
        previous = self._seen.get(key, 0.0)
        delta = total - previous if total >= previous else total
        self._seen[key] = total
        if delta > 0 and math.isfinite(delta):
            counter.inc(delta)

    def _make_metrics(self) -> None:
        reg, rank = self.registry, str(self.rank)

        def counter(name: str, doc: str) -> Any:
            return Counter(name, doc, ["rank"], registry=reg).labels(rank=rank)

        def gauge(name: str, doc: str) -> Any:
            return Gauge(name, doc, ["rank"], registry=reg).labels(rank=rank)

        self._steps = counter("ngd_steps", "Optimizer steps taken by this rank.")
        self._samples = counter("ngd_samples", "Training samples processed by this rank.")
        self._tokens = counter("ngd_tokens", "Training tokens processed by this rank.")
        self._samples_rate = gauge(
            "ngd_samples_per_second", f"Samples per second over the last {RATE_WINDOW} steps."
        )
        self._tokens_rate = gauge(
            "ngd_tokens_per_second", f"Tokens per second over the last {RATE_WINDOW} steps."
        )
        self._step_seconds = Histogram(
            "ngd_step_seconds",
            "Wall time of one optimizer step.",
            ["rank"],
            registry=reg,
            buckets=_STEP_BUCKETS,
        ).labels(rank=rank)
        phase = Histogram(
            "ngd_phase_seconds",
            "Time of one step spent in each phase.",
            ["rank", "phase"],
            registry=reg,
            buckets=_PHASE_BUCKETS,
        )
        self._phase_children = {name: phase.labels(rank=rank, phase=name) for name in PHASES}
        self._loss = gauge("ngd_loss", "Training loss of the last step.")
        self._grad_norm = gauge("ngd_grad_norm", "Gradient norm of the last step.")
        comm = Counter(
            "ngd_communication_bytes",
            "Payload bytes handed to collectives, by kind.",
            ["rank", "kind"],
            registry=reg,
        )
        self._comm_children = {kind: comm.labels(rank=rank, kind=kind) for kind in COMM_KINDS}
        self._stat_counters = {field: counter(f"ngd_{suffix}", doc) for field, suffix, doc in _STAT_COUNTERS}
        skipped = Counter(
            "ngd_skipped_steps",
            "Steps skipped on every rank (no optimizer, preconditioner or schedule step) because a rank's "
            "loss or the gradients were not finite, by reason.",
            ["rank", "reason"],
            registry=reg,
        )
        self._skipped = {reason: skipped.labels(rank=rank, reason=reason) for reason in SKIP_REASONS}
        self._damping = gauge("ngd_damping", "Damping used at the last preconditioner step.")
        self._kl_scale = gauge(
            "ngd_kl_clip_scale", "KL-clip scale applied at the last step (1 when it did not bind)."
        )
        self._eval = {
            "loss": gauge("ngd_eval_loss", "Mean loss on the held-out data at the last evaluation."),
            "accuracy": gauge(
                "ngd_eval_accuracy", "Accuracy on the held-out data at the last evaluation (classification)."
            ),
            "perplexity": gauge(
                "ngd_eval_perplexity", "Perplexity on the held-out data at the last evaluation (an LM)."
            ),
        }
        self._coverage = gauge(
            "ngd_preconditioned_fraction",
            "Fraction of the model's trainable parameters the preconditioner handles (the rest follow "
            "the base optimizer's plain gradients).",
        )
        memory = Gauge(
            "ngd_factor_memory_bytes",
            "Bytes of K-FAC running factors and of decompositions held on this rank.",
            ["rank", "kind"],
            registry=reg,
        )
        kinds = ("factors", "decompositions")
        self._factor_memory = {kind: memory.labels(rank=rank, kind=kind) for kind in kinds}
        interval = Gauge(
            "ngd_refresh_interval_steps",
            "Refresh interval of the factors in steps: min, median and max over factors.",
            ["rank", "stat"],
            registry=reg,
        )
        self._interval = {stat: interval.labels(rank=rank, stat=stat) for stat in ("min", "median", "max")}
        self._factors = gauge("ngd_factors", "Kronecker factors tracked by the preconditioner.")
        self._decomposed_factors = gauge(
            "ngd_decomposed_factors", "Factors this rank has decomposed at least once."
        )
        gauge(
            "ngd_seconds_since_checkpoint", "Seconds since the last checkpoint (or since start)."
        ).set_function(self._seconds_since_checkpoint)
        self._last_step_ts = gauge("ngd_last_step_timestamp_seconds", "Unix time of the last observed step.")
        gauge("ngd_world_size", "Ranks in the job.").set(self.world_size)
        if self.rank == 0:
            self._job_samples_rate = gauge(
                "ngd_job_samples_per_second",
                f"Samples per second of the whole job (all ranks) over the last {RATE_WINDOW} steps.",
            )
            self._job_tokens_rate = gauge(
                "ngd_job_tokens_per_second",
                f"Tokens per second of the whole job (all ranks) over the last {RATE_WINDOW} steps.",
            )
        self._quality_gamma = Gauge(
            "ngd_quality_gamma",
            "Update-quality indicator gamma (iEF paper, Eq. 15) of the last probed step on this rank's probe "
            "batch: (d'Fd)^(1/2)/|d'grad L| for the applied update d; lower is better.",
            ["rank"],
            registry=reg,
        )
        self._quality_seconds = Gauge(
            "ngd_quality_seconds",
            "Wall time of the last quality probe (not counted in step time).",
            ["rank"],
            registry=reg,
        )
        gauge("ngd_start_timestamp_seconds", "Unix time the exporter started.").set(time.time())

    def _seconds_since_checkpoint(self) -> float:
        with self._lock:
            return self._clock() - self._checkpoint_at

    def _serve(self) -> None:
        try:
            server = _Server((self.host, self.port), _Handler)
        except OSError as err:
            raise MetricsPortError(
                f"metrics port {self.host}:{self.port} (rank {self.rank}) is not available: {err}; "
                "choose another base port with metrics.port in the job (each rank uses port + local_rank), "
                "or set metrics.port to 0 to disable the exporter"
            ) from err
        server.exporter = self
        self._server = server
        if self.port == 0 or server.server_address[1] != self.port:
            self.port = int(server.server_address[1])
        bound = str(server.server_address[0])
        if not ipaddress.ip_address(bound).is_loopback:
            log.warning(
                "metrics: serving /metrics and /healthz on %s:%d (metrics.host %s is not a loopback "
                "address): they are reachable from other machines; set metrics.host to 127.0.0.1 to keep "
                "them local",
                bound, self.port, self.host,
            )  # fmt: skip
        self._thread = threading.Thread(
            target=server.serve_forever,
            name=f"ngd-metrics-{self.rank}",
            kwargs={"poll_interval": 0.1},
            daemon=True,
        )
        self._thread.start()
