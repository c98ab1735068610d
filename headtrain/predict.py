"""`ser predict`: raw audio through the lower stack, the trained upper stack and the head.

Built for batch use: files that cannot be used (unreadable, empty, shorter than the model's
receptive field) are skipped and named, the others are predicted, and the output is written
once, atomically, as CSV or Parquet.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from cachegen.errors import ConfigError

from cachegen.device import resolve_device

log = logging.getLogger(__name__)
DECODE_AHEAD = 8  # batches decoded ahead of the model: bounds memory whatever the file count


@dataclass(frozen=True)
class PredictConfig:
    run: str  # a run directory (from `ser train`) or an export directory (from `ser export`)
    out: str  # .csv or .parquet
    audio: tuple[str, ...] = ()  # files, or folders searched for audio files
    manifest: str | None = None
    split: str | None = None
    model: str | None = None
    batch_size: int = 8
    device: str | None = None
    audio_root: str | None = None
    workers: int = 2
    progress: bool = True

    def validate(self) -> None:
        from .evaluate import OUTPUT_FORMATS

        if bool(self.audio) == bool(self.manifest):
            raise ConfigError("pass audio files or folders, or --manifest MANIFEST (one of them)")
        if self.split and not self.manifest:
            raise ConfigError("--split needs --manifest")
        if self.batch_size < 1:
            raise ConfigError(f"--batch-size {self.batch_size}: must be at least 1")
        if self.workers < 1:
            raise ConfigError(f"--workers {self.workers}: must be at least 1")
        if Path(self.out).suffix.lower() not in OUTPUT_FORMATS:
            raise ConfigError(f"--out {self.out}: name a .csv or .parquet file")
        if self.manifest and Path(self.out).resolve() == Path(self.manifest).resolve():
            raise ConfigError(f"--out {self.out}: that is --manifest itself; write the predictions "
                              "to another file")
        resolve_device(self.device)


@dataclass
class PredictResult:
    out: str
    predicted: int
    skipped: list[str] = field(default_factory=list)  # one line per file left out: path and why


def audio_inputs(paths: tuple[str, ...]):
    """Utterances for files and folders (every audio file under a folder), ids unique.

    An id is the file name without extension (a folder's files: the path under the folder);
    where two would share an id, every id is the path as found.

    Raises:
        ConfigError: a path that does not exist, or a folder without audio files.
    """
    from cachegen.manifest import Utterance
    from cachegen.recipes.folder import _audio_files

    missing = [p for p in paths if not Path(p).exists()]
    if missing:
        raise ConfigError(f"audio file(s) or folder(s) not found: {', '.join(missing)}")
    found: list[tuple[str, Path]] = []
    for given in paths:
        path = Path(given)
        if path.is_dir():
            files = _audio_files(path)
            if not files:
                raise ConfigError(f"{path}: no audio files (wav, flac, ogg, mp3) in this folder")
            found += [(uid, file) for uid, file in files.items()]
        else:
            found.append((path.stem, path))
    unique = len({uid for uid, _ in found}) == len(found)
    return [Utterance(id=uid if unique else str(file), path=str(file), row=i)
            for i, (uid, file) in enumerate(found)]


def predict(config: PredictConfig) -> PredictResult:
    """Write predictions for every usable utterance (of `split`) to `config.out`.

    Columns: id, path, split (with a manifest that has one), then per target `<target>`
    (the true label, when the manifest has them all) and `<target>_pred`. Files that cannot
    be used are logged as warnings and listed in the result; the rest are predicted.
    """
    import pyarrow.compute as pc

    from cachegen.manifest import load_manifest

    from .run import load_run

    config.validate()  # a .csv or .parquet --out is none of a run directory's own files
    out = Path(config.out)
    table = None
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
        utterances = audio_inputs(config.audio)
    run = load_run(config.run, from_audio=True, model=config.model)
    device = resolve_device(config.device)
    pred, skipped = predict_audio(run, utterances, batch_size=config.batch_size, device=device,
                                  workers=config.workers, progress=config.progress)
    done = [u for u in utterances if u.id in pred]
    ids = [u.id for u in done]
    columns = {"id": ids, "path": [u.path for u in done]}
    true = None
    if table is not None:
        rows = {r["id"]: r for r in table.to_pylist()}
        if "split" in table.column_names:
            columns["split"] = [rows[uid]["split"] for uid in ids]
        if all(t in table.column_names for t in run.targets):
            values = np.array([[true_value(rows[uid][t.name], t, run.info.get("class_map"))
                                for t in run.target_specs] for uid in ids],
                              dtype=np.float64).reshape(len(ids), len(run.targets))
            true = values if not np.isnan(values).any() else None
    from .evaluate import write_predictions

    values = np.array([pred[uid] for uid in ids]).reshape(len(ids), run.spec.output_width)
    write_predictions(out, columns, run.target_specs, run.to_label_scale(values), true)
    return PredictResult(out=str(out), predicted=len(ids), skipped=skipped)


def true_value(value, target, class_map: dict | None) -> float:
    """A table's label as the metrics take it: a number, or a categorical target's class
    index after the run's class map; NaN where it has none (no truth is reported then)."""
    if value is None:
        return np.nan
    if target.categorical:
        value = class_map.get(value) if class_map else value
        return target.classes.index(value) if value in target.classes else np.nan
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else np.nan


@torch.no_grad()
def predict_audio(run, utterances, *, batch_size: int, device: str, workers: int = 2,
                  progress: bool = True) -> tuple[dict[str, np.ndarray], list[str]]:
    """Standardised predictions by id, and the files left out (path: why), logged as warnings.

    Files are decoded in background threads, a bounded number of batches ahead; each group of
    DECODE_AHEAD batches is sorted by length to save padding.
    """
    from concurrent.futures import ThreadPoolExecutor

    from tqdm import tqdm

    from cachegen.build import decode
    from cachegen.encoder import receptive_field

    model = run.model.to(device).eval()
    min_samples = receptive_field(run.model.backbone.config)
    group = batch_size * DECODE_AHEAD
    pred: dict[str, np.ndarray] = {}
    skipped: list[str] = []
    count = len(utterances)
    with ThreadPoolExecutor(max_workers=workers) as pool, \
            tqdm(total=count, unit="utt", desc="predicting", disable=not progress,
                 dynamic_ncols=True) as bar:
        def submit(start: int) -> list:
            return [(u, pool.submit(decode, u, run.feature_extractor, min_samples))
                    for u in utterances[start:start + group]]

        pending = submit(0)
        for start in range(0, count, group):
            current, pending = pending, submit(start + group)  # the next group decodes meanwhile
            usable = []
            for utterance, future in current:
                values, _ = future.result()
                if isinstance(values, Exception):  # decode names the file and the reason
                    log.warning("skipped: %s", values)
                    skipped.append(str(values))
                else:
                    usable.append((utterance.id, values))
            usable.sort(key=lambda item: len(item[1]))
            for first in range(0, len(usable), batch_size):
                batch = usable[first:first + batch_size]
                waveforms = [torch.from_numpy(values).to(device) for _, values in batch]
                out = model(waveforms).float().cpu().numpy()  # (B, targets)
                pred.update((uid, row) for (uid, _), row in zip(batch, out))
            bar.update(len(current))
    return pred, skipped
