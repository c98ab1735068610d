"""Which training batches suit the CCC loss: `--batching random` against `--batching length`.

Trains the same tiny model from the same store, with the same options and seeds, on a
synthetic corpus where the speaking rate drives both activation and duration (fast, active
utterances are short: cachegen.testing.synth_rate_corpus), once per batching policy, and
prints dev CCC, the share of padded frames and the training time side by side.

Run from the repository root (a few minutes on 2 CPU cores):

    .venv/bin/python docs/bench_batching.py --workdir /tmp/ser-batching

docs/training.md records the result. Everything is synthetic and offline.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def padded_share(lengths: list[int], plan: list[list[int]]) -> float:
    """Fraction of the frames the upper layers run on that are padding."""
    lengths = np.asarray(lengths)
    run = sum(len(b) * lengths[b].max() for b in plan)
    return float(1 - lengths.sum() / run)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", required=True, type=Path)
    parser.add_argument("--utterances", type=int, default=400)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--hidden", type=int, default=64, help="hidden size of the random model")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()

    import torch

    from cachegen import open_cache
    from cachegen.build import BuildConfig, build_cache
    from cachegen.testing import save_tiny_model, synth_rate_corpus
    from headtrain import TrainConfig, train
    from headtrain.data import Batching, plan_batches

    torch.set_num_threads(args.threads)
    work = args.workdir
    work.mkdir(parents=True, exist_ok=True)
    model = work / f"model-h{args.hidden}"
    if not (model / "config.json").is_file():
        save_tiny_model(model, hidden=args.hidden)
    manifest = synth_rate_corpus(work / f"corpus-{args.utterances}", utterances=args.utterances)
    store = work / f"store-{args.utterances}-h{args.hidden}.zarr"
    if not (store / "zarr.json").is_file():
        build_cache(BuildConfig(manifest=str(manifest), out=str(store), model=str(model), layers=2,
                                dtype="float32", progress=False))
    reader = open_cache(str(store))
    table = reader.table.to_pydict()
    train_ids = [u for u, s in zip(table["id"], table["split"]) if s == "train"]
    lengths = [reader.frames(u) for u in train_ids]
    activation = dict(zip(table["id"], table["activation"]))
    duration_r = float(np.corrcoef(lengths, [activation[u] for u in train_ids])[0, 1])

    rows = []
    for batching in Batching:
        for seed in range(args.seeds):
            run = work / f"run-{batching.value}-{seed}"
            shutil.rmtree(run, ignore_errors=True)
            started = time.perf_counter()
            result = train(TrainConfig(
                out=str(run), from_cache=str(store), top_layers=2, targets=("activation",),
                epochs=args.epochs, batch_size=args.batch_size, lr=5e-4, head_lr=3e-3, dropout=0.0,
                warmup=0.05, seed=seed, batching=batching.value, progress=False, workers=1))
            seconds = time.perf_counter() - started
            log = [json.loads(line) for line in open(run / "log.jsonl")]
            plans = [plan_batches(lengths, batch_size=args.batch_size, seed=seed, epoch=e,
                                  batching=batching) for e in range(args.epochs)]
            # how much of the targets' spread a batch holds, averaged over batches
            std = np.std([activation[u] for u in train_ids])
            spread = np.mean([np.std([activation[train_ids[i]] for i in b]) / std
                              for p in plans for b in p if len(b) > 1])
            rows.append({"batching": batching.value, "seed": seed,
                         "dev_ccc": result.best_dev["activation"]["ccc"],
                         "train_seconds": sum(r["seconds"] for r in log), "total_seconds": seconds,
                         "padded": float(np.mean([padded_share(lengths, p) for p in plans])),
                         "batch_target_spread": float(spread)})
            print(json.dumps(rows[-1]), flush=True)

    print(f"\n{args.utterances} utterances ({len(train_ids)} train), corr(duration, activation) = "
          f"{duration_r:.2f}; hidden {args.hidden}, batch {args.batch_size}, {args.epochs} epochs, "
          f"{args.seeds} seeds; {platform.processor() or platform.machine()}, "
          f"{torch.get_num_threads()} threads\n")
    print("| `--batching` | dev CCC activation (mean ± sd over seeds) | batch target spread | "
          "padded frames | training seconds (sum of epochs) |")
    print("|---|---|---|---|---|")
    for batching in Batching:
        mine = [r for r in rows if r["batching"] == batching.value]
        ccc = np.array([r["dev_ccc"] for r in mine])
        print(f"| {batching.value} | {ccc.mean():.3f} ± {ccc.std():.3f} | "
              f"{np.mean([r['batch_target_spread'] for r in mine]):.2f} | "
              f"{np.mean([r['padded'] for r in mine]):.1%} | "
              f"{np.mean([r['train_seconds'] for r in mine]):.1f} |")
    (work / "bench_batching.json").write_text(json.dumps(
        {"args": {k: str(v) for k, v in vars(args).items()}, "duration_activation_r": duration_r,
         "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
