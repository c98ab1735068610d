"""`ser bench` runs every strategy and reports the documented JSON (its numbers are not judged)."""

import json

from conftest import run_cli


def test_bench_reports_every_strategy(tiny_model, corpus, tmp_path):
    out = tmp_path / "bench.json"
    result = run_cli("bench", "--manifest", corpus, "--model", tiny_model, "--layers", 2, "--top-layers", 2,
                     "--strategies", "full,partial,cached,lora", "--batch-size", 4, "--steps", 2,
                     "--warmup-steps", 1, "--json", out)
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())
    assert report["machine"]["cpu_count"] > 0 and report["machine"]["device"] == "cpu"
    results = {r["strategy"]: r for r in report["results"]}
    assert list(results) == ["full", "partial", "cached", "lora"]
    for r in results.values():
        for key in ("utterances_per_second", "seconds_per_step", "trainable_parameters"):
            assert r[key] > 0, (r["strategy"], key)
        assert r["peak_memory_bytes"] >= 0 and 0 < r["trainable_share"] < 1
        assert r["amp"] == "no"
    assert results["lora"]["input"] == "store" and results["partial"]["input"] == "audio"
    cached = results["cached"]
    assert cached["build_seconds"] > 0 and 0 <= cached["data_wait"]["share"] <= 1
    assert cached["data_wait"]["wait_seconds"] <= cached["data_wait"]["loop_seconds"]
    assert results["full"]["data_wait"] is None  # audio strategies decode inside the step
    assert cached["trainable_parameters"] == results["partial"]["trainable_parameters"]
    assert results["full"]["trainable_parameters"] > cached["trainable_parameters"]
    for strategy in results:
        assert strategy in result.output
    assert "pays for itself" in result.output or "cache build" in result.output


class FakeClock:
    """A clock that only moves when told: the loop's timing, made exact."""

    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def test_data_wait_is_the_share_of_the_loop_blocked_on_the_next_batch():
    from headtrain.bench import DataWait

    clock = FakeClock()

    def batches(read_seconds):
        for seconds in read_seconds:
            clock.now += seconds  # reading this batch blocks the loop this long
            yield seconds

    # untimed warm-up batch (5 s), then 3 batches: reads of 3, 0 and 1 s, steps of 2 s each
    feed = DataWait(batches([5.0, 3.0, 0.0, 1.0]), clock=clock)
    started = None
    for step, _ in enumerate(feed):
        if step == 0:
            feed.timing, started = True, clock.now
            continue
        clock.now += 2.0  # compute
    loop = clock.now - started
    assert feed.waited == 4.0 and loop == 10.0
    assert feed.share(loop) == 0.4
    # reading fully hidden behind compute: nothing waits
    hidden = DataWait(batches([0.0, 0.0]), clock=clock)
    hidden.timing = True
    for _ in hidden:
        clock.now += 2.0
    assert hidden.share(4.0) == 0.0
