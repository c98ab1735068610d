"""Scale out on accelerate (issue 7): data-parallel training with 2 CPU processes (gloo) and
resuming a killed run."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

ROOT = Path(__file__).parents[1]
SER = str(Path(sys.executable).parent / "ser")
ACCELERATE = [str(Path(sys.executable).parent / "accelerate"), "launch", "--multi_gpu", "--num_processes", "2",
              "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]


def env(port: int):
    return {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1",
            "HF_HUB_OFFLINE": "1"}


def free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(args, *, processes=2, wait=True):
    prefix = ACCELERATE + ["--main_process_port", str(free_port())] if processes == 2 else []
    command = prefix + [SER, *map(str, args)]
    if wait:
        return subprocess.run(command, cwd=ROOT, env=env(0), capture_output=True, text=True, timeout=300)
    return subprocess.Popen(command, cwd=ROOT, env=env(0), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)


def max_difference(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def train_args(store, out, batch_size, epochs=2, dropout="0"):
    return ["train", "--from-cache", store, "--top-layers", 2, "--out", out, "--epochs", epochs,
            "--batch-size", batch_size, "--dropout", dropout, "--seed", 4, "--no-progress", "--workers", 1]


def test_two_processes_train_like_one_with_the_doubled_batch(built_store, tmp_path):
    two = launch(train_args(built_store, tmp_path / "two", 3))
    assert two.returncode == 0, two.stderr[-3000:]
    one = launch(train_args(built_store, tmp_path / "one", 6), processes=1)
    assert one.returncode == 0, one.stderr[-3000:]
    assert max_difference(load_file(str(tmp_path / "one" / "model.safetensors")),
                          load_file(str(tmp_path / "two" / "model.safetensors"))) < 1e-5
    logs = [[json.loads(line) for line in open(tmp_path / run / "log.jsonl")] for run in ("one", "two")]
    for a, b in zip(*logs):
        assert a["train_loss"] == pytest.approx(b["train_loss"], abs=1e-4)
        for target in a["dev"]:
            assert a["dev"][target]["ccc"] == pytest.approx(b["dev"][target]["ccc"], abs=1e-4)
    assert json.load(open(tmp_path / "two" / "config.json"))["processes"] == 2
    assert two.stdout.count("best epoch") == 1  # only the main process reports


def test_two_processes_on_audio_train_like_one(tiny_model, corpus, tmp_path):
    common = ["train", "--manifest", corpus, "--model", tiny_model, "--strategy", "partial", "--top-layers", 2,
              "--epochs", 1, "--dropout", 0, "--seed", 2, "--no-progress", "--workers", 1]
    two = launch([*common, "--batch-size", 3, "--out", tmp_path / "two"])
    assert two.returncode == 0, two.stderr[-3000:]
    one = launch([*common, "--batch-size", 6, "--out", tmp_path / "one"], processes=1)
    assert one.returncode == 0, one.stderr[-3000:]
    assert max_difference(load_file(str(tmp_path / "one" / "model.safetensors")),
                          load_file(str(tmp_path / "two" / "model.safetensors"))) < 1e-5


def kill_after_first_checkpoint(process, run_dir: Path, epochs: int):
    state = run_dir / "checkpoint" / "state.json"
    deadline = time.time() + 240
    while time.time() < deadline and process.poll() is None:
        if state.is_file():
            try:
                if 1 <= json.loads(state.read_text())["epoch"] < epochs:
                    break
            except (json.JSONDecodeError, KeyError):
                pass
        time.sleep(0.02)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    epoch = json.loads(state.read_text())["epoch"]
    assert 1 <= epoch < epochs, "the run must be killed midway"
    return epoch


@pytest.mark.parametrize("processes", [1, 2])
def test_resumed_run_equals_uninterrupted(processes, tiny_model, tmp_path):
    from cachegen.build import BuildConfig, build_cache
    from cachegen.testing import synth_corpus

    manifest = synth_corpus(tmp_path / "c", utterances=80, seconds=(0.5, 1.0), seed=2)
    store = tmp_path / "s.zarr"
    build_cache(BuildConfig(manifest=str(manifest), out=str(store), model=tiny_model, layers=2,
                            dtype="float32", progress=False))
    epochs = 6
    args = train_args(store, tmp_path / "killed", 2, epochs=epochs, dropout="0.1")
    killed_at = kill_after_first_checkpoint(launch(args, processes=processes, wait=False),
                                            tmp_path / "killed", epochs)
    resumed = launch([*args[:args.index("--out")], *args[args.index("--out") + 2:],
                      "--resume", tmp_path / "killed"], processes=processes)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    whole = launch(train_args(store, tmp_path / "whole", 2, epochs=epochs, dropout="0.1"), processes=processes)
    assert whole.returncode == 0, whole.stderr[-3000:]
    last = [load_file(str(tmp_path / run / "checkpoint" / "state.safetensors")) for run in ("killed", "whole")]
    models = [{k: v for k, v in t.items() if k.startswith("model.")} for t in last]
    assert max_difference(*models) < 1e-5
    logs = [[json.loads(line) for line in open(tmp_path / run / "log.jsonl")] for run in ("killed", "whole")]
    assert [r["epoch"] for r in logs[0]] == list(range(1, epochs + 1))
    assert [r["train_loss"] for r in logs[0]] == pytest.approx([r["train_loss"] for r in logs[1]], abs=1e-6)
    assert killed_at < epochs


def test_resume_refuses_changed_options(built_store, tmp_path):
    from helpers import run_cli

    assert run_cli(*train_args(built_store, tmp_path / "r", 4, epochs=1)).exit_code == 0
    args = train_args(built_store, tmp_path / "r", 8, epochs=1)
    result = run_cli(*args[:args.index("--out")], *args[args.index("--out") + 2:], "--resume", tmp_path / "r")
    assert result.exit_code == 1 and "the run used --batch-size 4, this command 8" in result.stderr


def build_args(manifest, model, out, *extra):
    return ["cache", "build", manifest, "--model", model, "--layers", 2, "--batch-size", 2,
            "--shard-frames", 64, "--no-progress", "--out", out, *extra]


def same_store(a, b):
    from cachegen import open_cache

    first, second = open_cache(a), open_cache(b)
    assert sorted(first.ids) == sorted(second.ids)
    for uid in first.ids:
        assert first[uid].tobytes() == second[uid].tobytes(), uid
    return len(first)


@pytest.fixture(scope="module")
def single_build(tiny_model, tmp_path_factory):
    from cachegen.testing import synth_corpus

    folder = tmp_path_factory.mktemp("scale")
    manifest = synth_corpus(folder / "c", utterances=40, seconds=(0.5, 1.0), seed=9)
    result = launch(build_args(manifest, tiny_model, folder / "one.zarr"), processes=1)
    assert result.returncode == 0, result.stderr[-2000:]
    return str(manifest), str(folder / "one.zarr")


def test_two_process_build_equals_one_process_build(single_build, tiny_model, tmp_path):
    manifest, one = single_build
    result = launch(build_args(manifest, tiny_model, tmp_path / "two.zarr"))
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.count("Cached 40 utterances") == 1  # one summary, from the main process
    # byte-identical: launch() gives both runs one thread per process, as accelerate does
    assert same_store(one, tmp_path / "two.zarr") == 40
    assert launch(["cache", "verify", tmp_path / "two.zarr"], processes=1).returncode == 0


def test_parts_then_final_step_equal_one_build_even_after_a_kill(single_build, tiny_model, tmp_path):
    manifest, one = single_build
    store = tmp_path / "parts.zarr"
    first = launch(build_args(manifest, tiny_model, store, "--part", "1/2"), wait=False,
                   processes=1)
    deadline = time.time() + 120
    while time.time() < deadline and len(list((store / "_building").glob("shard-*.parquet"))) < 3:
        time.sleep(0.01)
    os.killpg(first.pid, signal.SIGKILL)
    first.wait()
    from cachegen.errors import StoreError
    from cachegen import open_cache
    with pytest.raises(StoreError):
        open_cache(store)  # a killed part never reads as a complete store
    again = launch(build_args(manifest, tiny_model, store, "--part", "1/2"), processes=1)
    assert again.returncode == 0 and "were already cached" in again.stdout
    second = launch(build_args(manifest, tiny_model, store, "--part", "2/2"), processes=1)
    assert second.returncode == 0 and "part 2/2 is committed" in second.stdout
    twice = launch(build_args(manifest, tiny_model, store, "--part", "2/2"), processes=1)
    assert "Cached 0 utterances" in twice.stdout  # a part run twice duplicates nothing
    final = launch(build_args(manifest, tiny_model, store), processes=1)
    assert final.returncode == 0 and "Cached 0 utterances" in final.stdout
    assert "40 were already cached" in final.stdout
    assert same_store(one, store) == 40
