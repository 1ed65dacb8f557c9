"""The front's pure parts: ChatML ids (no injection through message text), stop sequences cut from
streamed text, token offsets, structured-output schemas, router errors → HTTP errors, adapters."""

from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st
from test_front_app import ByteTokenizer

from router_client.front.chat import DEFAULT_SYSTEM, Turn, chatml_ids
from router_client.front.errors import NO_STRUCTURED_OUTPUT, FrontError, from_request_error
from router_client.front.params import AdapterRef, adapter_ref, sampling, structured_schema
from router_client.front.schemas import Grammar, MergedAdapters, ResponseFormat
from router_client.front.text import StopTrimmer, token_offsets, trim_stop
from router_client.requests import CANCELLED, RequestError

TOK = ByteTokenizer()
START, END = TOK.im_start_id, TOK.im_end_id


def text(s: str) -> list[int]:
    return list(s.encode())


def test_chatml_layout_matches_qwen_make_context() -> None:
    ids = chatml_ids(TOK, [Turn("user", "hi"), Turn("assistant", "yo"), Turn("user", "again")])
    expected = (
        [START, *text("system\n" + DEFAULT_SYSTEM), END]
        + text("\n")
        + [START, *text("user\nhi"), END]
        + text("\n")
        + [START, *text("assistant\nyo"), END]
        + text("\n")
        + [START, *text("user\nagain"), END]
        + text("\n")
        + [START, *text("assistant\n")]
    )
    assert ids == expected
    own = chatml_ids(TOK, [Turn("system", "be brief"), Turn("user", "hi")])
    assert own[: len(text("system\nbe brief")) + 2] == [START, *text("system\nbe brief"), END]
    assert own.count(START) == 3  # no default system turn added


@given(st.lists(st.sampled_from(["<|im_end|>", "<|im_start|>", "<|endoftext|>", "a", "\n", "é"]), max_size=8))
def test_message_text_never_becomes_special_tokens(pieces: list[str]) -> None:
    message = "".join(pieces)
    ids = chatml_ids(TOK, [Turn("user", message)])
    assert ids.count(START) == 3 and ids.count(END) == 2 and 256 not in ids  # only the template's own
    assert TOK.decode(ids).count(message) >= 1


def test_stop_trimmer_never_streams_a_stop_sequence() -> None:
    trimmer = StopTrimmer(["STOP", "\n\n"])
    sent = [trimmer.push(p) for p in ["Hel", "lo S", "T", "OR", "Y S", "TO", "P and more"]]
    assert "".join(sent) == "Hello STORY " and trimmer.stopped
    assert sent[1] == "lo " and sent[3] == "STOR"  # "S", then "ST", were held back until they could not be a stop
    assert trimmer.push("x") == "" and trimmer.flush() == ""
    open_end = StopTrimmer(["STOP"])
    assert open_end.push("abc ST") == "abc " and open_end.flush() == "ST"  # never became the stop: sent at the end
    assert trim_stop("one two", ["two"]) == "one " and trim_stop("one", []) == "one"


@given(
    st.text(alphabet="ab", max_size=12),
    st.lists(st.text(alphabet="ab", min_size=1, max_size=3), max_size=2),
    st.lists(st.integers(1, 4), min_size=1, max_size=12),
)
def test_stop_trimmer_equals_cutting_at_the_first_stop(generated: str, stops: list[str], cuts: list[int]) -> None:
    """Chunks arrive until the text ends with a stop sequence (the shard's check); the streamed text is
    the generated text up to the first occurrence of any stop sequence."""
    trimmer, out, text = StopTrimmer(stops), [], ""
    for n in cuts * 12:
        if len(text) >= len(generated) or any(text.endswith(s) for s in stops):
            break
        chunk = generated[len(text) : len(text) + n]
        text += chunk
        out.append(trimmer.push(chunk))
    firsts = [text.find(s) for s in stops if s in text]
    expected = text[: min(firsts)] if firsts else text
    assert "".join(out) + trimmer.flush() == expected


def test_token_offsets_are_character_offsets() -> None:
    nfc, ids, spans = token_offsets(TOK, "añb<|im_end|>")
    assert ids == [*text("añb"), END]
    assert spans == [(0, 1), (1, 2), (1, 2), (2, 3), (3, 13)]  # ñ is two bytes: both tokens cover it
    assert nfc[spans[-1][0] : spans[-1][1]] == "<|im_end|>"


def test_structured_output_schemas() -> None:
    assert structured_schema(None, None) is None
    assert structured_schema(ResponseFormat(type="text"), None) is None
    assert json.loads(structured_schema(ResponseFormat(type="json_object"), None) or "") == {"type": "object"}
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}}
    lorax = ResponseFormat.model_validate({"type": "json_object", "schema": schema})
    openai = ResponseFormat.model_validate({"type": "json_schema", "json_schema": {"name": "x", "schema": schema}})
    tgi = Grammar(type="json", value=json.dumps(schema))
    assert {structured_schema(lorax, None), structured_schema(openai, None), structured_schema(None, tgi)} == {
        json.dumps(schema, separators=(",", ":"))
    }
    for bad in [
        (ResponseFormat(type="json_schema"), None),
        (None, Grammar(type="regex", value="a+")),
        (lorax, tgi),
        (None, Grammar(type="json", value=5)),
        (ResponseFormat.model_validate({"type": "json_object", "schema": _nested(40)}), None),
    ]:
        with pytest.raises(FrontError) as err:
            structured_schema(*bad)
        assert err.value.status == 422


def _nested(depth: int) -> dict:
    schema: dict = {"type": "string"}
    for _ in range(depth):
        schema = {"type": "array", "items": schema}
    return schema


def test_router_errors_become_lorax_statuses() -> None:
    unsupported = RequestError(
        "shard 0 (unix:///tmp/x) Prefill failed: FAILED_PRECONDITION: no schemas",
        "FAILED_PRECONDITION",
        at_prefill=True,
    )
    err = from_request_error(unsupported, structured=True)
    assert (err.status, err.error_type) == (422, "validation") and err.message.startswith(NO_STRUCTURED_OUTPUT)
    assert "unix://" not in err.message
    assert from_request_error(unsupported, structured=False).message == "no schemas"
    later = RequestError("Decode failed: INTERNAL: boom", "INTERNAL")
    assert (from_request_error(later, False).status, from_request_error(later, False).error_type) == (424, "generation")
    assert from_request_error(RequestError("x", CANCELLED), False).error_type == "cancelled"
    died = RequestError(
        "request 7 failed: shard 1 (unix:///tmp/q/s-1) Decode failed: UNAVAILABLE: Socket closed", "UNAVAILABLE"
    )
    assert from_request_error(died, False).body() == {  # names the shard, the call and the status; no socket path
        "error": "shard 1 Decode failed: UNAVAILABLE: Socket closed",
        "error_type": "generation",
    }


def test_adapter_refs_and_sampling() -> None:
    assert adapter_ref(None, None, None, "local", None) is None
    assert adapter_ref("base", None, None, "local", None, base_ids=("", "base")) is None
    one = adapter_ref("pirate", None, "hub", "local", "tok")
    assert one == AdapterRef(("pirate",), "hub") and one is not None and one.api_token == "tok"
    merged = adapter_ref(
        None,
        MergedAdapters(
            ids=["a", "b"], weights=[0.3, 0.7], merge_strategy="ties", density=0.5, majority_sign_method="frequency"
        ),
        None,
        "local",
        None,
    )
    assert merged is not None
    params = merged.to_pb()
    assert list(params.adapter_ids) == ["a", "b"] and list(params.weights) == pytest.approx([0.3, 0.7])
    assert params.merge_strategy == 1 and params.density == 0.5 and params.majority_sign_method == 1
    with pytest.raises(FrontError):
        adapter_ref("x", MergedAdapters(ids=["a"]), None, "local", None)
    with pytest.raises(FrontError):
        adapter_ref(None, MergedAdapters(ids=["a", "b"], weights=[1.0]), None, "local", None)
    greedy = sampling(temperature=0.0, do_sample=True, top_k=5)
    assert greedy["do_sample"] is False and greedy["temperature"] == 0.0  # temperature 0 is greedy
    assert "top_p" not in sampling(temperature=None, do_sample=False)  # null: the router's default
