"""The loss of a model over a whole data set: the validation loss of a training run, and
`ligerzoo eval`.

The loss is the mean over every target token of the set (labels other than -100, on every rank),
the same normalisation as training's, so a validation loss and a training loss on the same rows
agree. Each batch's mean is weighted by its number of targets; a batch with none (the padding rows
that give every rank the same number of forwards) adds nothing.
"""

import math
import time
from collections.abc import Callable, Iterable

import torch
import torch.distributed as dist

from ligerzoo.kernels import IGNORE_INDEX


@torch.no_grad()
def evaluate(model, batches: Iterable[dict], device: torch.device,
             on_batch: Callable[[int, int, float], None] | None = None) -> dict:
    """{"loss", "perplexity", "tokens" (targets), "tokens_per_s" (input tokens, this rank)} of
    `model` over `batches` (dicts of input_ids, labels, position_ids), summed over all ranks when
    a process group is running. on_batch(batches done, input tokens done, seconds) reports
    progress."""
    was_training = model.training
    model.eval()
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    targets = torch.zeros((), dtype=torch.int64, device=device)
    seen, started = 0, time.perf_counter()
    for number, batch in enumerate(batches, start=1):
        batch = {name: tensor.to(device, non_blocking=True) for name, tensor in batch.items()}
        count = (batch["labels"][:, 1:] != IGNORE_INDEX).sum()
        loss = model(batch["input_ids"], labels=batch["labels"], position_ids=batch["position_ids"]).loss
        loss_sum += torch.where(count > 0, loss.double() * count, 0.0)  # no targets: a NaN mean
        targets += count
        seen += batch["input_ids"].numel()
        if on_batch is not None:
            on_batch(number, seen, time.perf_counter() - started)
    if dist.is_initialized():
        dist.all_reduce(loss_sum)
        dist.all_reduce(targets)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - started
    model.train(was_training)
    total = int(targets.item())
    if total == 0:
        raise ValueError("the evaluation data has no target tokens (every label is masked)")
    loss = loss_sum.item() / total
    return {"loss": loss, "perplexity": math.exp(min(loss, 700.0)), "tokens": total,
            "tokens_per_s": seen / max(seconds, 1e-9)}
