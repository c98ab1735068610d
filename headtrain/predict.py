"""`ser predict`: raw audio through the lower stack, the trained upper stack and the head."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from cachegen.errors import ConfigError

from .device import resolve_device


@dataclass(frozen=True)
class PredictConfig:
    run: str  # a run directory (from `ser train`) or an export directory (from `ser export`)
    out: str  # CSV
    audio: tuple[str, ...] = ()
    manifest: str | None = None
    split: str | None = None
    model: str | None = None
    batch_size: int = 8
    device: str | None = None
    audio_root: str | None = None

    def validate(self) -> None:
        if bool(self.audio) == bool(self.manifest):
            raise ConfigError("pass audio files or --manifest MANIFEST (one of them)")
        if self.split and not self.manifest:
            raise ConfigError("--split needs --manifest")
        if self.batch_size < 1:
            raise ConfigError(f"--batch-size {self.batch_size}: must be at least 1")
        resolve_device(self.device)


def predict(config: PredictConfig) -> int:
    """Write predictions for every utterance (of `split`) to `config.out`; returns how many.

    The true labels are included (columns `<target>`) when the manifest has them all.
    """
    import numpy as np
    import pyarrow.compute as pc

    from cachegen.errors import AudioError
    from cachegen.manifest import load_manifest, Utterance

    from .data import AudioSource
    from .evaluate import predict_split, write_predictions
    from .run import load_run, refuse_run_output

    config.validate()
    refuse_run_output(Path(config.out), option="--out")
    if config.manifest:
        manifest = load_manifest(config.manifest, audio_root=config.audio_root)
        table = manifest.table
        if config.split:
            if "split" not in table.column_names:
                raise ConfigError(f"{config.manifest}: --split {config.split} given but there is no split column")
            table = table.filter(pc.equal(table.column("split"), config.split))
            if table.num_rows == 0:
                raise ConfigError(f"{config.manifest}: split '{config.split}' has no rows")
        keep = set(table.column("id").to_pylist())
        utterances = [u for u in manifest.utterances if u.id in keep]
    else:
        missing = [a for a in config.audio if not Path(a).is_file()]
        if missing:
            raise ConfigError(f"audio file(s) not found: {', '.join(missing)}")
        utterances = [Utterance(id=Path(a).stem if len({Path(b).stem for b in config.audio}) == len(config.audio)
                                else str(a), path=str(Path(a).resolve()), row=i)
                      for i, a in enumerate(config.audio)]
        table = None
    run = load_run(config.run, from_audio=True, model=config.model)
    paths = {u.id: u.path for u in utterances}
    try:
        source = AudioSource(paths, run.model.backbone, run.feature_extractor)
    except RuntimeError as err:  # soundfile cannot read a header
        raise AudioError(f"cannot read audio: {err}") from None
    ids = [u.id for u in utterances]
    device = resolve_device(config.device)
    pred = run.to_label_scale(predict_split(run.model.to(device), source, ids,
                                            batch_size=config.batch_size, device=device))
    true = None
    if table is not None and all(t in table.column_names for t in run.targets):
        rows = {r["id"]: r for r in table.select(["id", *run.targets]).to_pylist()}
        values = np.array([[rows[uid][t] if rows[uid][t] is not None else np.nan for t in run.targets]
                           for uid in ids], dtype=np.float64)
        true = values if not np.isnan(values).any() else None
    splits = [None] * len(ids)
    if table is not None and "split" in table.column_names:
        by_id = dict(zip(table.column("id").to_pylist(), table.column("split").to_pylist()))
        splits = [by_id[uid] for uid in ids]
    Path(config.out).parent.mkdir(parents=True, exist_ok=True)
    write_predictions(Path(config.out), ids, splits, run.targets, pred, true)
    return len(ids)
