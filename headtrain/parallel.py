"""Data parallel training: each process takes its slice of every global batch, and the loss
is computed over the whole global batch, so N processes with batch B train exactly like one
process with batch N*B (CCC is not a sum over utterances: it needs every prediction)."""

from __future__ import annotations

import numpy as np
import torch


def local_plan(plan: list[list[int]], process: int, processes: int) -> list[list[int]]:
    """This process's slice of every global batch (batches too small to give every process
    an utterance are dropped: at most processes-1 utterances per epoch, only when N > 1)."""
    if processes == 1:
        return plan
    return [np.array_split(np.asarray(batch), processes)[process].tolist()
            for batch in plan if len(batch) >= processes]


def global_loss(loss_fn, accelerator):
    """Wrap `loss_fn(pred, true)` to see the predictions of every process, with gradients
    flowing back to each process's own slice. Every process computes the same loss, so the
    all_gather backward sums N equal gradients into each slice, and DDP's averaging over N
    processes turns that into exactly the one-process gradient."""
    if accelerator.num_processes == 1:
        return loss_fn
    import torch.distributed.nn.functional as distributed

    def loss(pred: torch.Tensor, true: torch.Tensor) -> torch.Tensor:
        sizes = accelerator.gather(torch.tensor([pred.shape[0]], device=pred.device)).tolist()
        longest = max(sizes)
        pad = longest - pred.shape[0]
        padded_pred = torch.nn.functional.pad(pred, (0, 0, 0, pad))
        padded_true = torch.nn.functional.pad(true, (0, 0, 0, pad))
        preds = distributed.all_gather(padded_pred.contiguous())
        trues = accelerator.gather(padded_true.contiguous()).reshape(len(sizes), longest, -1)
        all_pred = torch.cat([p[:n] for p, n in zip(preds, sizes)])
        all_true = torch.cat([t[:n] for t, n in zip(trues, sizes)])
        return loss_fn(all_pred, all_true)

    return loss
