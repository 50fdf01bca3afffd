"""Metrics on hand-built event streams with hand-computed answers."""

import pytest

from epd.lifetime import EventLog
from epd.lifetime import LifetimeEvent as Ev
from epd.metrics import SUMMARY_KEYS, goodput, slo_attainment, stage_times, summarize, timelines


def stream():
    log = EventLog()
    # a: issued 0, encode 0.1-0.3, mm 0.3-0.35, prefill 0.4-0.6 (first token), kv 0.6-0.7, decode from 0.7, 5 tokens, done 1.4
    for t, k in [
        (0.0, Ev.ISSUED),
        (0.1, Ev.ENCODE_BEGIN),
        (0.3, Ev.ENCODE_END),
        (0.3, Ev.MM_TRANSFER_BEGIN),
        (0.35, Ev.MM_TRANSFER_END),
        (0.4, Ev.PREFILL_BEGIN),
        (0.6, Ev.PREFILL_END),
        (0.6, Ev.FIRST_TOKEN),
        (0.6, Ev.KV_TRANSFER_BEGIN),
        (0.7, Ev.KV_TRANSFER_END),
        (0.7, Ev.DECODE_BEGIN),
    ]:
        log.emit(t, "a", k)
    log.emit(1.4, "a", Ev.FINISHED, num_output_tokens=5)
    # b: issued 1.0, first token 3.0 (TTFT 2.0), 1 token only
    log.emit(1.0, "b", Ev.ISSUED)
    log.emit(1.5, "b", Ev.PREFILL_BEGIN)
    log.emit(3.0, "b", Ev.PREFILL_END)
    log.emit(3.0, "b", Ev.FIRST_TOKEN)
    log.emit(3.0, "b", Ev.FINISHED, num_output_tokens=1)
    # c: aborted
    log.emit(2.0, "c", Ev.ISSUED)
    log.emit(2.1, "c", Ev.ABORTED, reason="too long")
    return log


def test_latencies():
    tl = timelines(stream())
    assert tl["a"].ttft == pytest.approx(0.6)
    assert tl["a"].tpot == pytest.approx((1.4 - 0.6) / 4)
    assert tl["a"].e2e == pytest.approx(1.4)
    assert tl["b"].ttft == pytest.approx(2.0) and tl["b"].tpot is None
    assert tl["c"].abort_reason == "too long" and tl["c"].ttft is None


def test_stage_times():
    st = stage_times(timelines(stream())["a"])
    assert st["encode_queue"] == pytest.approx(0.1)
    assert st["encode_service"] == pytest.approx(0.2)
    assert st["mm_transfer"] == pytest.approx(0.05)
    assert st["prefill_queue"] == pytest.approx(0.05)  # 0.4 - 0.35
    assert st["prefill_service"] == pytest.approx(0.2)
    assert st["kv_transfer"] == pytest.approx(0.1)
    assert st["decode_queue"] == pytest.approx(0.0)
    assert st["decode_service"] == pytest.approx(0.7)


def test_attainment_counts_aborts_as_misses():
    tl = timelines(stream())
    assert slo_attainment(tl, ttft=1.0, tpot=0.25) == pytest.approx(1 / 3)
    assert slo_attainment(tl, ttft=2.0, tpot=0.25) == pytest.approx(2 / 3)
    assert slo_attainment(tl, ttft=2.0, tpot=0.1) == pytest.approx(1 / 3)  # a misses TPOT 0.2 > 0.1


def test_goodput():
    assert goodput({0.5: 1.0, 1.0: 0.95, 2.0: 0.9, 4.0: 0.5}, 0.9) == 2.0
    assert goodput({1.0: 0.5}, 0.9) is None
    # interpolated where attainment crosses the target, as compare tables report it
    assert goodput({1.0: 1.0, 2.0: 0.95, 4.0: 0.5}, 0.9) == pytest.approx(2 + 2 * (0.05 / 0.45))


def test_summary_fields():
    s = summarize(stream(), 2.0, 0.25, "1E1P1D")
    for key in SUMMARY_KEYS:
        assert key in s
    assert (s["num_requests"], s["num_finished"], s["num_aborted"]) == (3, 2, 1)
    assert s["ttft_mean"] == pytest.approx(1.3)
    assert s["output_throughput"] == pytest.approx(6 / 3.0)  # 6 tokens from t=0 to the last finish at 3.0
    assert s["deployment"] == "1E1P1D"


def test_event_log_roundtrip(tmp_path):
    log = stream()
    log.write_jsonl(tmp_path / "e.jsonl")
    back = EventLog.read_jsonl(tmp_path / "e.jsonl")
    assert sorted(e.to_row()["time"] for e in back) == sorted(e.time for e in log)
    assert summarize(back, 2.0, 0.25, "x") == summarize(log, 2.0, 0.25, "x")


def test_a_request_finished_without_a_visible_token_has_no_ttft_or_tpot():
    """The online client may see a stream end with no text (every token held back or undecodable):
    finished, with no TTFT or TPOT, and the summary still computes."""
    log = EventLog()
    log.emit(0.0, "a", Ev.ISSUED)
    log.emit(0.5, "a", Ev.FINISHED, num_output_tokens=5, finish_reason="length")
    log.emit(0.0, "b", Ev.ISSUED)
    log.emit(0.1, "b", Ev.FIRST_TOKEN)
    log.emit(0.5, "b", Ev.FINISHED, num_output_tokens=5, finish_reason="length")
    tl = timelines(log)
    assert tl["a"].ttft is None and tl["a"].tpot is None and tl["b"].tpot == pytest.approx(0.1)
    s = summarize(log, 1.0, 1.0, "epd")
    assert s["num_finished"] == 2 and s["tpot_p50"] == pytest.approx(0.1)
