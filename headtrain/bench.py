"""`ser bench`: the paper's comparison on your hardware and corpus, side by side in one process.

Every strategy trains the same number of steps on identical batches (same plan, same
utterances), after warm-up steps that are not timed; each step is `ser train`'s own
(headtrain.loop.train_step: autocast, backward, gradient clipping, AdamW with the warm-up
schedule, at `ser train`'s default options). Reported per strategy: utterances/s,
seconds/step, peak memory (CUDA peak allocated on GPU; peak anonymous RSS growth on CPU), trainable
parameters and their share of the model. For `cached`: the one-off build cost, the epoch
count after which caching has paid for itself, and the data wait: the share of the timed
loop spent blocked on the next batch (`DataWait`; 0 = reading fully hidden behind compute,
1 = the loop only waits).
"""

from __future__ import annotations

import json
import logging
import os
import platform
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from cachegen.device import resolve_device
from cachegen.errors import ConfigError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BenchConfig:
    manifest: str
    model: str = "facebook/wav2vec2-base"
    layers: int = 9
    top_layers: int = 3
    strategies: tuple[str, ...] = ("full", "partial", "cached", "lora")
    amp: str = "no"
    batch_size: int = 4
    steps: int = 10
    warmup_steps: int = 2
    device: str | None = None
    store: str | None = None  # reuse a store instead of building one (no build cost then)
    json_out: str | None = None
    seed: int = 0

    def validate(self) -> None:
        from .spec import STRATEGIES, Strategy
        if not self.strategies:
            raise ConfigError(f"--strategies: name at least one of {', '.join(STRATEGIES)}")
        twice = sorted({s for s in self.strategies if self.strategies.count(s) > 1})
        if twice:
            raise ConfigError(f"--strategies {','.join(self.strategies)}: {', '.join(twice)} named twice")
        unknown = [s for s in self.strategies if s not in STRATEGIES]
        if unknown:
            raise ConfigError(f"--strategies: unknown {', '.join(unknown)}; choose from {', '.join(STRATEGIES)}")
        pooled = [s for s in self.strategies if Strategy.parse(s).reads_pooled]
        if pooled:
            raise ConfigError(f"--strategies {pooled[0]}: trains on pooled means and runs no layer of "
                              "the model; bench compares strategies that run layers")
        if self.layers < 0:
            raise ConfigError(f"--layers {self.layers}: must be 0 or more")
        for name, least in (("top_layers", 1), ("steps", 1), ("batch_size", 1), ("warmup_steps", 0)):
            if getattr(self, name) < least:
                raise ConfigError(f"--{name.replace('_', '-')} {getattr(self, name)}: must be at least {least}")
        if self.amp not in ("bf16", "fp16", "no"):
            raise ConfigError(f"--amp {self.amp!r}: choose bf16, fp16 or no")
        device = resolve_device(self.device)
        if self.amp == "fp16" and not device.startswith("cuda"):
            raise ConfigError("--amp fp16 needs a CUDA GPU; on CPU use --amp bf16 or --amp no")


class PeakMemory:
    """Peak CUDA allocation, or peak anonymous resident memory growth sampled every few ms on CPU."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    @staticmethod
    def rss() -> int:
        """Anonymous resident memory: resident minus file-backed pages, so that the page cache
        of a memory-mapped store does not count as the strategy's memory."""
        with open("/proc/self/statm") as f:
            fields = f.read().split()
        return (int(fields[1]) - int(fields[2])) * os.sysconf("SC_PAGE_SIZE")

    def __enter__(self):
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
        else:
            self.base = self.peak = self.rss()
            self.running = True
            self.thread = threading.Thread(target=self._sample, daemon=True)
            self.thread.start()
        return self

    def _sample(self):
        while self.running:
            self.peak = max(self.peak, self.rss())
            time.sleep(0.002)

    def __exit__(self, *exc):
        if self.cuda:
            torch.cuda.synchronize()
            self.bytes = torch.cuda.max_memory_allocated() - self.base
        else:
            self.running = False
            self.thread.join()
            self.bytes = self.peak - self.base


def machine_info(device: torch.device) -> dict:
    info = {"platform": platform.platform(), "python": platform.python_version(),
            "torch": torch.__version__, "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "device": str(device)}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


class DataWait:
    """Iterates `batches`, adding up the seconds spent blocked on the next one while `timing`.

    share = waiting / loop seconds: 0 when every batch was ready before the step asked for it
    (reading fully hidden behind compute), near 1 when the steps only wait for data.
    """

    def __init__(self, batches, *, clock=time.perf_counter):
        self.batches, self.clock = batches, clock
        self.timing, self.waited = False, 0.0

    def __iter__(self):
        for_next = iter(self.batches)
        while True:
            started = self.clock()
            try:
                batch = next(for_next)
            except StopIteration:
                return
            if self.timing:
                self.waited += self.clock() - started
            yield batch

    def share(self, loop_seconds: float) -> float:
        return self.waited / loop_seconds if loop_seconds > 0 else 0.0


def measure(job: dict) -> dict:
    """One strategy's timed steps, in a process of its own (spawned), so that its peak memory
    and its allocator start from the same state as every other strategy's."""
    from accelerate import Accelerator

    import numpy as np

    from cachegen.encoder import load_model

    from .data import iterate_batches
    from .inputs import Inputs
    from .loop import make_optimizer, train_step
    from .metrics import LOSSES
    from .spec import ModelSpec, Strategy
    from .train import TrainConfig
    from .upper import EmotionModel, count_parameters

    config = BenchConfig(**job["config"])
    device = torch.device(job["device"])
    accelerator = Accelerator(mixed_precision=config.amp, cpu=device.type == "cpu")
    loaded = load_model(config.model)
    if job["from_audio"]:
        inputs = Inputs(table=None, table_name=config.manifest, paths=job["paths"])
    else:
        inputs = Inputs.open(from_cache=job["store"])
        inputs.check_model(loaded)
    source, cache_layer = inputs.source(loaded.model, loaded.feature_extractor), inputs.cache_layer
    ids, plan = job["ids"], job["plan"]
    # fixed random targets: the loss has real gradients (constant targets give CCC none), so
    # clipping and the optimiser do their real work; what is learnt does not matter
    targets = np.random.default_rng(config.seed).standard_normal((len(ids), 3)).astype(np.float32)
    torch.manual_seed(config.seed)
    spec = ModelSpec(model_id=loaded.model_id, model_sha256=loaded.weights_sha256,
                     strategy=Strategy.parse(job["strategy"]), cache_layer=cache_layer,
                     top_layers=config.top_layers, targets=("activation", "valence", "dominance"))
    model = EmotionModel.from_spec(loaded.model, spec, from_audio=job["from_audio"], cache_layer=cache_layer,
                                   dropout=0.1)
    trainable, _ = count_parameters(model)
    defaults = TrainConfig(out="")  # `ser train`'s optimiser, schedule and clipping
    optimizer, scheduler = make_optimizer(
        model, lr=defaults.lr, head_lr=defaults.head_lr, weight_decay=defaults.weight_decay,
        warmup_steps=int(defaults.warmup * len(plan)), total_steps=len(plan))
    model, optimizer = accelerator.prepare(model, optimizer)
    model.train()
    feed = DataWait(iterate_batches(source, ids, targets, plan, seed=config.seed, pin=device.type == "cuda"))
    times, utterances, timed_from = [], 0, None
    feed.timing = not config.warmup_steps
    with PeakMemory(device) as memory:
        for step, batch in enumerate(feed):
            if step == config.warmup_steps - 1:
                feed.timing = True  # the wait for the first timed batch counts
            if step == config.warmup_steps:
                timed_from = time.perf_counter() - feed.waited  # from here on, waiting counts too
            started = time.perf_counter()
            train_step(batch.to(device), model=model, optimizer=optimizer, scheduler=scheduler,
                       accelerator=accelerator, loss_fn=LOSSES[defaults.loss], clip=defaults.clip)
            if device.type == "cuda":
                torch.cuda.synchronize()
            if step >= config.warmup_steps:
                times.append(time.perf_counter() - started)
                utterances += len(batch.ids)
    seconds = sum(times)
    loop_seconds = time.perf_counter() - timed_from
    return {"strategy": job["strategy"], "amp": config.amp, "input": "audio" if job["from_audio"] else "store",
            "utterances_per_second": utterances / seconds, "seconds_per_step": seconds / len(times),
            "peak_memory_bytes": max(memory.bytes, 0), "trainable_parameters": trainable,
            "loop_seconds": loop_seconds,
            "data_wait": {"wait_seconds": feed.waited, "loop_seconds": loop_seconds,
                          "share": feed.share(loop_seconds)} if not job["from_audio"] else None}


def in_own_process(job: dict) -> dict:
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(measure, job).result()


def bench(config: BenchConfig) -> dict:
    """Run the comparison; returns (and writes to `config.json_out`) the results."""
    from cachegen import open_cache
    from cachegen.build import BuildConfig, build_cache
    from cachegen.encoder import load_model
    from cachegen.manifest import load_manifest

    from .data import plan_batches
    from .inputs import Inputs

    config.validate()
    manifest = load_manifest(config.manifest)
    loaded = load_model(config.model)
    if config.layers > loaded.num_layers:
        raise ConfigError(f"--layers {config.layers}: model '{config.model}' has {loaded.num_layers} "
                          "transformer layers")
    if config.store:  # its states are the input of layer L+1: L must be the store's
        stored = open_cache(config.store).meta["layers"]
        if stored != config.layers:
            raise ConfigError(f"--store {config.store} holds the states of layer {stored}, --layers "
                              f"says {config.layers}: pass --layers {stored}")
    if config.top_layers > loaded.num_layers - config.layers:
        raise ConfigError(f"--top-layers {config.top_layers} is larger than the "
                          f"{loaded.num_layers - config.layers} layers above layer {config.layers}")
    device = torch.device(resolve_device(config.device))
    tmp = tempfile.TemporaryDirectory(prefix="ser-bench-")
    build_seconds = None
    store = config.store
    from .spec import Strategy

    strategies = [Strategy.parse(s, option="--strategies") for s in config.strategies]
    if store is None and any(not s.reads_audio_only for s in strategies):
        store = os.path.join(tmp.name, "bench.zarr")
        started = time.perf_counter()
        build_cache(BuildConfig(manifest=config.manifest, out=store, model=config.model,
                                layers=config.layers, batch_size=config.batch_size,
                                device=str(device), progress=False))
        build_seconds = time.perf_counter() - started
    reader = open_cache(store) if store else None
    inputs = Inputs(table=manifest.table, table_name=config.manifest,
                    paths={u.id: u.path for u in manifest.utterances if reader is None or u.id in reader})
    audio = inputs.source(loaded.model, loaded.feature_extractor)  # leaves unusable files out, named
    ids = inputs.ids
    paths = {uid: inputs.paths[uid] for uid in ids}
    lengths = [audio.length(u) for u in ids]
    total_steps = config.warmup_steps + config.steps
    plan, epoch = [], 0
    while len(plan) < total_steps:  # identical batches for every strategy
        plan += plan_batches(lengths, batch_size=config.batch_size, seed=config.seed, epoch=epoch)
        epoch += 1
    plan = plan[:total_steps]
    total_parameters = sum(p.numel() for p in loaded.model.parameters())
    del loaded

    def job(strategy: Strategy) -> dict:
        from_audio = strategy.reads_audio_only or reader is None
        return {"config": asdict(config), "strategy": strategy.value, "from_audio": from_audio,
                "store": store, "paths": paths, "ids": ids, "plan": plan, "device": str(device)}

    results = []
    for strategy in strategies:
        log.info("bench: %s, %d steps after %d warm-up", strategy, config.steps, config.warmup_steps)
        result = in_own_process(job(strategy))
        result["trainable_share"] = result["trainable_parameters"] / total_parameters
        results.append(result)
    by_strategy = {r["strategy"]: r for r in results}
    full = by_strategy.get(Strategy.FULL.value)
    for r in results:
        if full:
            r["speedup_vs_full"] = r["utterances_per_second"] / full["utterances_per_second"]
    cached = by_strategy.get(Strategy.CACHED.value)
    if cached:
        if build_seconds is not None:
            cached["build_seconds"] = build_seconds
            audio_strategy = by_strategy.get(Strategy.PARTIAL.value) or full
            if audio_strategy:
                steps_per_epoch = len(ids) / config.batch_size
                saved = (audio_strategy["seconds_per_step"] - cached["seconds_per_step"]) * steps_per_epoch
                cached["payback_epochs"] = build_seconds / saved if saved > 0 else None
                cached["payback_against"] = audio_strategy["strategy"]
    report = {"machine": machine_info(device), "config": asdict(config), "utterances": len(ids),
              "total_parameters": total_parameters, "results": results}
    if config.json_out:
        from cachegen.store import write_atomic

        from .run import writing

        with writing(Path(config.json_out)):
            Path(config.json_out).parent.mkdir(parents=True, exist_ok=True)
            write_atomic(Path(config.json_out), json.dumps(report, indent=2).encode())
    tmp.cleanup()
    return report


def format_table(report: dict) -> str:
    lines = [f"{'strategy':<9} {'amp':<5} {'input':<6} {'utt/s':>8} {'s/step':>8} {'vs full':>8} "
             f"{'peak mem':>10} {'trainable':>12} {'share':>7}"]
    for r in report["results"]:
        speedup = f"{r['speedup_vs_full']:.2f}x" if "speedup_vs_full" in r else "-"
        lines.append(f"{r['strategy']:<9} {r['amp']:<5} {r['input']:<6} {r['utterances_per_second']:>8.2f} "
                     f"{r['seconds_per_step']:>8.3f} {speedup:>8} {r['peak_memory_bytes'] / 2**20:>8.0f}Mi "
                     f"{r['trainable_parameters']:>12,} {100 * r['trainable_share']:>6.1f}%")
    for r in report["results"]:
        if r.get("data_wait"):
            lines.append(f"{r['strategy']}: data wait {r['data_wait']['share']:.2f} of the timed loop "
                         "(time blocked on the next batch / loop time; 0 = reading fully hidden "
                         "behind compute, 1 = only waiting)")
        if r.get("build_seconds") is not None:
            payback = r.get("payback_epochs")
            lines.append(f"cache build: {r['build_seconds']:.1f} s once; pays for itself after "
                         f"{payback:.2f} epochs against {r['payback_against']}" if payback else
                         f"cache build: {r['build_seconds']:.1f} s once")
    return "\n".join(lines)
