"""Throughput of 1 vs 2 processes for cache builds and cached training (issue 7's measurement).

Runs `ser cache build` and `ser train --from-cache` as one process and under
`accelerate launch --num_processes 2` on the same synthetic corpus and model, side by side,
and prints a markdown table. Threads: each run gets the machine's cores divided by its process
count (as accelerate does), so both use the whole machine.

    .venv/bin/python docs/bench_scale.py --utterances 48 --model base --out /tmp/ser-scale
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

BIN = Path(sys.executable).parent


def run(command: list[str], processes: int) -> tuple[float, str]:
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "HF_HUB_OFFLINE": "1",
           "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // processes))}
    if processes > 1:
        command = [str(BIN / "accelerate"), "launch", "--multi_gpu", "--num_processes", str(processes),
                   "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                   str(BIN / "ser"), *command]
    else:
        command = [str(BIN / "ser"), *command]
    started = time.perf_counter()
    result = subprocess.run(command, env=env, capture_output=True, text=True)
    if result.returncode:
        sys.exit(result.stderr[-3000:])
    return time.perf_counter() - started, result.stdout


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--utterances", type=int, default=48)
    parser.add_argument("--model", choices=["tiny", "base"], default="base")
    parser.add_argument("--layers", type=int, default=9)
    parser.add_argument("--top-layers", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=4, help="per process for training")
    parser.add_argument("--out", default="/tmp/ser-scale")
    args = parser.parse_args()

    from cachegen.testing import base_config, save_model, save_tiny_model, synth_corpus

    out = Path(args.out)
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    model = out / "model"
    if args.model == "base":
        save_model(model, base_config())
        layers = args.layers
    else:
        save_tiny_model(model)
        layers = 2
    manifest = synth_corpus(out / "corpus", utterances=args.utterances, seconds=(2.0, 5.0))
    rows = []
    for processes in (1, 2):
        store = out / f"store-{processes}.zarr"
        wall, stdout = run(["cache", "build", str(manifest), "--model", str(model), "--layers", str(layers),
                            "--out", str(store), "--no-progress"], processes)
        reported = float(re.search(r"in ([\d.]+) s", stdout).group(1))
        rows.append(("cache build", processes, args.utterances / reported, reported, wall))
    for processes in (1, 2):
        run_dir = out / f"run-{processes}"
        wall, _ = run(["train", "--from-cache", str(out / "store-1.zarr"), "--top-layers", str(args.top_layers),
                       "--out", str(run_dir), "--epochs", "2", "--batch-size", str(args.batch_size * (3 - processes)),
                       "--no-progress"], processes)
        epochs = [json.loads(line) for line in open(run_dir / "log.jsonl")]
        last = epochs[-1]  # the second epoch: warm
        rows.append(("cached training", processes, last["utterances_per_second"], last["seconds"], wall))
    print(f"{args.utterances} utterances of 2-5 s, {args.model} architecture (random weights), "
          f"L={layers}, K={args.top_layers}, {os.cpu_count()} CPU cores\n")
    print("| work | processes | utterances/s | seconds (work) | seconds (wall, with start-up) |")
    print("|---|---|---|---|---|")
    for work, processes, rate, seconds, wall in rows:
        print(f"| {work} | {processes} | {rate:.2f} | {seconds:.1f} | {wall:.1f} |")
    for work in ("cache build", "cached training"):
        one, two = [r for r in rows if r[0] == work]
        print(f"\n{work}: 2 processes / 1 process throughput = {two[2] / one[2]:.2f}")


if __name__ == "__main__":
    main()
