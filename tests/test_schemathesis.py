"""schemathesis (property-based requests generated from /openapi.json) against a live tiny-model server
with small limits, bounded to a few minutes: no response may be a 5xx or break the documented schema.

    python -m pytest -m schemathesis tests/test_schemathesis.py
"""
from __future__ import annotations

import os
import shutil
import subprocess

import pytest

from test_reliability_live import AUTH, LiveServer

pytestmark = pytest.mark.schemathesis
MAX_TIME = int(os.environ.get("SD15_SCHEMATHESIS_SECONDS", "150"))


def test_schemathesis_no_server_errors(tmp_path):
    exe = shutil.which("schemathesis") or pytest.skip("schemathesis is not installed")
    # limits that A1111's defaults (512×512, 50 steps) still fit, so generated requests reach generations;
    # every job is cut after 1 s (it then answers 200 with what it made), and the queue holds what a minute of
    # fuzzing submits: a full queue (503 QueueFull, documented) would count as a server error here
    server = LiveServer(tmp_path, "--max-pixels", "262144", "--max-steps", "50", "--max-batch-size", "2",
                        "--max-job-seconds", "1", "--queue-size", "64")
    try:
        cmd = [exe, "run", f"{server.url}/openapi.json", "--auth", f"{AUTH[0]}:{AUTH[1]}",
               "--checks", "not_a_server_error,response_schema_conformance,content_type_conformance",
               "--exclude-path", "/sd15/v1/events",  # an endless stream: read by tests/test_reliability_live.py
               "--phases", "examples,coverage,fuzzing,stateful", "--max-time", str(MAX_TIME), "--workers", "1",
               "--request-timeout", "120", "--max-failures", "20", "--suppress-health-check", "all"]
        run = subprocess.run(cmd, capture_output=True, text=True, timeout=MAX_TIME + 300, cwd=tmp_path)
        report = run.stdout[-12000:] + run.stderr[-3000:]
        assert run.returncode == 0, report
    finally:
        server.stop()
    log = server.log()
    assert " 500 " not in log and "Traceback" not in log, log[-5000:]
    assert ": done in" in log or ": interrupted (504" in log, "schemathesis reached no generation"
