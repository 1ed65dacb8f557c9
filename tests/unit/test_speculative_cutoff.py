"""Speculation stops above chunks.MAX_VERIFY_ROWS requests in a batch (large batches decode plainly, on the
decode CUDA graphs) and resumes once the batch is small again; the output is the one without drafts either way.
The cutoff is lowered to 2 here so a 3-request batch crosses it on the CPU."""

from __future__ import annotations

from typing import Any

from spec_helpers import engine, greedy_request, run
from worker.engine import chunks, step

COPY = "The capital of France is Paris, a city of light and old stone bridges. The capital of France is"


def test_no_drafts_verified_above_the_cutoff_and_again_below(demo, monkeypatch):
    model, tok = demo
    ids = tok.encode(COPY)

    def requests() -> list[Any]:  # request 1 ends first, leaving two: below the cutoff
        return [greedy_request(rid, ids, n) for rid, n in ((1, 4), (2, 14), (3, 14))]

    plain = run(engine(model, tok, 0), requests())
    monkeypatch.setattr(chunks, "MAX_VERIFY_ROWS", 2)
    steps: list[tuple[int, int]] = []  # (requests in the batch, drafts verified) per computed step
    pending: list[tuple[int, int]] = []  # (requests in the batch, drafts the requests hold) before each step
    compute = step.compute

    def spy(batch: Any, *args: Any, **kw: Any) -> step.Computed:
        pending.append((len(batch.requests), sum(len(r.drafts) for r in batch.requests)))
        c = compute(batch, *args, **kw)
        steps.append((len(batch.requests), sum(len(s.drafts) for s in c.plan.spans)))
        return c

    monkeypatch.setattr(step, "compute", spy)
    drafted = run(engine(model, tok, 4), requests())
    assert {rid: drafted.tokens(rid) for rid in (1, 2, 3)} == {rid: plain.tokens(rid) for rid in (1, 2, 3)}
    assert any(n == 3 for n, _ in steps) and all(d == 0 for n, d in steps if n > 2)
    assert all(d == 0 for n, d in pending if n > 2)  # no drafts are even proposed for a batch above the cutoff
    assert sum(d for n, d in steps if n <= 2) > 0  # the copy prompt's drafts are verified once the batch is small
