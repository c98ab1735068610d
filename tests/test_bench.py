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
    assert cached["build_seconds"] > 0 and cached["data_wait"]["ratio"] > 0
    assert cached["trainable_parameters"] == results["partial"]["trainable_parameters"]
    assert results["full"]["trainable_parameters"] > cached["trainable_parameters"]
    for strategy in results:
        assert strategy in result.output
    assert "pays for itself" in result.output or "cache build" in result.output
