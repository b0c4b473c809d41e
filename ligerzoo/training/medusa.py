"""Training Medusa heads with train.py: wrapping the model, counting its FLOPs, saving the heads."""

from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

from ligerzoo.medusa import MedusaConfig, MedusaHeads, save_heads
from ligerzoo.medusa.model import MedusaModel
from ligerzoo.training.metrics import flops_per_token
from ligerzoo.training.output_dir import MEDUSA_DIR


def with_medusa_heads(model, section) -> MedusaModel:
    """The model with fresh heads (blocks as the identity, own output projections copies of the
    base head), trained as `section.mode` says."""
    config = MedusaConfig(num_heads=section.num_heads, num_layers=section.num_layers,
                          shared_output=section.shared_output)
    heads = MedusaHeads(config, model.config.hidden_size, model.config.vocab_size).to(model.output_weight.dtype)
    heads.init_weights(model.output_weight)
    return MedusaModel(model, heads, mode=section.mode, decay=section.decay, heads_weight=section.heads_weight)


def medusa_flops_per_token(model: MedusaModel, seq_len: int) -> float:
    """The trunk's count (its forward only, a third, when frozen) plus 6 FLOPs per head weight."""
    trunk = flops_per_token(model.base, seq_len)
    if model.mode == "heads":
        trunk /= 3
    heads = sum(p.numel() for p in model.heads.parameters())
    if model.heads.outputs is None:  # shared: each head multiplies by the base head's weight too
        heads += model.heads.num_heads * model.base.output_weight.numel()
    return trunk + 6 * heads


def export_heads(model: MedusaModel, output_dir: str, base_model: str | None) -> Path:
    """Gather the heads onto rank 0 and write them to <output_dir>/medusa (the base checkpoint is
    not touched)."""
    full = get_model_state_dict(model.heads, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    target = Path(output_dir) / MEDUSA_DIR
    if dist.get_rank() == 0:
        with torch.device("meta"):
            plain = MedusaHeads(model.heads.config, model.heads.hidden_size, model.heads.vocab_size)
        plain.to_empty(device="cpu")
        plain.load_state_dict(full)
        save_heads(plain, target, base_model=base_model)
    dist.barrier()
    return target
