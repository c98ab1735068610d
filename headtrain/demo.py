"""`ser demo`: the whole path offline, on a synthetic corpus and a tiny random-init model."""

from __future__ import annotations

from pathlib import Path


def run_demo(out: str, *, epochs: int = 8, echo=print, utterances: int = 200) -> dict:
    """Synthesise a corpus whose labels follow its prosody, save a tiny random Wav2Vec2, build
    the cache, train the top layers from it, evaluate on the test split. Returns test metrics."""
    from cachegen.build import BuildConfig, build_cache
    from cachegen.verify import format_info, store_info
    from cachegen.testing import save_tiny_model, synth_corpus

    from .evaluate import EvaluateConfig, evaluate
    from .metrics import format_metrics
    from .train import TrainConfig, train

    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    model_dir = out_dir / "tiny-wav2vec2"
    if not (model_dir / "config.json").is_file():
        save_tiny_model(model_dir, layers=4, hidden=32)
    manifest = out_dir / "corpus" / "manifest.csv"
    if not manifest.is_file():
        synth_corpus(out_dir / "corpus", utterances=utterances, sample_rates=(16000, 22050, 8000),
                     stereo_every=5)
    echo(f"corpus: {manifest} ({utterances} synthetic utterances at 8/16/22.05 kHz)")
    echo(f"model:  {model_dir} (tiny random-init Wav2Vec2, 4 layers)")
    store = out_dir / "cache.zarr"
    summary = build_cache(BuildConfig(manifest=str(manifest), out=str(store), model=str(model_dir),
                                      layers=2, batch_size=8))
    echo(summary.text())
    echo(format_info(store_info(str(store))))
    run_dir = out_dir / "run"
    result = train(TrainConfig(out=str(run_dir), from_cache=str(store), top_layers=2,
                               targets=("activation", "valence", "dominance"), epochs=epochs,
                               batch_size=8, lr=5e-4, head_lr=3e-3, dropout=0.0, warmup=0.05,
                               overwrite=True))  # a second demo replaces the first one's run
    echo(f"best epoch {result.best_epoch}: dev {format_metrics(result.best_dev)}")
    eval_dir = out_dir / "test"
    metrics = evaluate(EvaluateConfig(run=str(run_dir), out=str(eval_dir), from_cache=str(store),
                                      split="test"))
    echo(f"test {format_metrics(metrics)}")
    echo(f"plots: {run_dir / 'curves.png'}, {eval_dir / 'scatter.png'}; "
         f"predictions: {eval_dir / 'predictions.csv'}")
    return metrics
