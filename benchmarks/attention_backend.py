"""Which attention kernels the models run on the GPU at bf16: profiles one forward+backward of a
small Llama (plain causal: SDPA), a Llama with packed documents and a Mistral whose window is
shorter than the sequence (both flex_attention with a block mask), and prints the attention
kernels' names. Needs a CUDA GPU."""

import torch
from torch.profiler import ProfilerActivity, profile

from ligerzoo.models import ModelConfig, build_model

BASE = dict(vocab_size=1024, hidden_size=512, intermediate_size=1024, num_hidden_layers=2,
            num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=4096)


def attention_kernels(model, position_ids=None, seq_len=2048):
    ids = torch.randint(0, 1024, (2, seq_len), device="cuda")
    for _ in range(2):  # the second pass runs compiled flex kernels, not their compilation
        model(ids, labels=ids, position_ids=position_ids).loss.backward()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        model(ids, labels=ids, position_ids=position_ids).loss.backward()
        torch.cuda.synchronize()
    names = {e.key for e in prof.key_averages()}
    return sorted(n for n in names if any(s in n.lower() for s in ("flash", "attention", "fmha", "flex", "sdpa", "efficient")))


if __name__ == "__main__":
    llama = build_model(ModelConfig.from_dict({"model_type": "llama", **BASE}), device="cuda", dtype=torch.bfloat16)
    print("llama, causal:", attention_kernels(llama))
    positions = torch.cat([torch.arange(1024), torch.arange(1024)]).cuda()[None]
    print("llama, two packed documents:", attention_kernels(llama, positions))
    mistral = build_model(ModelConfig.from_dict({"model_type": "mistral", "sliding_window": 512, **BASE}),
                          device="cuda", dtype=torch.bfloat16)
    print("mistral, window 512 < 2048:", attention_kernels(mistral))
