"""`GET /metrics` in Prometheus' text format: queue depth, jobs by result, seconds per job, it/s, model loads,
responses by status. Plain counters kept in one object; no client library (runtime dependencies are fixed)."""
from __future__ import annotations

import collections
import threading

SECONDS_BUCKETS = (0.5, 1, 2, 5, 10, 30, 60, 120, 300, 600, float("inf"))


class Metrics:
    def __init__(self):
        self.lock = threading.Lock()
        self.jobs = collections.Counter()  # (kind, state) -> count
        self.job_seconds = collections.Counter()  # bucket upper bound -> count (cumulative at render)
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
                for b in SECONDS_BUCKETS:
                    if seconds <= b:
                        self.job_seconds[b] += 1
                        break
            if steps and sampling_seconds > 0:
                self.steps_total += steps
                self.sampling_seconds += sampling_seconds
                self.last_its = steps / sampling_seconds

    def render(self, queue_depth: int, running: int, queue_max: int) -> str:
        with self.lock:
            lines = [
                "# HELP sd15_queue_depth Jobs waiting in the queue.", "# TYPE sd15_queue_depth gauge",
                f"sd15_queue_depth {queue_depth}",
                "# HELP sd15_queue_max_size Largest number of waiting jobs (--queue-size).",
                "# TYPE sd15_queue_max_size gauge", f"sd15_queue_max_size {queue_max}",
                "# HELP sd15_jobs_running Jobs running now (0 or 1).", "# TYPE sd15_jobs_running gauge",
                f"sd15_jobs_running {running}",
                "# HELP sd15_jobs_total Finished jobs by kind and result.", "# TYPE sd15_jobs_total counter",
            ]
            lines += [f'sd15_jobs_total{{kind="{k}",result="{s}"}} {n}' for (k, s), n in sorted(self.jobs.items())]
            lines += ["# HELP sd15_job_seconds Wall time of a job from start to finish.",
                      "# TYPE sd15_job_seconds histogram"]
            cumulative = 0
            for b in SECONDS_BUCKETS:
                cumulative += self.job_seconds[b]
                le = "+Inf" if b == float("inf") else repr(float(b))
                lines.append(f'sd15_job_seconds_bucket{{le="{le}"}} {cumulative}')
            lines += [f"sd15_job_seconds_sum {self.job_seconds_sum:.6f}", f"sd15_job_seconds_count {self.job_seconds_count}",
                      "# HELP sd15_sampling_steps_total Sampler steps run.", "# TYPE sd15_sampling_steps_total counter",
                      f"sd15_sampling_steps_total {self.steps_total}",
                      "# HELP sd15_sampling_seconds_total Seconds spent sampling.",
                      "# TYPE sd15_sampling_seconds_total counter", f"sd15_sampling_seconds_total {self.sampling_seconds:.6f}",
                      "# HELP sd15_iterations_per_second Sampler steps per second of the last job.",
                      "# TYPE sd15_iterations_per_second gauge", f"sd15_iterations_per_second {self.last_its:.6f}",
                      "# HELP sd15_model_loads_total Checkpoint loads by result.", "# TYPE sd15_model_loads_total counter"]
            lines += [f'sd15_model_loads_total{{result="{r}"}} {n}' for r, n in sorted(self.model_loads.items())]
            lines += ["# HELP sd15_http_responses_total HTTP responses by status.",
                      "# TYPE sd15_http_responses_total counter"]
            lines += [f'sd15_http_responses_total{{status="{s}"}} {n}' for s, n in sorted(self.responses.items())]
            lines += ["# HELP sd15_rejected_total Requests or connections refused before any work, by reason.",
                      "# TYPE sd15_rejected_total counter"]
            lines += [f'sd15_rejected_total{{reason="{r}"}} {n}' for r, n in sorted(self.rejected.items())]
        return "\n".join(lines) + "\n"
