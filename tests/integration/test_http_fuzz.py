"""The front's OpenAPI document, fuzzed with schemathesis against a real shard: every route answers
what its document says (status codes, content types, bodies and stream events), rejects what the
document forbids, and never answers a 5xx or hangs. Small limits keep every generation short.

Not checked: that every schema-valid request is accepted. Some depend on the configuration (a prompt
plus max_new_tokens over max_total_tokens) or on the shard (structured output it does not support)."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile

import pytest

from fronts import start_front, stop_front
from shards import start_launcher, stop

FUZZ_LIMITS = (
    "--max-input-length",
    "96",
    "--max-total-tokens",
    "128",
    "--max-batch-prefill-tokens",
    "512",
    "--max-concurrent-requests",
    "8",
)


@pytest.fixture(scope="module")
def fuzzed_front(demo_dir):
    shard = start_launcher(os.path.join(demo_dir, "model"), os.path.join(demo_dir, "adapters"))
    front = start_front(shard, demo_dir, FUZZ_LIMITS)
    yield front
    assert stop_front(front) == 0, front.log()[-3000:]
    assert stop(shard) == 0


def test_every_route_keeps_to_its_document(fuzzed_front):
    with tempfile.TemporaryDirectory() as scratch:
        run = subprocess.run(
            [
                sys.executable,
                "-m",
                "schemathesis.cli",
                "run",
                f"{fuzzed_front.url}/openapi.json",
                "--checks",
                "all",
                "--exclude-checks",
                "positive_data_acceptance",
                "--max-examples",
                "10",
                "--seed",
                "1",
                "--workers",
                "1",
                "--request-timeout",
                "60",
                "--generation-database",
                "none",
                "--no-color",
                "--report-dir",
                scratch,
            ],
            cwd=scratch,
            capture_output=True,
            text=True,
            timeout=540,
        )
    summary = run.stdout[-6000:]
    assert run.returncode == 0, summary
    assert "10/10" in summary and " passed" in summary, summary  # every operation was exercised
    assert "Schema validation mismatch" not in summary, summary  # the document matches what is accepted
