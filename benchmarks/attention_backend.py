"""Which attention kernels the models run on the GPU at bf16: profiles one forward+backward of a
small Llama (plain causal: SDPA), a Llama with packed documents and a Mistral whose window is
shorter than the sequence (both flex_attention with a block mask), and prints the attention
kernels' names. With --time: causal attention at the training benchmark's shapes (Llama-3.2-1B,
seq 4096 x 4; Llama-3.1-8B, seq 8192 x 1), forward and forward + backward, through each of SDPA's
backends and flex_attention, in the layout the models hand them ([B, T, H, D] storage seen as
[B, H, T, D]). Needs a CUDA GPU."""

import argparse
import contextlib

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.attention.flex_attention import create_block_mask, flex_attention
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


# (batch, seq, query heads, key/value heads, head dim)
TIMED_SHAPES = {"llama-1b": (4, 4096, 32, 8, 64), "llama-8b": (1, 8192, 32, 8, 128)}
SDPA_BACKENDS = {"sdpa (its own choice)": None, "sdpa cudnn": SDPBackend.CUDNN_ATTENTION,
                 "sdpa flash": SDPBackend.FLASH_ATTENTION, "sdpa efficient": SDPBackend.EFFICIENT_ATTENTION}


def time_backends(batch, seq, n_heads, n_kv_heads, head_dim) -> None:
    from triton.testing import do_bench

    def operand(heads):
        t = torch.randn(batch, seq, heads, head_dim, device="cuda", dtype=torch.bfloat16)
        return t.transpose(1, 2).requires_grad_()

    q, k, v = operand(n_heads), operand(n_kv_heads), operand(n_kv_heads)
    grad = torch.randn_like(q)
    causal = create_block_mask(lambda b, h, q_index, kv_index: kv_index <= q_index, None, None, seq, seq,
                               device="cuda")
    compiled_flex = torch.compile(flex_attention)

    def sdpa(backend):
        def call():
            with sdpa_kernel([backend]) if backend is not None else contextlib.nullcontext():
                return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        return call

    calls = {name: sdpa(backend) for name, backend in SDPA_BACKENDS.items()}
    calls["flex_attention (compiled)"] = lambda: compiled_flex(q, k, v, block_mask=causal, enable_gqa=True)
    forward_flop = 2 * batch * n_heads * seq * seq * head_dim  # causal: half of 4 B H T^2 D
    print(f"B {batch}, T {seq}, {n_heads} query and {n_kv_heads} key/value heads of {head_dim}:")
    for name, call in calls.items():
        try:
            call().backward(grad)  # compiles and checks that the backend takes these inputs
        except RuntimeError as error:
            print(f"  {name:26s} not available: {str(error).splitlines()[0][:100]}")
            continue

        def forward_backward(call=call):
            call().backward(grad)

        forward_ms = do_bench(call, warmup=5, rep=40)
        both_ms = do_bench(forward_backward, warmup=5, rep=40, grad_to_none=[q, k, v])
        print(f"  {name:26s} forward {forward_ms:6.3f} ms ({forward_flop / forward_ms / 1e9:4.0f} TFLOP/s), "
              f"forward + backward {both_ms:6.3f} ms ({3.5 * forward_flop / both_ms / 1e9:4.0f} TFLOP/s)")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--time", action="store_true", help="time the backends at the training shapes")
    if parser.parse_args().time:
        for shape in TIMED_SHAPES.values():
            time_backends(*shape)
        raise SystemExit
    llama = build_model(ModelConfig.from_dict({"model_type": "llama", **BASE}), device="cuda", dtype=torch.bfloat16)
    print("llama, causal:", attention_kernels(llama))
    positions = torch.cat([torch.arange(1024), torch.arange(1024)]).cuda()[None]
    print("llama, two packed documents:", attention_kernels(llama, positions))
    mistral = build_model(ModelConfig.from_dict({"model_type": "mistral", "sliding_window": 512, **BASE}),
                          device="cuda", dtype=torch.bfloat16)
    print("mistral, window 512 < 2048:", attention_kernels(mistral))
