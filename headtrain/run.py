"""The run directory: trained tensors (safetensors), config.json, logs; and rebuilding a model
from it. Nothing in a run directory is pickled."""

from __future__ import annotations

import json
import logging
import os
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from cachegen.errors import ConfigError, OutputError, StoreMismatch, UnsafeInput
from cachegen.store import write_atomic

from .spec import STRATEGIES

log = logging.getLogger(__name__)

RUN_FORMAT = "ser-run"
RUN_FORMAT_VERSION = 1
EXPORT_FORMAT = "ser-export"
WEIGHTS = "model.safetensors"


def save_tensors(tensors: dict[str, torch.Tensor], path: Path) -> None:
    """Atomically write safetensors, refusing non-finite values (never a NaN checkpoint)."""
    from safetensors.torch import save

    bad = [name for name, t in tensors.items() if t.is_floating_point() and not torch.isfinite(t).all()]
    if bad:
        raise ValueError(f"refusing to save non-finite tensors: {', '.join(bad[:5])}")
    write_atomic(path, save({n: t.contiguous() for n, t in tensors.items()}))


def write_json(data: dict, path: Path) -> None:
    write_atomic(path, json.dumps(data, indent=2, default=str).encode())


CHECKPOINT = "checkpoint"
LAYER_WEIGHTS = "layer_weights"  # .json and .png of a weighted-sum run
# Everything `ser train` writes into its run directory; --overwrite removes these and nothing else.
RUN_FILES = ("config.json", WEIGHTS, "log.jsonl", "metrics.json", "curves.png", CHECKPOINT,
             f"{CHECKPOINT}.partial", f"{CHECKPOINT}.old", f"{LAYER_WEIGHTS}.json", f"{LAYER_WEIGHTS}.png")


def write_layer_weights(run_dir: Path, weights: dict[str, float], *, epoch: int) -> None:
    """layer_weights.json and layer_weights.png: the softmax weight of each pooled layer in the
    weights of `epoch` (the best one) of a weighted-sum run."""
    from .plots import plot_layer_weights

    heaviest = max(weights, key=weights.get)
    write_json({"epoch": epoch, "layer_weights": weights, "heaviest_layer": int(heaviest)},
               run_dir / f"{LAYER_WEIGHTS}.json")
    plot_layer_weights(weights, str(run_dir / f"{LAYER_WEIGHTS}.png"),
                       title=f"weighted sum of layers, epoch {epoch}; heaviest {heaviest}")


def is_run_dir(path: str | Path) -> bool:
    """Whether `path` holds a run of `ser train` (its config.json says so)."""
    config = Path(path) / "config.json"
    try:
        info = json.loads(config.read_text())
    except (OSError, ValueError):
        return False
    return isinstance(info, dict) and info.get("format") == RUN_FORMAT


def read_json(path: Path) -> dict:
    """A JSON object from a run, export or checkpoint file.

    Raises:
        ConfigError: unreadable, not JSON (cut short or edited), or not an object.
    """
    try:
        data = json.loads(path.read_text())
    except OSError as err:
        raise ConfigError(f"{path}: cannot be read ({err.strerror or err})") from None
    except ValueError as err:
        raise ConfigError(f"{path}: not valid JSON ({err}); the file was cut short or edited") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: holds {type(data).__name__}, not a JSON object")
    return data


def check_fields(path: Path, data: dict, fields: dict, *, prefix: str = "") -> None:
    """Check that `data` (read from `path`) has every field of `fields` ({name: (check, what is
    expected)}) with a value that passes its check.

    Raises:
        ConfigError: naming the file and the first missing or wrong field.
    """
    for name, (ok, expected) in fields.items():
        if name not in data:
            raise ConfigError(f"{path}: field '{prefix}{name}' is missing ({expected} expected); "
                              "the file was cut short or edited")
        if not ok(data[name]):
            shown = json.dumps(data[name])
            raise ConfigError(f"{path}: field '{prefix}{name}' is {shown[:60]}"
                              f"{'…' if len(shown) > 60 else ''}, expected {expected}")


def is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value) -> bool:
    import math

    return (isinstance(value, (int, float)) and not isinstance(value, bool)
            and math.isfinite(value))


def is_sha256(value) -> bool:
    return isinstance(value, str) and len(value) == 64 and all(c in "0123456789abcdef" for c in value)


OUTPUT_LOCK = ".ser-writing.lock"  # held while train, evaluate or export writes the folder


@contextmanager
def output_lock(run_dir: Path, *, hold: bool = True):
    """Hold the output folder `run_dir` for one training, evaluation or export: a second
    command writing into it (the same run resumed, or another) is refused, naming the first,
    until this one ends; a killed holder's lock goes with it (flock). A folder made here and
    left empty is removed again.

    Raises:
        StoreError: another process holds the folder.
        OutputError: the folder cannot be written.
    """
    from cachegen.lock import BuildLock

    if not hold:  # another process of the same training (accelerate) holds it
        yield
        return
    created = not run_dir.exists()
    with writing(run_dir):  # a read-only or full disk is named like any other output
        run_dir.mkdir(parents=True, exist_ok=True)
        os.close(os.open(run_dir / OUTPUT_LOCK, os.O_RDWR | os.O_CREAT, 0o666))
    try:
        with BuildLock(run_dir, OUTPUT_LOCK, doing="written"):
            yield
    finally:
        if created:
            try:
                run_dir.rmdir()  # only if nothing was written
            except OSError:
                pass


@contextmanager
def writing(path: Path, *, hint: str = ""):
    """Turn a failure to write `path` (read-only folder, no permission, disk full) into one
    OutputError naming it. A PNG being drawn is removed, never left cut short; everything else
    is written atomically (write_atomic) and left whole or not at all."""
    try:
        yield
    except OSError as err:
        if path.suffix == ".png":  # matplotlib writes in place
            try:
                path.unlink(missing_ok=True)
            except OSError:
                pass  # a read-only folder: nothing was written either
        raise OutputError(f"{path}: cannot be written ({err.strerror or err}); free space or "
                          f"choose a writable place{hint}") from None


def refuse_store_output(path: Path, *, option: str) -> None:
    """Refuse an output folder that holds a ser store (its zarr.json): a run, a sweep, an
    evaluation or an export written there would mix their files with the store's.

    Raises:
        ConfigError: naming the option and the folder.
    """
    if (path / "zarr.json").is_file():
        raise ConfigError(f"{option} {path}: holds a store (zarr.json); write into another folder "
                          "(nothing was changed)")


def refuse_run_output(path: Path, *, option: str) -> None:
    """Refuse output of another command (evaluate, export, sweep) that would land in a store
    or in a run directory's own files: `path` holds a store, is a run directory, or one of a
    run's files or folders.

    Raises:
        ConfigError: naming the option, the run and where to write instead.
    """
    refuse_store_output(path, option=option)
    run_dir = path if is_run_dir(path) else path.parent if path.name in RUN_FILES and is_run_dir(path.parent) else None
    if run_dir is not None:
        raise ConfigError(f"{option} {path}: would write into the files of the training run in "
                          f"{run_dir}, which belong to it; write elsewhere (e.g. {run_dir / 'test'})")


@dataclass
class LoadedRun:
    model: torch.nn.Module  # EmotionModel (WeightedSumModel for weighted-sum), eval mode
    info: dict  # config.json of the run (or the export's ser_head.json)
    spec: object  # ModelSpec that rebuilt `model`
    feature_extractor: object
    target_specs: list  # headtrain.targets.Target per target, in output order

    @property
    def targets(self) -> list[str]:
        return [t.name for t in self.target_specs]

    def to_label_scale(self, outputs: np.ndarray) -> np.ndarray:
        """(N, output width) head outputs -> (N, targets) label values and class indices."""
        from .targets import to_labels

        return to_labels(self.target_specs, outputs)


def _is_targets(value) -> bool:
    return (isinstance(value, list) and bool(value) and all(isinstance(t, str) and t for t in value)
            and len(set(value)) == len(value))


def _numbers(value) -> bool:
    return isinstance(value, list) and all(map(is_number, value))


# What rebuilding a model from a run's config.json (or an export's ser_head.json) reads: each
# field is checked, so a hand-edited or cut file is refused, never silently predicting otherwise.
INFO_FIELDS = {
    "targets": (_is_targets, "a non-empty list of distinct target names"),
    "label_mean": (_numbers, "a list of finite numbers, one per target"),
    "label_std": (lambda v: _numbers(v) and all(x > 0 for x in v), "a list of positive numbers, one per target"),
    "top_layers": (lambda v: is_int(v) and v >= 0, "an integer of 0 or more"),  # model_spec checks more
}
RUN_INFO_FIELDS = {
    **INFO_FIELDS,
    "strategy": (lambda v: v in STRATEGIES, f"one of {', '.join(STRATEGIES)}"),
    "model_id": (lambda v: isinstance(v, str) and bool(v), "the base model's hub id or folder"),
    "model_sha256": (is_sha256, "a sha256 hex digest"),
    "cache_layer": (lambda v: is_int(v) and v >= 0, "an integer of 0 or more"),
    "lora_rank": (lambda v: is_int(v) and v >= 1, "an integer of at least 1"),
    "lora_alpha": (lambda v: is_int(v) and v >= 1, "an integer of at least 1"),
}


def read_run_info(run_dir: str | Path) -> dict:
    """config.json of a run, or ser_head.json of an export, checked field by field.

    Raises:
        ConfigError: neither is there, the format version is not this ser's, or a field is
            missing, of the wrong type or of the wrong length (naming the file and field).
    """
    run_dir = Path(run_dir)
    for name, kind, fields in (("config.json", RUN_FORMAT, RUN_INFO_FIELDS),
                               ("ser_head.json", EXPORT_FORMAT, INFO_FIELDS)):
        path = run_dir / name
        if not path.is_file():
            continue
        info = read_json(path)
        if info.get("format") != kind:
            continue
        if info.get("format_version") != RUN_FORMAT_VERSION:
            raise ConfigError(f"{path}: run format version {info.get('format_version')} is "
                              f"not supported (this ser reads {RUN_FORMAT_VERSION})")
        check_fields(path, info, fields)
        for field_name in ("label_mean", "label_std"):
            if len(info[field_name]) != len(info["targets"]):
                raise ConfigError(f"{path}: field '{field_name}' has {len(info[field_name])} values for "
                                  f"{len(info['targets'])} targets; the file was edited or cut")
        return info
    raise ConfigError(f"{run_dir}: not a ser run or export directory (no config.json from `ser train` "
                      "or ser_head.json from `ser export`)")


def load_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """Tensors of a safetensors file; anything else (a pickle, a cut file) is refused unread.

    Raises:
        UnsafeInput: `path` is not a whole safetensors file.
    """
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except Exception as err:  # a pickle or anything else in its place is never unpickled
        raise UnsafeInput(f"{path}: not a safetensors file ({str(err).splitlines()[0]}); "
                          "ser loads checkpoints only as safetensors + JSON") from None


def check_safetensors(path: Path) -> None:
    """Refuse `path` unless it is a whole safetensors file (reads its header only).

    Raises:
        UnsafeInput: missing, a pickle, or anything else.
    """
    from safetensors import safe_open

    if not path.is_file():
        raise UnsafeInput(f"{path}: missing; an export holds its weights only as model.safetensors")
    try:
        with safe_open(str(path), framework="pt") as f:
            f.keys()
    except Exception as err:  # never handed on to a loader that might unpickle it
        raise UnsafeInput(f"{path}: not a safetensors file ({str(err).splitlines()[0]}); "
                          "ser loads weights only as safetensors") from None


def load_tensors_into(module, tensors: dict[str, torch.Tensor], path: Path, *, load) -> None:
    """`load(tensors)` after checking they are exactly the tensors `module` expects (names
    and shapes): a missing tensor would otherwise keep its initial value silently.

    Raises:
        ConfigError: naming the file and the first tensor that is missing, unknown or of
            another shape (the file does not belong to this config).
    """
    expected = {name: tuple(t.shape) for name, t in module.items()}
    for name in sorted(expected):
        if name not in tensors:
            raise ConfigError(f"{path}: tensor '{name}' is missing; the file does not belong to "
                              "this run's config.json (edited, cut or from another run)")
    for name, tensor in tensors.items():
        if name not in expected:
            raise ConfigError(f"{path}: tensor '{name}' is not part of this run's model; the file does "
                              "not belong to its config.json")
        if tuple(tensor.shape) != expected[name]:
            raise ConfigError(f"{path}: tensor '{name}' has shape {tuple(tensor.shape)}, the model "
                              f"expects {expected[name]}; the file does not belong to its config.json")
    load(tensors)


def check_class_map(path: Path, class_map, spec) -> None:
    """A run's class map ({label value: class}, from --classes) must lead into the classes of
    its one categorical target: evaluate and predict relabel with it.

    Raises:
        ConfigError: naming the file and what is wrong.
    """
    if class_map is None:
        return
    if (len(spec.classes) != 1 or not isinstance(class_map, dict)
            or not all(isinstance(k, str) and isinstance(v, str) for k, v in class_map.items())
            or set(class_map.values()) != set(next(iter(spec.classes.values())))):
        raise ConfigError(f"{path}: field 'class_map' must map label values to the classes of the "
                          "run's one categorical target; the file was edited")


def load_run(run_dir: str | Path, *, from_audio: bool, cache_layer: int | None = None,
             model: str | None = None) -> LoadedRun:
    """Rebuild a trained model from a run (or export) directory.

    Args:
        from_audio: build the whole network (audio in); else start from states at `cache_layer`.
        model: where to load the base checkpoint from, if not where the run recorded it.

    Raises:
        StoreMismatch: the base checkpoint's weights are not the ones the run trained on.
    """
    from cachegen.encoder import load_model

    from .spec import ModelSpec
    from .targets import targets_from_info
    from .upper import build_network

    run_dir = Path(run_dir)
    info = read_run_info(run_dir)
    exported = info["format"] == EXPORT_FORMAT
    spec = ModelSpec.from_run_info(info, where=str(run_dir / ("ser_head.json" if exported else "config.json")))
    check_class_map(run_dir / ("ser_head.json" if exported else "config.json"), info.get("class_map"), spec)
    weights = run_dir / ("head.safetensors" if exported else WEIGHTS)
    if weights.suffix != ".safetensors":
        raise UnsafeInput(f"{weights}: only safetensors are loaded")
    if not weights.is_file():
        raise ConfigError(f"{run_dir}: {weights.name} is missing (training never finished an epoch?)")
    if not exported and not (run_dir / "metrics.json").is_file():  # written last by a finished training
        log.warning("%s has not finished training (no metrics.json): using its best epoch so far, "
                    "which may still change", run_dir)
    if exported and not from_audio:
        raise ConfigError(f"{run_dir}: an export holds the whole network, trained layers merged; "
                          "evaluate it from audio (--manifest) instead of --from-cache")
    if exported:  # the whole network's weights: only a safetensors file, checked before transformers reads it
        check_safetensors(run_dir / WEIGHTS)
    loaded = load_model(str(run_dir) if exported else (model or spec.model_id))
    if not exported and loaded.weights_sha256 != spec.model_sha256:
        raise StoreMismatch(f"{run_dir}: trained on weights sha256 {spec.model_sha256[:12]}…, but "
                            f"'{model or spec.model_id}' has {loaded.weights_sha256[:12]}…; pass "
                            "--model with the base checkpoint the run was trained from")
    layers = loaded.num_layers
    if spec.top_layers > layers:
        raise ConfigError(f"{run_dir}: top_layers {spec.top_layers} does not fit a base model of "
                          f"{layers} layers")
    if any(n > layers for n in spec.pooled_layers):
        raise ConfigError(f"{run_dir}: pooled_layers {list(spec.pooled_layers)} do not fit a base "
                          f"model of {layers} layers (hidden_states 0..{layers})")
    trained_from = spec.trained_from(layers)
    if not from_audio and spec.strategy.trains_every_layer:
        raise ConfigError(f"{run_dir}: full finetuning also trained the layers below any cache; "
                          "evaluate it from audio (--manifest) instead of --from-cache")
    if not from_audio and not spec.strategy.reads_pooled:  # pooled means: any store layer L
        if cache_layer is None or cache_layer > trained_from:
            raise ConfigError(f"a store at layer {cache_layer} cannot feed this run: its layers "
                              f"{trained_from + 1}..{layers} were trained; use a store built with "
                              f"--layers {trained_from} or less, or predict from audio")
    emotion = build_network(loaded.model, spec, from_audio=from_audio, cache_layer=cache_layer or 0,
                            merged=exported)
    tensors = load_safetensors(weights)
    if exported:
        load_tensors_into(emotion.head.state_dict(), tensors, weights, load=emotion.head.load_state_dict)
    else:
        load_tensors_into(emotion.trained_state(), tensors, weights, load=emotion.load_trained_state)
    emotion.eval()
    return LoadedRun(model=emotion, info=info, spec=spec, feature_extractor=loaded.feature_extractor,
                     target_specs=targets_from_info(info, spec))



def save_checkpoint(run_dir: Path, *, model, optimizer, scheduler, state: dict) -> None:
    """Everything needed to continue after `state["epoch"]`: trained tensors, optimizer
    moments, scheduler position and RNG state (safetensors), and the rest as JSON. Written
    to a temporary folder, then swapped in: a kill never leaves half a checkpoint."""
    import shutil

    tensors = {f"model.{n}": t for n, t in model.trained_state().items()}
    optimizer_state = optimizer.state_dict()
    for index, moments in optimizer_state["state"].items():
        for name, value in moments.items():
            tensor = value if torch.is_tensor(value) else torch.tensor(value)
            tensors[f"optimizer.{index}.{name}"] = tensor.detach().cpu()
    tensors["rng.torch"] = torch.get_rng_state()
    if torch.cuda.is_available():
        tensors["rng.cuda"] = torch.cuda.get_rng_state()
    scheduler_state = {k: v for k, v in scheduler.state_dict().items() if k != "lr_lambdas"}
    staging = run_dir / f"{CHECKPOINT}.partial"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    save_tensors(tensors, staging / "state.safetensors")
    write_json({**state, "optimizer_param_groups": optimizer_state["param_groups"],
                "scheduler": scheduler_state}, staging / "state.json")
    final = run_dir / CHECKPOINT
    old = run_dir / f"{CHECKPOINT}.old"
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        final.rename(old)
    staging.rename(final)
    shutil.rmtree(old, ignore_errors=True)


def _history(value) -> bool:
    return isinstance(value, list) and all(
        isinstance(r, dict) and r.get("epoch") == i + 1 and isinstance(r.get("dev"), dict)
        and all(r.get(k) is None or is_number(r[k]) for k in ("dev_mean", "dev_mean_ccc", "dev_score"))
        for i, r in enumerate(value))


STATE_FIELDS = {
    "epoch": (lambda v: is_int(v) and v >= 1, "an integer of at least 1 (epochs done)"),
    "history": (_history, "a list of epoch records 1, 2, ... with their dev metrics"),
    "best": (lambda v: isinstance(v, dict) and is_int(v.get("epoch")) and v["epoch"] >= 0
             and (v.get("mean") is None or is_number(v["mean"])) and (v.get("dev") is None or isinstance(v["dev"], dict)),
             "an object with epoch, dev and mean"),
    "optimizer_param_groups": (lambda v: isinstance(v, list) and all(isinstance(g, dict) for g in v),
                               "a list of parameter groups"),
    "scheduler": (lambda v: isinstance(v, dict) and is_int(v.get("last_epoch")), "an object with last_epoch"),
}


def checkpoint_folder(run_dir: Path) -> Path | None:
    """The run's last whole checkpoint folder, or None when no epoch has finished yet."""
    for folder in (run_dir / CHECKPOINT, run_dir / f"{CHECKPOINT}.old"):  # .old: killed while swapping
        if (folder / "state.json").is_file():
            return folder
    return None


def load_checkpoint(run_dir: Path, *, model, optimizer, scheduler) -> dict:
    """Restore what save_checkpoint wrote; returns its JSON state (epoch, best, history).

    Raises:
        ConfigError: no checkpoint, or state.json / state.safetensors edited or cut (naming the
            file and the field or tensor).
        UnsafeInput: state.safetensors is not a safetensors file (never unpickled).
    """
    folder = checkpoint_folder(run_dir)
    if folder is None:
        raise ConfigError(f"{run_dir}: no checkpoint to resume from (none is written before the "
                          "first epoch ends)")
    state_path, tensors_path = folder / "state.json", folder / "state.safetensors"
    state = read_json(state_path)
    check_fields(state_path, state, STATE_FIELDS)
    if len(state["history"]) != state["epoch"] or state["best"]["epoch"] > state["epoch"]:
        raise ConfigError(f"{state_path}: field 'history' holds {len(state['history'])} epochs, "
                          f"'epoch' says {state['epoch']} (best {state['best']['epoch']}); the file "
                          "was edited or cut")
    groups = state["optimizer_param_groups"]
    if len(groups) != len(optimizer.param_groups) or any(
            not isinstance(g.get("params"), list) or len(g["params"]) != len(own["params"])
            for g, own in zip(groups, optimizer.param_groups)):
        raise ConfigError(f"{state_path}: field 'optimizer_param_groups' does not match this run's "
                          "model (other groups or parameter counts); the file was edited or cut")
    tensors = load_safetensors(tensors_path)
    if "rng.torch" not in tensors or tensors["rng.torch"].dtype != torch.uint8:
        raise ConfigError(f"{tensors_path}: tensor 'rng.torch' is missing or not bytes; the file was "
                          "edited or cut")
    load_tensors_into(model.trained_state(), {n[len("model."):]: t for n, t in tensors.items()
                                              if n.startswith("model.")},
                      tensors_path, load=model.load_trained_state)
    params = [p for group in optimizer.param_groups for p in group["params"]]
    moments: dict[int, dict] = {}
    for name, tensor in tensors.items():
        if not name.startswith("optimizer."):
            continue
        _, index, key = (name.split(".", 2) + ["", ""])[:3]
        shape = () if key == "step" else tuple(params[int(index)].shape) if index.isdigit() and int(index) < len(params) else None
        if shape is None or key not in ("exp_avg", "exp_avg_sq", "step") or tuple(tensor.shape) != shape:
            raise ConfigError(f"{tensors_path}: tensor '{name}' does not fit this run's optimizer "
                              "(index, name or shape); the file was edited or cut")
        moments.setdefault(int(index), {})[key] = tensor
    try:
        optimizer.load_state_dict({"state": moments, "param_groups": groups})
        scheduler.load_state_dict({**state["scheduler"], "lr_lambdas": [None] * len(optimizer.param_groups)})
    except (ValueError, KeyError, TypeError) as err:
        raise ConfigError(f"{state_path}: the optimizer or scheduler state cannot be restored "
                          f"({err}); the file was edited or cut") from None
    torch.set_rng_state(tensors["rng.torch"])
    if "rng.cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors["rng.cuda"])
    return state
