"""StoppingCriteria: order of checks, eos handling, stop sequences across token boundaries."""

import pytest

from worker.engine.stopping import FinishReason, StoppingCriteria
from worker.pb import generate_pb2

EOS = frozenset({151643, 151645})


def crit(max_new: int = 10, stops: list[str] | None = None, ignore_eos: bool = False) -> StoppingCriteria:
    c = StoppingCriteria(max_new_tokens=max_new, stop_sequences=stops or [], ignore_eos_token=ignore_eos, eos_ids=EOS)
    c.validate()
    return c


def test_finish_reason_values_match_proto_enum():
    for reason in FinishReason:
        assert generate_pb2.FinishReason.Value(reason.name) == int(reason)


def test_length_wins_over_eos_on_the_same_token():
    assert crit(max_new=3).check(151645, "ab", 3) is FinishReason.FINISH_REASON_LENGTH
    assert crit(max_new=3).check(151645, "ab", 2) is FinishReason.FINISH_REASON_EOS_TOKEN


def test_eos_before_stop_sequence_and_every_eos_id_counts():
    c = crit(stops=["b"])
    assert c.check(151643, "ab", 1) is FinishReason.FINISH_REASON_EOS_TOKEN
    assert c.check(151645, "xy", 1) is FinishReason.FINISH_REASON_EOS_TOKEN
    assert c.check(42, "ab", 1) is FinishReason.FINISH_REASON_STOP_SEQUENCE
    assert c.check(42, "ba", 1) is None


def test_ignore_eos():
    c = crit(max_new=5, ignore_eos=True)
    assert c.check(151645, "x", 1) is None
    assert c.check(151645, "x", 5) is FinishReason.FINISH_REASON_LENGTH


def test_stop_sequence_spanning_tokens_fires_on_completing_token():
    c = crit(max_new=100, stops=["###", "o wor"])
    text, reasons = "", []
    for piece in ["Hell", "o", " w", "or", "ld", "#", "##"]:
        text += piece
        reasons.append(c.check(7, text, len(reasons) + 1))
    stop = FinishReason.FINISH_REASON_STOP_SEQUENCE
    assert reasons == [None, None, None, stop, None, None, stop]  # "o wor" spans three pieces, "###" two


def test_stop_sequence_only_at_end_of_long_text():
    c = crit(max_new=10_000, stops=["STOP", "x"])
    long = "a" * 5000
    assert c.check(1, long + "STOP" + "a", 2) is None
    assert c.check(1, long + "STOP", 2) is FinishReason.FINISH_REASON_STOP_SEQUENCE
    assert c.check(1, "STO", 2) is None


def test_empty_stop_sequences_ignored():
    assert crit(stops=["", ""]).check(5, "anything", 1) is None


def test_zero_max_new_tokens_stops_at_once_and_negative_rejected():
    assert crit(max_new=0).check(5, "", 0) is FinishReason.FINISH_REASON_LENGTH
    with pytest.raises(ValueError, match="max_new_tokens.*-1"):
        StoppingCriteria(max_new_tokens=-1, stop_sequences=[], ignore_eos_token=False, eos_ids=EOS).validate()
