"""The training loop, top to bottom: build, maybe resume, train step by step, export."""

import gc
import math
import os
import random
import signal
import sys
import time

import torch
import torch.distributed as dist

from ligerzoo.hf.hub import resolve_model_dir
from ligerzoo.hf.pretrained import from_pretrained
from ligerzoo.kernels import IGNORE_INDEX
from ligerzoo.models import ModelConfig, build_model
from ligerzoo.models.float8_weight_rows import keep_weight_rows_through_steps
from ligerzoo.tokenizer import ByteTokenizer, load_tokenizer, tokenizer_fingerprint
from ligerzoo.training.adamw import AdamW
from ligerzoo.training.blocks import prepare_blocks
from ligerzoo.training.checkpoints import complete_checkpoints, export_hf, resume_latest, save_checkpoint
from ligerzoo.training.clipping import clip_grad_norm
from ligerzoo.training.config import Config, config_warnings
from ligerzoo.training.data import build_datasets, describe_datasets
from ligerzoo.training.evaluate import evaluate
from ligerzoo.training.medusa import export_heads, medusa_flops_per_token, with_medusa_heads
from ligerzoo.training.metrics import MetricsLog, flops_per_token, peak_flops
from ligerzoo.training.output_dir import OutputDirError, claim_output_dir
from ligerzoo.training.parallel import apply_fsdp, init_distributed
from ligerzoo.training.run_record import resume_differences, run_record
from ligerzoo.training.tied_embedding import tied_lookup_gradient_as_rows

# Test hook: the process SIGKILLs itself after this step (simulates a crash at the worst moment).
KILL_AFTER_STEP_ENV = "LIGERZOO_KILL_AFTER_STEP"
# Positions per step on which each Medusa head's top-1 accuracy is estimated.
HEAD_ACCURACY_ROWS = 1024


def train(config: Config) -> None:
    rank, world_size, device = init_distributed()
    try:
        _train(config, rank, world_size, device)
    except BaseException:
        dist.destroy_process_group()
        raise
    # Every rank leaves together: a gloo rank that tears its group down while another still
    # holds it can abort at exit ("terminate called without an active exception"). So can a
    # collective's work object that a reference cycle (FSDP's modules have them) keeps alive
    # until the interpreter is shutting down: collect those first, while it still runs.
    gc.collect()
    dist.barrier()
    dist.destroy_process_group()


def _train(config: Config, rank: int, world_size: int, device: torch.device) -> None:
    train_cfg = config.train
    for warning in config_warnings(config):
        _warn(rank, warning)
    # Before anything is written: the output directory is ours alone, and holds no earlier run
    # that this one would silently replace.
    lock = _claim_output_dir(train_cfg, rank)
    try:
        _train_locked(config, rank, world_size, device)
    finally:
        if lock is not None:
            lock.release()


def _train_locked(config: Config, rank: int, world_size: int, device: torch.device) -> None:
    train_cfg, data_cfg = config.train, config.data
    _seed_everything(train_cfg.seed)

    # Build: the same weights on every rank (same seed or same checkpoint), then sharded.
    model, tokenizer, model_dir = _build_model_and_tokenizer(config, rank)
    run = run_record(config, model.config.to_dict(), tokenizer_fingerprint(tokenizer), world_size)
    model.loss_chunk_rows = train_cfg.loss_chunk_rows or None
    medusa = config.medusa.num_heads > 0
    if medusa:
        model = with_medusa_heads(model, config.medusa)
    seq_flops = (medusa_flops_per_token if medusa else flops_per_token)(model, data_cfg.seq_len)
    prepare_blocks(model, train_cfg.activation_checkpointing, train_cfg.compile, train_cfg.float8)
    sharded = apply_fsdp(model, device, getattr(torch, train_cfg.dtype), getattr(torch, train_cfg.master_dtype),
                         prefetch=train_cfg.fsdp_prefetch, reshard_after_forward=train_cfg.fsdp_reshard_after_forward)
    tied_lookup_gradient_as_rows(model)
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = AdamW(trainable, lr=train_cfg.lr, betas=train_cfg.betas, weight_decay=train_cfg.weight_decay)
    data, val_data, data_stats = build_datasets(data_cfg, tokenizer, train_cfg.seed)
    _say(rank, describe_datasets(data_stats))

    # Maybe resume from the latest checkpoint that is whole and was saved by a compatible run.
    def check_run(path, saved):
        if saved is None:
            _warn(rank, f"{path} records no settings (saved by an earlier ligerzoo): resuming unchecked")
            return
        conflicts, changes = resume_differences(saved, run)
        if conflicts:
            raise ValueError(
                f"cannot resume from {path}: this run differs in what the checkpoint holds:\n  " + "\n  ".join(conflicts)
                + f"\nRun with the checkpoint's settings, or choose another --output_dir "
                f"(or pass --train.overwrite true to delete {train_cfg.output_dir}'s run and start afresh)"
            )
        for change in changes:
            _say(rank, f"changed since the checkpoint, takes effect: {change}")

    start_step, skipped = resume_latest(train_cfg.output_dir, model, optimizer, data, check_run)
    for warning in skipped:
        _warn(rank, warning)
    _set_hyperparameters(optimizer, train_cfg)  # the checkpoint's are replaced by this run's
    if start_step:
        _say(rank, f"resumed from {train_cfg.output_dir}/checkpoints/step_{start_step:08d} (step {start_step})")
    if start_step > train_cfg.max_steps:
        raise ValueError(f"the checkpoint is at step {start_step}, past --train.max_steps {train_cfg.max_steps}; "
                         f"raise it to train on")
    if train_cfg.float8_keep_weight_rows:
        if world_size > 1:
            _warn(rank, "--train.float8_keep_weight_rows is for one rank: on several, FSDP2 gathers the "
                  "weights as FP8 rows already; ignored")
        else:
            compute_dtype = getattr(torch, train_cfg.dtype) if device.type == "cuda" else torch.float32
            keep_weight_rows_through_steps(model, optimizer, compute_dtype)
    metrics = MetricsLog(train_cfg.output_dir, train_cfg.max_steps, start_step, enabled=rank == 0)
    peak = peak_flops(device)
    kill_after = int(os.environ.get(KILL_AFTER_STEP_ENV, "0"))

    def checkpoint(step):
        save_checkpoint(train_cfg.output_dir, step, model, optimizer, data, run, keep=train_cfg.keep_checkpoints)

    for step in range(start_step + 1, train_cfg.max_steps + 1):
        started = time.perf_counter()
        micro_batches = [{k: v.to(device) for k, v in data.next_batch(data_cfg.batch_size, rank, world_size).items()}
                         for _ in range(data_cfg.grad_accum)]
        # The gradient is that of the mean over every target token of the step, on all ranks:
        # each micro-batch's mean loss is weighted by its share of the step's targets. FSDP
        # averages gradients over ranks, hence the factor world_size.
        # A micro-batch with no targets (every row a prompt cut at seq_len) has a NaN mean loss
        # and adds nothing; a step with none anywhere changes nothing but AdamW's state.
        counts = [(mb["labels"][:, 1:] != IGNORE_INDEX).sum() for mb in micro_batches]
        total = torch.stack(counts).sum().float()
        dist.all_reduce(total)
        total = total.clamp(min=1)
        loss_sum = torch.zeros((), device=device)
        head_loss_sum = torch.zeros(config.medusa.num_heads, device=device)
        for i, (mb, count) in enumerate(zip(micro_batches, counts)):
            last = i == len(micro_batches) - 1
            if sharded:
                model.set_requires_gradient_sync(last)  # reduce once per step
            extra = {"accuracy_rows": HEAD_ACCURACY_ROWS if last else 0} if medusa else {}
            out = model(mb["input_ids"], labels=mb["labels"], position_ids=mb["position_ids"], **extra)
            (out.loss * (count * world_size / total)).backward()
            loss_sum += torch.where(count > 0, out.loss.detach() * count, 0.0)
            if medusa:
                head_loss_sum += torch.where(count > 0, out.head_losses * count, 0.0)
        dist.all_reduce(loss_sum)
        step_loss = (loss_sum / total).item()
        # Clipped in the AdamW step (clipping.py).
        grad_norm = clip_grad_norm(optimizer, trainable, train_cfg.max_grad_norm).item()
        # A step that is not finite is never applied, so the weights, and every checkpoint, stay
        # as they were after the last good step.
        if not (math.isfinite(step_loss) and math.isfinite(grad_norm)):
            what = f"the loss is {step_loss}" if not math.isfinite(step_loss) else f"the gradient norm is {grad_norm}"
            raise FloatingPointError(
                f"{what} at step {step}; stopping without applying it. Lower --train.lr (or raise "
                f"--train.warmup_steps) and run again: it resumes from the last checkpoint in "
                f"{train_cfg.output_dir}/checkpoints"
            )
        lr = train_cfg.lr * _lr_factor(step - 1, train_cfg)
        for group in optimizer.param_groups:
            group["lr"] = lr
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

        tokens = world_size * data_cfg.grad_accum * data_cfg.batch_size * data_cfg.seq_len
        if device.type == "cuda":
            torch.cuda.synchronize()
        tokens_per_s = tokens / (time.perf_counter() - started)
        record = {
            "step": step, "loss": step_loss, "lr": lr, "grad_norm": grad_norm,
            "tokens_per_s": tokens_per_s,
            "mfu": None if peak is None else tokens_per_s * seq_flops / (peak * world_size),
            "peak_memory_gib": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None,
        }
        if medusa:
            record.update(_head_metrics(head_loss_sum / total, out.head_accuracies, world_size))
        if val_data is not None and (step == train_cfg.max_steps or
                                     (train_cfg.eval_every and step % train_cfg.eval_every == 0)):
            result = evaluate(model, val_data.eval_batches(data_cfg.batch_size, rank, world_size), device)
            record.update(val_loss=result["loss"], val_perplexity=result["perplexity"])
        metrics.log(record)
        if train_cfg.checkpoint_every and step % train_cfg.checkpoint_every == 0 and step < train_cfg.max_steps:
            checkpoint(step)
        if step == kill_after and rank == 0:
            os.kill(os.getpid(), signal.SIGKILL)

    metrics.close()
    if start_step < train_cfg.max_steps:
        checkpoint(train_cfg.max_steps)
    if medusa:
        target = export_heads(model, train_cfg.output_dir, base_model=config.model.name)
        _say(rank, f"Medusa heads saved to {target}")
    if not medusa or config.medusa.mode == "joint":  # a frozen trunk is the checkpoint it came from
        target = export_hf(model.base if medusa else model, train_cfg.output_dir, tokenizer, model_dir)
        _say(rank, f"exported to {target}")


def _claim_output_dir(train_cfg, rank: int):
    """Rank 0 takes the output directory (claim_output_dir); every rank learns whether it could."""
    lock, outcome = None, [None]
    if rank == 0:
        try:
            resumable = not train_cfg.overwrite and bool(complete_checkpoints(train_cfg.output_dir))
            lock, notes = claim_output_dir(train_cfg.output_dir, train_cfg.overwrite, resumable)
            for note in notes:
                _warn(rank, note)
        except (OutputDirError, OSError) as error:
            outcome = [str(error)]
    dist.broadcast_object_list(outcome, src=0)
    if outcome[0] is not None:
        raise OutputDirError(outcome[0])
    return lock


def _set_hyperparameters(optimizer, train_cfg) -> None:
    for group in optimizer.param_groups:
        group["betas"], group["weight_decay"] = train_cfg.betas, train_cfg.weight_decay


def _say(rank: int, message: str) -> None:
    if rank == 0:
        print(message, flush=True)


def _warn(rank: int, message: str) -> None:
    if rank == 0:
        print(f"warning: {message}", file=sys.stderr, flush=True)


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


def _build_model_and_tokenizer(config: Config, rank: int):
    """(model on CPU in float32, tokenizer, directory of the model fine-tuned from or None)."""
    model_cfg, tokenizer_name = config.model, config.data.tokenizer
    model_dir = None if model_cfg.name is None else resolve_model_dir(model_cfg.name)
    tokenizer_name = tokenizer_name or model_dir
    tokenizer = ByteTokenizer() if tokenizer_name in (None, "bytes") else load_tokenizer(tokenizer_name)
    if model_dir is not None:
        model = from_pretrained(model_dir, dtype=torch.float32, device="cpu")
        if tokenizer.vocab_size > model.config.vocab_size:
            raise ValueError(f"the tokenizer {tokenizer_name} has {tokenizer.vocab_size} ids but the model "
                             f"{model_cfg.name} only {model.config.vocab_size}: it is not this model's tokenizer")
    else:
        if tokenizer.vocab_size > model_cfg.vocab_size:
            padded = -(-tokenizer.vocab_size // 64) * 64
            raise ValueError(f"the tokenizer has {tokenizer.vocab_size} ids but --model.vocab_size is "
                             f"{model_cfg.vocab_size}; pass --model.vocab_size {padded} (or more)")
        # The special ids are the tokenizer's, so the export generates and stops as it trained.
        shape = {k: v for k, v in vars(model_cfg).items() if k != "name"}
        model = build_model(ModelConfig(model_type="llama", bos_token_id=tokenizer.bos_id,
                                        eos_token_id=tokenizer.eos_id, **shape), device="cpu", dtype=torch.float32)
    if config.data.seq_len > model.config.max_position_embeddings and model_dir is not None:
        _warn(rank, f"data.seq_len ({config.data.seq_len}) exceeds {model_cfg.name}'s max_position_embeddings "
                    f"({model.config.max_position_embeddings}): it is trained past its context")
    return model, tokenizer, model_dir


def _lr_factor(step: int, cfg) -> float:
    """Linear warmup to 1, then cosine decay to min_lr_ratio at max_steps."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps))
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)
