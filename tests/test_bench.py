"""`ser bench` runs every strategy and reports the documented JSON (its numbers are not judged)."""

import json
from dataclasses import asdict

import pytest

from helpers import run_cli


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


def linear_warmup_lr(base: float, step: int, warmup: int, total: int) -> float:
    """The learning rate of a linear schedule with warm-up: 0 -> base over `warmup` steps, then
    down to 0 at `total`."""
    return base * step / warmup if step < warmup else base * max(0.0, (total - step) / (total - warmup))


@pytest.mark.parametrize("caller", ["bench", "train"])
def test_bench_steps_clip_and_schedule_like_ser_train(caller, tiny_model, corpus, built_store, tmp_path):
    """Every optimiser step of `ser bench` and of `ser train` sees gradients clipped to
    --clip (norm exactly the clip when the loss's gradient is larger) and learning rates that
    follow the warm-up schedule, for the layers and the head: bench times train's step."""
    import torch
    from torch.optim.optimizer import register_optimizer_step_pre_hook

    from headtrain.bench import BenchConfig, measure
    from headtrain.data import plan_batches
    from headtrain.train import TrainConfig, train
    from cachegen import open_cache

    defaults = TrainConfig(out=str(tmp_path / "run"), from_cache=built_store, top_layers=2, epochs=2,
                           batch_size=4, workers=0, progress=False)
    steps = []

    def record(optimizer, args, kwargs):
        grads = [p.grad.detach().flatten() for group in optimizer.param_groups for p in group["params"]
                 if p.grad is not None]
        steps.append(([group["lr"] for group in optimizer.param_groups], torch.cat(grads).norm().item()))

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    hook = register_optimizer_step_pre_hook(record)
    try:
        if caller == "bench":
            reader = open_cache(built_store)
            ids = list(reader.ids)
            plan = plan_batches([reader.frames(u) for u in ids], batch_size=4, seed=0, epoch=0)
            plan = (plan + plan)[:10]
            config = BenchConfig(manifest=corpus, model=tiny_model, layers=2, top_layers=2, batch_size=4,
                                 steps=8, warmup_steps=2)
            measure({"config": asdict(config), "strategy": "cached", "from_audio": False, "store": built_store,
                     "paths": {}, "ids": ids, "plan": plan, "device": "cpu"})
        else:
            train(defaults)
    finally:
        hook.remove()
        torch.set_num_threads(threads)
    total = 10  # bench: 2 warm-up + 8 timed steps; train: 2 epochs of ceil(18 / 4) batches
    assert len(steps) == total
    warmup = int(defaults.warmup * total)
    assert warmup >= 1
    for i, (lrs, _) in enumerate(steps):
        assert lrs == pytest.approx([linear_warmup_lr(defaults.lr, i, warmup, total),
                                     linear_warmup_lr(defaults.head_lr, i, warmup, total)], rel=1e-6), i
    norms = [norm for _, norm in steps]
    assert max(norms) <= defaults.clip * (1 + 1e-4)
    assert any(abs(norm - defaults.clip) < 1e-4 for norm in norms), norms  # clipping acted


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("args,message", [
    # the store's layer-2 states fed as layer 1's: one of the 3 asked layers trained, unsaid
    (["--store", "STORE", "--layers", 1, "--top-layers", 3], "holds the states of layer 2, --layers says 1"),
    (["--layers", 9], "--layers 9: model"),  # was: "larger than the -5 layers above layer 9"
    (["--top-layers", 0], "--top-layers 0: must be at least 1"),  # benched the head alone
])
def test_bench_refuses_layers_it_would_not_measure(args, message, tiny_model, corpus, built_store):
    from helpers import one_error_line

    args = [built_store if a == "STORE" else a for a in args]
    one_error_line(run_cli("bench", "--manifest", corpus, "--model", tiny_model, "--strategies", "cached",
                           "--steps", 1, "--warmup-steps", 0, *args), message)
