"""`GET /metrics` in Prometheus' text format: queue depth, jobs by result, seconds per job, it/s, model loads,
responses by status. Plain counters kept in one object; no client library (runtime dependencies are fixed)."""
from __future__ import annotations

import collections
import math
import threading

SECONDS_BUCKETS = (0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, math.inf)


def _metric(name: str, kind: str, text: str, samples: dict) -> list[str]:
    """One metric's lines; `samples`: {what follows the name (labels, a histogram's suffix): value}."""
    return [f"# HELP sd15_{name} {text}", f"# TYPE sd15_{name} {kind}",
            *(f"sd15_{name}{key} {value}" for key, value in samples.items())]


class Metrics:
    def __init__(self):
        self.lock = threading.Lock()
        self.jobs = collections.Counter()  # (kind, state) -> count
        self.job_seconds = collections.Counter()  # bucket upper bound -> jobs that took at most that long
        self.job_seconds_sum = 0.0
        self.job_seconds_count = 0
        self.steps_total = 0
        self.sampling_seconds = 0.0
        self.last_its = 0.0
        self.model_loads = collections.Counter()  # result ("ok", "failed") -> count
        self.responses = collections.Counter()  # status -> count
        self.rejected = collections.Counter()  # reason -> count (queue_full, host, connections)

    def job_finished(self, kind: str, state: str, seconds: float | None, steps: int = 0,
                     sampling_seconds: float = 0.0) -> None:
        with self.lock:
            self.jobs[(kind, state)] += 1
            if seconds is not None:
                self.job_seconds_sum += seconds
                self.job_seconds_count += 1
                self.job_seconds.update(b for b in SECONDS_BUCKETS if seconds <= b)
            if steps and sampling_seconds > 0:
                self.steps_total += steps
                self.sampling_seconds += sampling_seconds
                self.last_its = steps / sampling_seconds

    def render(self, queue_depth: int, running: int, queue_max: int) -> str:
        with self.lock:
            buckets = {f'_bucket{{le="{"+Inf" if b == math.inf else repr(b)}"}}': self.job_seconds[b]
                       for b in SECONDS_BUCKETS}
            lines = [
                *_metric("queue_depth", "gauge", "Jobs waiting in the queue.", {"": queue_depth}),
                *_metric("queue_max_size", "gauge", "Largest number of waiting jobs (--queue-size).",
                         {"": queue_max}),
                *_metric("jobs_running", "gauge", "Jobs running now (0 or 1).", {"": running}),
                *_metric("jobs_total", "counter", "Finished jobs by kind and result.",
                         {f'{{kind="{k}",result="{s}"}}': n for (k, s), n in sorted(self.jobs.items())}),
                *_metric("job_seconds", "histogram", "Wall time of a job from start to finish.",
                         {**buckets, "_sum": f"{self.job_seconds_sum:.6f}",
                          "_count": self.job_seconds_count}),
                *_metric("sampling_steps_total", "counter", "Sampler steps run.", {"": self.steps_total}),
                *_metric("sampling_seconds_total", "counter", "Seconds spent sampling.",
                         {"": f"{self.sampling_seconds:.6f}"}),
                *_metric("iterations_per_second", "gauge", "Sampler steps per second of the last job.",
                         {"": f"{self.last_its:.6f}"}),
                *_metric("model_loads_total", "counter", "Checkpoint loads by result.",
                         {f'{{result="{r}"}}': n for r, n in sorted(self.model_loads.items())}),
                *_metric("http_responses_total", "counter", "HTTP responses by status.",
                         {f'{{status="{s}"}}': n for s, n in sorted(self.responses.items())}),
                *_metric("rejected_total", "counter",
                         "Requests or connections refused before any work, by reason.",
                         {f'{{reason="{r}"}}': n for r, n in sorted(self.rejected.items())}),
            ]
        return "\n".join(lines) + "\n"
