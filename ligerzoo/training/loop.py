"""The training loop, top to bottom: build, maybe resume, train step by step, export."""

import gc
import math
import os
import random
import signal
import time

import torch
import torch.distributed as dist

from ligerzoo.checkpoint import from_pretrained
from ligerzoo.models import ModelConfig, build_model
from ligerzoo.tokenizer import load_tokenizer
from ligerzoo.training.checkpointing import export_hf, latest_checkpoint, load_checkpoint, save_checkpoint
from ligerzoo.training.config import Config
from ligerzoo.training.data import IGNORE_INDEX, ByteTokenizer, build_data
from ligerzoo.training.medusa import export_heads, medusa_flops_per_token, with_medusa_heads
from ligerzoo.training.metrics import MetricsLog, flops_per_token, peak_flops
from ligerzoo.training.parallel import (
    apply_fsdp, init_distributed, prepare_blocks,
)

# Test hook: the process SIGKILLs itself after this step (simulates a crash at the worst moment).
KILL_AFTER_STEP_ENV = "LIGERZOO_KILL_AFTER_STEP"
# Positions per step on which each Medusa head's top-1 accuracy is estimated.
HEAD_ACCURACY_ROWS = 1024


def train(config: Config) -> None:
    rank, world_size, device = init_distributed()
    _train(config, rank, world_size, device)
    # Every rank leaves together: a gloo rank that tears its group down while another still
    # holds it can abort at exit ("terminate called without an active exception"). So can a
    # collective's work object that a reference cycle (FSDP's modules have them) keeps alive
    # until the interpreter is shutting down: collect those first, while it still runs.
    gc.collect()
    dist.barrier()
    dist.destroy_process_group()


def _train(config: Config, rank: int, world_size: int, device: torch.device) -> None:
    train_cfg, data_cfg = config.train, config.data
    _seed_everything(train_cfg.seed)

    # Build: the same weights on every rank (same seed or same checkpoint), then sharded.
    model, tokenizer, tokenizer_dir = _build_model_and_tokenizer(config)
    medusa = config.medusa.num_heads > 0
    if medusa:
        model = with_medusa_heads(model, config.medusa)
    seq_flops = (medusa_flops_per_token if medusa else flops_per_token)(model, data_cfg.seq_len)
    prepare_blocks(model, train_cfg.activation_checkpointing, train_cfg.compile)
    sharded = apply_fsdp(model, device, getattr(torch, train_cfg.dtype), getattr(torch, train_cfg.master_dtype),
                         prefetch=train_cfg.fsdp_prefetch, reshard_after_forward=train_cfg.fsdp_reshard_after_forward)
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=train_cfg.lr, betas=train_cfg.betas,
                                  weight_decay=train_cfg.weight_decay, fused=device.type == "cuda")
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: _lr_factor(step, train_cfg))
    data = build_data(data_cfg, tokenizer, train_cfg.seed)

    # Maybe resume from the latest complete checkpoint.
    start_step = 0
    checkpoint = latest_checkpoint(train_cfg.output_dir)
    if checkpoint is not None:
        start_step = load_checkpoint(checkpoint, model, optimizer, scheduler, data)
        if rank == 0:
            print(f"resumed from {checkpoint} (step {start_step})", flush=True)
    metrics = MetricsLog(train_cfg.output_dir, train_cfg.max_steps, start_step, enabled=rank == 0)
    peak = peak_flops(device)
    kill_after = int(os.environ.get(KILL_AFTER_STEP_ENV, "0"))

    for step in range(start_step + 1, train_cfg.max_steps + 1):
        started = time.perf_counter()
        micro_batches = [{k: v.to(device) for k, v in data.next_batch(data_cfg.batch_size, rank, world_size).items()}
                         for _ in range(data_cfg.grad_accum)]
        # The gradient is that of the mean over every target token of the step, on all ranks:
        # each micro-batch's mean loss is weighted by its share of the step's targets. FSDP
        # averages gradients over ranks, hence the factor world_size.
        counts = [(mb["labels"][:, 1:] != IGNORE_INDEX).sum() for mb in micro_batches]
        total = torch.stack(counts).sum().float()
        dist.all_reduce(total)
        loss_sum = torch.zeros((), device=device)
        head_loss_sum = torch.zeros(config.medusa.num_heads, device=device)
        for i, (mb, count) in enumerate(zip(micro_batches, counts)):
            last = i == len(micro_batches) - 1
            if sharded:
                model.set_requires_gradient_sync(last)  # reduce once per step
            extra = {"accuracy_rows": HEAD_ACCURACY_ROWS if last else 0} if medusa else {}
            out = model(mb["input_ids"], labels=mb["labels"], position_ids=mb["position_ids"], **extra)
            (out.loss * (count * world_size / total)).backward()
            loss_sum += out.loss.detach() * count
            if medusa:
                head_loss_sum += out.head_losses * count
        dist.all_reduce(loss_sum)
        step_loss = (loss_sum / total).item()
        if not math.isfinite(step_loss):
            raise FloatingPointError(
                f"the loss is {step_loss} at step {step}; stopping without an update. Lower train.lr, "
                f"or resume from the last checkpoint in {train_cfg.output_dir}/checkpoints"
            )
        grad_norm = torch.nn.utils.clip_grad_norm_(trainable, train_cfg.max_grad_norm)
        grad_norm = grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm
        lr = scheduler.get_last_lr()[0]
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()

        tokens = world_size * data_cfg.grad_accum * data_cfg.batch_size * data_cfg.seq_len
        if device.type == "cuda":
            torch.cuda.synchronize()
        tokens_per_s = tokens / (time.perf_counter() - started)
        record = {
            "step": step, "loss": step_loss, "lr": lr, "grad_norm": grad_norm.item(),
            "tokens_per_s": tokens_per_s,
            "mfu": None if peak is None else tokens_per_s * seq_flops / (peak * world_size),
            "peak_memory_gib": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None,
        }
        if medusa:
            record.update(_head_metrics(head_loss_sum / total, out.head_accuracies, world_size))
        metrics.log(record)
        if train_cfg.checkpoint_every and step % train_cfg.checkpoint_every == 0 and step < train_cfg.max_steps:
            save_checkpoint(train_cfg.output_dir, step, model, optimizer, scheduler, data)
        if step == kill_after and rank == 0:
            os.kill(os.getpid(), signal.SIGKILL)

    metrics.close()
    save_checkpoint(train_cfg.output_dir, train_cfg.max_steps, model, optimizer, scheduler, data)
    if medusa:
        target = export_heads(model, train_cfg.output_dir, base_model=config.model.name)
        if rank == 0:
            print(f"Medusa heads saved to {target}", flush=True)
    if not medusa or config.medusa.mode == "joint":  # a frozen trunk is the checkpoint it came from
        export_hf(model.base if medusa else model, train_cfg.output_dir, tokenizer_dir)
        if rank == 0:
            print(f"exported to {train_cfg.output_dir}/hf", flush=True)


def _head_metrics(head_losses: torch.Tensor, head_accuracies: torch.Tensor, world_size: int) -> dict:
    """medusa_loss_k (over the step's tokens on every rank) and medusa_acc_k (the mean over
    ranks of each rank's estimate on its last micro-batch), k = 1..K."""
    dist.all_reduce(head_losses)
    accuracies = head_accuracies.clone()
    dist.all_reduce(accuracies)
    accuracies /= world_size
    record = {}
    for k, (loss, accuracy) in enumerate(zip(head_losses.tolist(), accuracies.tolist()), start=1):
        record[f"medusa_loss_{k}"], record[f"medusa_acc_{k}"] = loss, accuracy
    return record


def _build_model_and_tokenizer(config: Config):
    """(model on CPU in float32, tokenizer, directory of the tokenizer files or None)."""
    model_cfg, tokenizer_name = config.model, config.data.tokenizer
    if model_cfg.name is not None:
        model = from_pretrained(model_cfg.name, dtype=torch.float32, device="cpu")
        tokenizer_name = tokenizer_name or model_cfg.name
    else:
        bytes_ = ByteTokenizer()
        shape = {k: v for k, v in vars(model_cfg).items() if k != "name"}
        model = build_model(ModelConfig(model_type="llama", bos_token_id=bytes_.bos_id,
                                        eos_token_id=bytes_.eos_id, **shape), device="cpu", dtype=torch.float32)
    if tokenizer_name in (None, "bytes"):
        return model, ByteTokenizer(), None
    tokenizer = load_tokenizer(tokenizer_name)
    if tokenizer.vocab_size > model.config.vocab_size:
        raise ValueError(f"the tokenizer has {tokenizer.vocab_size} ids but the model's vocab_size is "
                         f"{model.config.vocab_size}")
    return model, tokenizer, tokenizer.path.parent


def _lr_factor(step: int, cfg) -> float:
    """Linear warmup to 1, then cosine decay to min_lr_ratio at max_steps."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps))
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)
