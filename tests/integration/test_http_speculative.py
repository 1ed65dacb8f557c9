"""Speculative decoding end to end: a real shard drafting by prompt lookup (`--speculative-tokens 4`), or with the
demo's Medusa heads (`--speculative-adapter medusa`), behind the router and the HTTP front (`qwen-router serve`),
driven by lorax-client, text-generation and openai.

Greedy output must be the float64 reference's (tests/reference.py) and a shard's without speculation (the
conftest `router`), token for token, with drafts accepted (details.skipped_tokens > 0) on an input-copy prompt:
the demo model, given its training sentence and then the sentence's start again, repeats text of the prompt."""

from __future__ import annotations

import functools
import json
from collections.abc import Iterator

import httpx
import lorax
import openai
import pytest
import text_generation

from fronts import FrontProc, start_front, stop_front
from make_demo_model import BASE_TEXTS, MEDUSA_HEADS
from reference import ref_greedy
from shards import start_launcher, stop

MODES = {  # shard flags, and the drafts per step (Info.speculate) they give
    "lookup": (("--speculative-tokens", "4"), 4),
    "medusa": (("--speculative-adapter", "medusa"), MEDUSA_HEADS),
}
COPY = BASE_TEXTS[1][0] + BASE_TEXTS[1][1] + " " + BASE_TEXTS[1][0]  # the answer repeats the prompt's words
PROMPTS = [COPY, BASE_TEXTS[0][0], BASE_TEXTS[2][0]]


@pytest.fixture(scope="module", params=list(MODES))
def mode(request) -> str:
    return request.param


@pytest.fixture(scope="module")
def front(mode, demo_dir) -> Iterator[FrontProc]:
    """The HTTP front on its own shard, which drafts by prompt lookup or with the demo's Medusa heads."""
    shard = start_launcher(f"{demo_dir}/model", f"{demo_dir}/adapters", extra=MODES[mode][0])
    try:
        f = start_front(shard, demo_dir)
        yield f
        assert stop_front(f) == 0, f.log()[-3000:]
    finally:
        rc = stop(shard)
    assert rc == 0, shard.log()[-3000:]


@pytest.fixture(scope="module")
def greedy(ref_model, tok):
    """`greedy(prompt)`: the float64 reference's greedy ids (48 at most, through eos)."""
    (state, cfg), eos = ref_model, sorted(tok.eos_token_ids)
    return functools.cache(lambda prompt: tuple(ref_greedy(state, cfg, tok.encode(prompt), 48, stop_ids=eos)))


def skipped(front: FrontProc, prompt: str, **parameters) -> int:
    body = {"inputs": prompt, "parameters": {"max_new_tokens": 48, "details": True, **parameters}}
    return int(httpx.post(f"{front.url}/generate", json=body, timeout=120).json()["details"]["skipped_tokens"])


def metric(front: FrontProc, name: str) -> float:
    lines = [line for line in httpx.get(f"{front.url}/metrics").text.splitlines() if line.startswith(name + " ")]
    return float(lines[0].split()[1]) if lines else 0.0


@pytest.mark.parametrize("prompt", PROMPTS)
def test_greedy_output_is_unchanged_by_speculation(front, router, tok, greedy, prompt):
    res = lorax.Client(front.url, timeout=120).generate(prompt, max_new_tokens=48, details=True)
    plain = router.generate(prompt, timeout=120, stopping={"max_new_tokens": 48})
    assert [t.id for t in res.details.tokens] == list(greedy(prompt)) == plain.token_ids
    assert res.generated_text == plain.text and res.details.generated_tokens == len(greedy(prompt))


def test_input_copy_accepts_drafts_and_streams_every_token(front, mode, tok, greedy):
    assert httpx.get(f"{front.url}/info").json()["speculate"] == MODES[mode][1]
    n_skipped = skipped(front, COPY)
    assert n_skipped > 0  # several tokens in one step: drafts were accepted
    events = list(lorax.Client(front.url, timeout=120).generate_stream(COPY, max_new_tokens=48))
    assert [e.token.id for e in events] == list(greedy(COPY))  # one event per token, in order
    assert events[-1].details.generated_tokens == len(events) and events[-1].generated_text == tok.decode(
        list(greedy(COPY)), skip_special_tokens=True
    )
    raw = httpx.post(f"{front.url}/generate_stream", json={"inputs": COPY, "parameters": {"max_new_tokens": 48}})
    last = json.loads([line for line in raw.text.splitlines() if line.startswith("data:")][-1][5:])
    assert last["details"]["skipped_tokens"] == n_skipped  # greedy: the same steps every time
    tgi = list(text_generation.Client(front.url, timeout=120).generate_stream(COPY, max_new_tokens=48))
    assert [e.token.id for e in tgi] == list(greedy(COPY))
    assert metric(front, "lorax_request_skipped_tokens_sum") >= 3 * n_skipped
    assert metric(front, "lorax_decode_accepted_tokens_per_step") > 1.0


def test_a_stop_sequence_ends_the_stream_at_its_token(front, tok, greedy):
    """The shard checks the stop token by token inside a step (TGI's rule: the text ends with it); nothing after
    it reaches the client."""
    ids, stop = list(greedy(COPY)), "uage m"
    stop_at = next(k for k in range(1, len(ids) + 1) if tok.decode(ids[:k]).endswith(stop))
    client = lorax.Client(front.url, timeout=120)
    events = list(client.generate_stream(COPY, max_new_tokens=48, stop_sequences=[stop]))
    assert [e.token.id for e in events] == ids[:stop_at] and stop_at < len(ids) - 1
    assert events[-1].details.finish_reason.value == "stop_sequence"


def test_openai_streams_one_chunk_per_token_and_counts_all(front, tok, greedy):
    oai = openai.OpenAI(base_url=f"{front.url}/v1", api_key="unused", max_retries=0, timeout=120)
    ids = list(greedy(COPY))
    done = oai.completions.create(model="", prompt=COPY, max_tokens=48, temperature=0)
    assert done.choices[0].text == tok.decode(ids, skip_special_tokens=True)
    assert done.usage.completion_tokens == len(ids)
    chunks = list(oai.completions.create(model="", prompt=COPY, max_tokens=48, temperature=0, stream=True))
    texts = [c.choices[0].text for c in chunks if c.choices[0].text]
    assert texts == [tok.decode([t]) for t in ids if t not in tok.eos_token_ids]
