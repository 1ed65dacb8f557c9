"""JSON-schema constrained decoding on the engine (demo model, CPU): every constrained output parses and
validates against its schema, greedy and seeded; a request's matcher survives Decode, FilterBatch and
concatenation; a bad schema is INVALID_ARGUMENT before any state changes; compiles run off the step thread
and the llguidance tokenizer is built once; unconstrained requests are untouched."""

from __future__ import annotations

import json
import os
import threading
from dataclasses import dataclass
from typing import Any

import jsonschema
import llguidance
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from helpers import PERSON, POINT
from worker.distributed import ParallelContext
from worker.engine import grammar as grammar_module
from worker.engine.batch import Batch
from worker.engine.engine import Engine, EngineConfig
from worker.engine.grammar import Grammars
from worker.engine.logits_processors import apply_token_bitmask
from worker.engine.stopping import FinishReason
from worker.errors import InvalidArgument
from worker.models.qwen import FlashQwenForCausalLM
from worker.pb import generate_pb2 as pb
from worker.tokenizer import QwenTokenizer

PROMPT = "Once upon a time"
EOS = FinishReason.FINISH_REASON_EOS_TOKEN


@dataclass
class Result:
    text: str
    ids: list[int]
    reason: FinishReason


def make_engine(model_dir: str) -> Engine:
    model = FlashQwenForCausalLM.from_pretrained(model_dir, dtype=torch.float32, progress=False)
    cfg = EngineConfig(max_total_tokens=16384, shard_block_fraction=0.5, cuda_graphs=False)
    return Engine(model, QwenTokenizer.from_dir(model_dir), ParallelContext(), cfg)


@pytest.fixture(scope="module")
def engine(demo_dir) -> Engine:
    return make_engine(os.path.join(demo_dir, "model"))


def request(rid: int, schema: Any = None, max_new: int = 200, ignore_eos: bool = False, **sampling: Any) -> pb.Request:
    params = pb.NextTokenChooserParameters(
        **{"temperature": 1.0, "top_p": 1.0, "typical_p": 1.0, "repetition_penalty": 1.0, **sampling}
    )
    if schema is not None:
        params.schema = schema if isinstance(schema, str) else json.dumps(schema)
    stop = pb.StoppingCriteriaParameters(max_new_tokens=max_new, ignore_eos_token=ignore_eos)
    return pb.Request(id=rid, inputs=PROMPT, parameters=params, stopping_parameters=stop)


def collect(generations: list, out: dict[int, Result], ids: dict[int, list[int]]) -> None:
    for g in generations:
        ids.setdefault(g.request_id, []).extend(g.next_tokens.ids)
        if g.generated_text is not None:
            out[g.request_id] = Result(g.generated_text.text, ids[g.request_id], g.generated_text.finish_reason)


def generate(engine: Engine, requests: list[pb.Request], batch_id: int = 1) -> dict[int, Result]:
    """Prefill the requests as one batch and decode it to the end."""
    out: dict[int, Result] = {}
    ids: dict[int, list[int]] = {}
    gens, batch = engine.prefill(pb.Batch(id=batch_id, requests=requests, size=len(requests)), None)
    collect(gens, out, ids)
    while batch is not None:
        gens, batch = engine.decode([batch.info()])
        collect(gens, out, ids)
    assert engine.batches == {}
    return out


def assert_valid(result: Result, schema: dict) -> None:
    assert result.reason == EOS, result
    jsonschema.validate(json.loads(result.text), schema)


# ------------------------------------------------------------------------------------------- schemas


@pytest.mark.parametrize(
    "schema,problem",
    [
        ("{not json", "not valid JSON"),
        ("[1, 2]", "must be a JSON object, got list"),
        ('{"type": "objekt"}', "objekt"),
        ('{"type": "array", "uniqueItems": true}', "uniqueItems"),
        ('{"type": "string", "pattern": "(("}', "unclosed group"),
        ('{"$ref": "#/$defs/missing"}', "missing"),
    ],
)
def test_a_bad_schema_is_named(schema, problem):
    with pytest.raises(InvalidArgument, match="JSON schema") as err:
        Grammars.check(schema)
    assert problem in str(err.value)


@pytest.mark.parametrize("prefetch", ["", "background", "inline"])
def test_masks_agree_with_the_matcher_token_by_token(demo_dir, monkeypatch, prefetch):
    """The bitmask rows the sampler applies allow exactly the tokens llguidance's own per-token bias allows, also
    when each step's masks were prefetched in the background after the previous token (a stale prefetched mask
    would disagree); prefetched steps compute nothing on the step thread."""
    tok = QwenTokenizer.from_dir(os.path.join(demo_dir, "model"))
    grammars = Grammars(tok)
    rows = [grammars.compile(Grammars.check(json.dumps(PERSON))), None, grammars.compile(Grammars.check("{}"))]
    text = tok.encode('{"name": "ab", "age": 7, "color": "red", "tags": []}')
    fills: list[tuple[str, int]] = []  # (thread, rows) of every mask computation
    real_fill = llguidance.torch.fill_next_token_bitmask_par

    def counting_fill(executor: Any, matchers: Any, bitmask: torch.Tensor) -> None:
        fills.append((threading.current_thread().name, len(matchers)))
        real_fill(executor, matchers, bitmask)

    monkeypatch.setattr(llguidance.torch, "fill_next_token_bitmask_par", counting_fill)
    prefetched = False
    for step, tid in enumerate(text):
        fills.clear()
        bitmask = grammars.masks(rows)
        here = [rows for thread, rows in fills if thread == threading.current_thread().name]
        assert here == ([] if prefetched else [2])  # prefetched: nothing computed while the step waits
        assert bitmask is not None
        scores = apply_token_bitmask(torch.zeros(3, tok.n_real_vocab), bitmask, tok.n_real_vocab)
        for row in (0, 2):
            matcher = rows[row].matcher
            bias = torch.frombuffer(bytearray(matcher.compute_logit_bias()), dtype=torch.uint8)[: tok.n_real_vocab]
            assert torch.equal(scores[row] == 0, bias > 0), step
        assert bool((scores[1] == 0).all())  # an unconstrained row allows everything
        stale = bool(prefetch) and step % 3 == 1  # every third step, a prefetch that the next token makes stale
        if stale:
            grammars.prefetch(rows, wait=prefetch == "inline")
        for row in (0, 2):
            done = rows[row].consume(tid)
            assert done == (step == len(text) - 1)
        prefetched = bool(prefetch) and not stale
        if prefetched:
            grammars.prefetch(rows, wait=prefetch == "inline")
    assert grammars.masks([None, None]) is None  # no constrained row: nothing to compute or apply


schema_leaves = st.one_of(
    st.integers(0, 6).map(lambda n: {"type": "string", "maxLength": n}),
    st.tuples(st.integers(-99, 99), st.integers(0, 300)).map(
        lambda t: {"type": "integer", "minimum": t[0], "maximum": t[0] + t[1]}
    ),
    st.lists(st.sampled_from(["red", "x y", "", "é", "7"]), min_size=1, max_size=3, unique=True).map(
        lambda xs: {"enum": xs}
    ),
    st.sampled_from([{"type": "boolean"}, {"type": "null"}, {"type": "string", "pattern": "^[a-c]{1,3}$"}]),
)
schema_arrays = st.tuples(schema_leaves, st.integers(0, 2), st.integers(0, 2)).map(
    lambda t: {"type": "array", "items": t[0], "minItems": min(t[1], t[2]), "maxItems": max(t[1], t[2])}
)


def objects(values: st.SearchStrategy, max_size: int) -> st.SearchStrategy:
    """Closed objects of up to `max_size` properties, some required."""
    props = st.dictionaries(st.sampled_from(["a", "id", "name", "tags", "kind"]), values, min_size=1, max_size=max_size)
    return props.flatmap(
        lambda p: st.lists(st.sampled_from(sorted(p)), unique=True).map(
            lambda req: {"type": "object", "properties": p, "required": req, "additionalProperties": False}
        )
    )


schemas = objects(st.one_of(schema_leaves, schema_arrays, objects(st.one_of(schema_leaves, schema_arrays), 2)), 3)
sampling: st.SearchStrategy[dict[str, Any]] = st.one_of(
    st.just({}),
    st.fixed_dictionaries(
        {
            "do_sample": st.just(True),
            "seed": st.integers(1, 2**32),
            "temperature": st.sampled_from([0.7, 1.0, 1.5]),
            "top_k": st.sampled_from([0, 5]),
        }
    ),
)


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(rows=st.lists(st.tuples(schemas, sampling), min_size=1, max_size=3))
def test_constrained_outputs_parse_and_validate(engine, rows):
    requests = [request(i, schema, 240, **params) for i, (schema, params) in enumerate(rows)]
    requests.append(request(len(rows), None, 8))  # an unconstrained neighbour in the same batch
    results = generate(engine, requests)
    for i, (schema, _) in enumerate(rows):
        assert_valid(results[i], schema)


def test_the_schema_ends_the_request_even_when_eos_is_ignored(engine):
    results = generate(engine, [request(1, POINT, 100, ignore_eos=True), request(2, PERSON, 200, ignore_eos=True)])
    assert_valid(results[1], POINT)
    assert_valid(results[2], PERSON)


def test_json_object_starts_an_object(engine):
    """json_object (any object): with this model the object may not close in a few tokens, but it is one."""
    result = generate(engine, [request(1, {"type": "object"}, 12)])[1]
    assert result.text.lstrip().startswith("{")
    if result.reason == EOS:
        assert isinstance(json.loads(result.text), dict)


# ------------------------------------------------------------------------------------- batch state


def test_matchers_survive_filter_and_concatenation(engine: Engine) -> None:
    """Constrained requests decoded in a batch that is concatenated with another, filtered (the router drops
    an unconstrained request) and decoded on give the same output as each alone."""
    sampled: dict[str, Any] = dict(do_sample=True, seed=11, temperature=1.2)
    alone = {
        1: generate(engine, [request(1, PERSON)])[1],
        3: generate(engine, [request(3, POINT, 100, **sampled)])[3],
        2: generate(engine, [request(2, None, 30, ignore_eos=True)])[2],
    }
    out: dict[int, Result] = {}
    ids: dict[int, list[int]] = {}
    gens, b1 = engine.prefill(pb.Batch(id=1, requests=[request(1, PERSON), request(2, None, 30, True)], size=2), None)
    collect(gens, out, ids)
    for _ in range(3):
        assert b1 is not None
        gens, b1 = engine.decode([b1.info()])
        collect(gens, out, ids)
    gens, b2 = engine.prefill(pb.Batch(id=2, requests=[request(3, POINT, 100, **sampled)], size=1), None)
    collect(gens, out, ids)
    assert b1 is not None and b2 is not None
    gens, batch = engine.decode([b2.info(), b1.info()])  # concatenated, the newer batch first
    collect(gens, out, ids)
    assert batch is not None and set(batch.request_ids) == {1, 2, 3}
    batch = engine.filter(batch.id, [r for r in batch.request_ids if r != 2])
    while batch is not None:
        gens, batch = engine.decode([batch.info()])
        collect(gens, out, ids)
    assert out[1] == alone[1] and out[3] == alone[3]
    assert ids[2] == alone[2].ids[: len(ids[2])]  # the dropped request's tokens so far are its own
    assert_valid(out[1], PERSON)
    assert_valid(out[3], POINT)


def test_unconstrained_greedy_output_is_unchanged_beside_constrained_requests(engine):
    alone = generate(engine, [request(5, None, 24)])[5]
    mixed = generate(engine, [request(4, PERSON), request(5, None, 24), request(6, POINT)])
    assert mixed[5] == alone and not alone.text.lstrip().startswith("{")


def test_a_bad_schema_is_refused_before_any_state_changes(engine: Engine) -> None:
    gens, live = engine.prefill(pb.Batch(id=7, requests=[request(1, PERSON)], size=1), None)
    assert live is not None
    assert engine.allocator is not None
    free, batches = engine.allocator.free, dict(engine.batches)
    bad = pb.Batch(id=8, requests=[request(2, POINT), request(3, '{"type": "objekt"}')], size=2)
    with pytest.raises(InvalidArgument, match=r"request 3: invalid JSON schema: .*objekt"):
        engine.prefill(bad, live.info())
    assert engine.allocator.free == free and engine.batches == batches
    out: dict[int, Result] = {}
    ids: dict[int, list[int]] = {1: list(gens[0].next_tokens.ids)}
    batch: Batch | None = live
    while batch is not None:  # the live request goes on, and a new one is served
        gens, batch = engine.decode([batch.info()])
        collect(gens, out, ids)
    assert out[1] == generate(engine, [request(1, PERSON)])[1]
    assert_valid(generate(engine, [request(2, POINT)])[2], POINT)


# ------------------------------------------------------------------------------------- compilation


def test_compiles_run_off_the_calling_thread_and_share_one_tokenizer(
    demo_dir: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    tok = QwenTokenizer.from_dir(os.path.join(demo_dir, "model"))
    grammars = Grammars(tok)
    built: list[str] = []
    real_tokenizer, real_matcher = grammar_module.lltokenizer, Grammars._matcher

    def counting_tokenizer(t: QwenTokenizer) -> llguidance.LLTokenizer:
        built.append(threading.current_thread().name)
        return real_tokenizer(t)

    release = threading.Event()

    def slow_matcher(self: Grammars, grammar: str) -> llguidance.LLMatcher:
        assert release.wait(30)
        return real_matcher(self, grammar)

    monkeypatch.setattr(grammar_module, "lltokenizer", counting_tokenizer)
    monkeypatch.setattr(Grammars, "_matcher", slow_matcher)
    pending = [grammars.compile(Grammars.check(json.dumps(s))) for s in (PERSON, POINT, PERSON)]
    assert built == []  # compile() returned while every compile still waits: the caller was not held
    masks = grammars.start_masks([None, *pending])  # the step's masks, computed while its forward runs
    assert masks is not None and not masks.done()  # it waits for the compiles off the step thread
    release.set()
    bitmask = masks.result(timeout=30)
    assert bitmask is not None and bitmask.shape == (4, (tok.n_real_vocab + 31) // 32)
    assert bool((bitmask[0] == -1).all()) and not bool((bitmask[1] == -1).all())
    assert all(not g.matcher.is_error() for g in pending)
    assert len(built) == 1 and built[0].startswith("grammar")  # one tokenizer, built on the pool
    assert grammars.start_masks([None, None]) is None  # unconstrained: nothing to compute


def test_mask_threads_follow_the_cgroup_quota(tmp_path):
    """The mask threads' default is sized from the CPUs the process may use: a cgroup v2 quota below the
    affinity caps it (more busy threads than the quota would stall the step thread); no quota leaves it."""
    affinity = len(os.sched_getaffinity(0))
    limited, unlimited = tmp_path / "limited", tmp_path / "unlimited"
    limited.write_text("100000 100000\n")  # one CPU's worth
    unlimited.write_text("max 100000\n")
    assert grammar_module.usable_cpus(str(limited)) == 1
    assert grammar_module.usable_cpus(str(unlimited)) == affinity
    assert grammar_module.usable_cpus(str(tmp_path / "absent")) == affinity


def test_an_inline_prefetch_never_waits_for_a_compile(demo_dir, monkeypatch):
    """The step thread prefetches masks inline only for compiled matchers: a compile still running (the first
    one builds the tokenizer, about a second) is left to the step that needs its mask, never waited for here."""
    tok = QwenTokenizer.from_dir(os.path.join(demo_dir, "model"))
    grammars = Grammars(tok)
    release = threading.Event()
    real_matcher = Grammars._matcher

    def held_matcher(self: Grammars, grammar: str) -> llguidance.LLMatcher:
        release.wait(30)
        return real_matcher(self, grammar)

    monkeypatch.setattr(Grammars, "_matcher", held_matcher)
    row = grammars.compile(Grammars.check(json.dumps(POINT)))
    grammars.prefetch([row], wait=True)  # returns at once
    assert not row.compiled and row.take_mask() is None
    release.set()
    bitmask = grammars.masks([row])  # the step computes it when it needs it
    assert bitmask is not None and bool((bitmask[0] != -1).any())  # a real mask: the schema restricts the start


def test_prefetched_masks_are_gathered_without_another_thread(demo_dir):
    """When every constrained row's mask was prefetched, the step's masks are gathered at once on the step
    thread (a handoff to the mask thread would wait for the GIL) and equal masks computed afresh."""
    tok = QwenTokenizer.from_dir(os.path.join(demo_dir, "model"))
    grammars = Grammars(tok)
    rows = [grammars.compile(Grammars.check(json.dumps(s))) for s in (PERSON, POINT)]
    first = grammars.masks([rows[0], None, rows[1]])  # waits for the compiles; nothing prefetched yet
    grammars.prefetch(rows, wait=True)
    taken = grammars.start_masks([rows[0], None, rows[1]])
    assert taken is not None and taken.done()  # gathered here, not queued on the mask thread
    assert grammars._mask_thread is None  # the mask thread was never needed
    assert first is not None and torch.equal(taken.result(), first)
