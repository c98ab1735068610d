"""The training loop: one function for every strategy (they differ in model and batches)."""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterable

import torch

from cachegen.errors import SerError

from .metrics import format_metrics

log = logging.getLogger(__name__)
MAX_BAD_STEPS = 20  # consecutive non-finite losses before training stops


class TrainingDiverged(SerError):
    """The loss stayed NaN/Inf."""


def make_optimizer(model, *, lr: float, head_lr: float, weight_decay: float, warmup_steps: int,
                   total_steps: int):
    """AdamW over what learns (the head at `head_lr`, the rest at `lr`) and a linear schedule with
    warm-up: (optimizer, scheduler)."""
    from transformers import get_linear_schedule_with_warmup

    head = [p for n, p in model.named_parameters() if p.requires_grad and n.startswith("head.")]
    body = [p for n, p in model.named_parameters() if p.requires_grad and not n.startswith("head.")]
    optimizer = torch.optim.AdamW([{"params": body, "lr": lr}, {"params": head, "lr": head_lr}],
                                  weight_decay=weight_decay)
    return optimizer, get_linear_schedule_with_warmup(optimizer, warmup_steps, total_steps)


def train_step(batch, *, model, optimizer, scheduler, accelerator, loss_fn: Callable, clip: float):
    """One optimisation step on a batch already on the device: forward (autocast), loss,
    backward, gradient clipping, optimizer and scheduler step. Returns the loss, or None when it
    was NaN/Inf (then nothing is updated)."""
    with accelerator.autocast():
        pred = model(batch.inputs, batch.mask)  # (B, targets)
    loss = loss_fn(pred, batch.targets)
    if not torch.isfinite(loss):
        optimizer.zero_grad(set_to_none=True)
        return None
    accelerator.backward(loss)
    if clip:
        accelerator.clip_grad_norm_(model.parameters(), clip)
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return loss


def fit(*, model, optimizer, scheduler, accelerator, loss_fn: Callable, epochs: int, clip: float,
        train_batches: Callable[[int], Iterable], evaluate: Callable[[], dict],
        on_epoch: Callable[[dict, bool], None], early_stop: int | None = None,
        start_epoch: int = 0, best: float = -math.inf, stale: int = 0, progress: bool = True,
        steps_per_epoch: int | None = None) -> list[dict]:
    """prepare'd model/optimizer/scheduler -> for epoch: for batch: forward, backward, clip,
    step -> evaluate dev -> on_epoch(record, improved). Returns the per-epoch records.

    Each record carries `epochs_without_gain`, the early-stopping count: a resumed run passes
    the last record's as `stale` (with its `best` score) and stops exactly where an
    uninterrupted one would.

    A step whose loss is NaN/Inf is skipped (no update); MAX_BAD_STEPS in a row, or weights
    that are NaN/Inf at the end of an epoch, raise TrainingDiverged, so a NaN never reaches a
    checkpoint.
    """
    from tqdm import tqdm

    history, bad_in_a_row = [], 0
    for epoch in range(start_epoch, epochs):
        if early_stop and stale >= early_stop:
            if accelerator.is_main_process:
                log.info("early stop: dev score did not improve for %d epochs", stale)
            break
        model.train()
        started, seen, loss_sum, steps, skipped = time.perf_counter(), 0, 0.0, 0, 0
        bar = tqdm(train_batches(epoch), desc=f"epoch {epoch + 1}/{epochs}", unit="batch",
                   total=steps_per_epoch, dynamic_ncols=True,
                   disable=not progress or not accelerator.is_main_process, leave=False)
        for batch in bar:
            loss = train_step(batch, model=model, optimizer=optimizer, scheduler=scheduler,
                              accelerator=accelerator, loss_fn=loss_fn, clip=clip)
            if loss is None:
                skipped += 1
                bad_in_a_row += 1
                if bad_in_a_row >= MAX_BAD_STEPS:
                    raise TrainingDiverged(
                        f"loss was NaN/Inf for {bad_in_a_row} steps in a row (epoch {epoch + 1}); "
                        "lower --lr, try --amp bf16 or no, and check the labels; the best "
                        "checkpoint so far is kept")
                continue
            bad_in_a_row = 0
            loss_sum += loss.item()
            steps += 1
            seen += len(batch.ids)
            bar.set_postfix(loss=f"{loss.item():.4f}", refresh=False)
        seconds = time.perf_counter() - started
        broken = [name for name, p in model.named_parameters() if p.requires_grad and not torch.isfinite(p).all()]
        if broken:  # a finite loss can still step the weights to Inf (a huge --lr): they stay broken
            raise TrainingDiverged(
                f"the weights became NaN/Inf in epoch {epoch + 1} ({broken[0]}"
                f"{f' and {len(broken) - 1} more' if len(broken) > 1 else ''}); lower --lr, "
                "--head-lr or --weight-decay; the best checkpoint so far is kept")
        seen = int(accelerator.reduce(torch.tensor(seen, device=accelerator.device), "sum"))
        dev = evaluate()
        record = {"epoch": epoch + 1, "train_loss": loss_sum / steps if steps else None,
                  "dev": dev["metrics"], "dev_mean": dev["mean"], "dev_score": dev["score"],
                  "seconds": seconds,
                  "utterances_per_second": seen / seconds if seconds else None,
                  "skipped_steps": skipped, "lr": scheduler.get_last_lr()[0]}
        improved = math.isfinite(dev["score"]) and dev["score"] > best
        if improved:
            best, stale = dev["score"], 0
        else:
            stale += 1
        record["epochs_without_gain"] = stale
        history.append(record)
        on_epoch(record, improved)
        if accelerator.is_main_process:
            log.info("epoch %d/%d: train loss %s, dev %s (score %.3f)%s, %.1f s, %.1f utt/s",
                     epoch + 1, epochs, f"{record['train_loss']:.4f}" if steps else "n/a",
                     format_metrics(dev["metrics"]), dev["score"], " *best*" if improved else "", seconds,
                     record["utterances_per_second"] or 0)
    return history
