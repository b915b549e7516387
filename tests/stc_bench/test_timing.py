from stc_bench.device import resolve_device
from stc_bench.timing import StageTimer, time_call


def test_cpu_timer_returns_one_span_per_stage_and_chunk_in_order():
    timer = StageTimer(resolve_device("cpu"))
    for chunk in range(3):
        for stage in ("vit", "prefill"):
            with timer.span(stage, chunk):
                sum(range(100))
    spans = timer.finish()
    assert [(s.stage, s.chunk) for s in spans] == [(st, c) for c in range(3) for st in ("vit", "prefill")]
    assert all(s.ms >= 0 for s in spans)
    assert timer.finish() == []  # marks are consumed


def test_time_call_runs_warmup_untimed():
    calls = []
    times = time_call(resolve_device("cpu"), lambda: calls.append(1), repeats=4, warmup=2)
    assert len(times) == 4 and len(calls) == 6
