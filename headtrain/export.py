"""`ser export`: a self-contained model directory that needs neither ser nor the base model.

The directory holds a transformers encoder (Wav2Vec2Model, HubertModel, WavLMModel or
Data2VecAudioModel: config.json, model.safetensors, preprocessor_config.json) with the trained
layers (LoRA merged) and the regression head (head.safetensors, ser_head.json). docs/export.md shows how to use it with transformers alone.
"""

from __future__ import annotations

from pathlib import Path

from safetensors import SafetensorError

from cachegen.errors import ConfigError, OutputError

from .run import (EXPORT_FORMAT, RUN_FORMAT_VERSION, load_run, output_lock, read_run_info, refuse_run_output,
                  save_tensors, write_json)
from .upper import merge_lora

# What an export writes (transformers' files, then ours): a folder holding any of them that is
# not an earlier export belongs to someone else.
EXPORT_FILES = ("config.json", "model.safetensors", "preprocessor_config.json", "head.safetensors",
                "ser_head.json")


def export(run_dir: str, out: str, *, model: str | None = None) -> Path:
    """Write the whole trained network of `run_dir` to `out`; returns the output path."""
    out_dir = Path(out)
    refuse_run_output(out_dir, option="--out")
    check_export_dir(out_dir)  # before loading anything; again once the folder is ours
    run = load_run(run_dir, from_audio=True, model=model)
    emotion = run.model
    merge_lora(emotion.backbone)
    backbone = emotion.backbone
    with output_lock(out_dir):  # two exports into one folder would mix their weights
        check_export_dir(out_dir)
        try:
            # ser_head.json marks a whole export: removed first, written last
            out_dir.mkdir(parents=True, exist_ok=True)
            (out_dir / "ser_head.json").unlink(missing_ok=True)
            backbone.save_pretrained(out_dir)
            run.feature_extractor.save_pretrained(out_dir)
            save_tensors({n: t.detach() for n, t in emotion.head.state_dict().items()},
                         out_dir / "head.safetensors")
            write_head(out_dir, run, backbone)
        except (OSError, SafetensorError) as err:  # safetensors' own writer raises its own type
            for name in EXPORT_FILES:  # what this export began to write: never a cut model left behind
                try:
                    (out_dir / name).unlink(missing_ok=True)
                except OSError:
                    pass
            raise OutputError(f"{out_dir}: cannot be written ({err.strerror or err}); free space or "
                              "choose a writable place") from None
    return out_dir


def write_head(out_dir: Path, run, backbone) -> None:
    write_json({
        "format": EXPORT_FORMAT, "format_version": RUN_FORMAT_VERSION,
        # how the network trained; LoRA adapters, if any, are merged into the saved weights
        "model_spec": run.spec.to_json(), "lora_merged": True, "strategy": run.spec.strategy.value,
        "targets": run.targets, "label_mean": [t.mean for t in run.target_specs],
        "label_std": [t.std for t in run.target_specs], "class_map": run.info.get("class_map"),
        "top_layers": run.spec.top_layers,
        "head": ("mean over frames of hidden_states[i] for i in model_spec.pooled_layers, summed "
                 "with weights softmax(layer_logits)" if run.spec.strategy.reads_pooled
                 else "masked mean over frames") +
                " -> Linear(D, D) -> tanh -> Linear(D, outputs); one output "
                "per dimensional target (prediction = output * label_std + label_mean) and one "
                "logit per class of a categorical target (model_spec.classes; prediction = the "
                "class of the largest)",
        "trained_from": {k: run.info.get(k) for k in ("model_id", "model_sha256", "strategy",
                                                      "cache_layer", "top_layers", "best_epoch")},
    }, out_dir / "ser_head.json")


def check_export_dir(out_dir: Path) -> None:
    """Refuse to replace files in `out_dir` that an earlier `ser export` did not write.

    Raises:
        ConfigError: naming the first such file.
    """
    present = [name for name in EXPORT_FILES if (out_dir / name).exists()]
    if not present:
        return
    try:
        exported = read_run_info(out_dir)["format"] == EXPORT_FORMAT
    except ConfigError:
        exported = False
    if not exported:
        raise ConfigError(f"--out {out_dir}: holds {present[0]}, which `ser export` did not write; "
                          "export into another folder (nothing was changed)")
