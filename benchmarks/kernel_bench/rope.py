"""RoPE on q[4, 2048, 32, 128] and k[4, 2048, 8, 128] ([B, T, H, D]), Llama 3's cos/sin tables."""

from functools import partial

import torch

from .case import BF16, Case, autograd_reference, compiled, liger_ops, ligerzoo_kernel, randn

GRAD_INPUTS = ("q", "k")
OUTPUTS = ("q_rot", "k_rot")
ROPE_THETA = 500000.0  # Llama 3


def rotate_half(x):
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def eager_rope(q, k, cos, sin):
    # transformers apply_rotary_pos_emb, in ligerzoo's [B, T, H, D] layout (HF unsqueezes dim 1
    # of [B, H, T, D]; here cos/sin [T, D] broadcast over batch and heads the same way)
    cos = cos[None, :, None, :]
    sin = sin[None, :, None, :]
    return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin


def rope64(t):
    return eager_rope(t["q"], t["k"], t["cos"], t["sin"])


def reference(master):
    return autograd_reference(master, rope64, GRAD_INPUTS, OUTPUTS)


def make_inputs(b, t, hq, hk, d, dev, g):
    inv_freq = 1.0 / (ROPE_THETA ** (torch.arange(0, d, 2, device=dev, dtype=torch.float32) / d))
    freqs = torch.outer(torch.arange(t, device=dev, dtype=torch.float32), inv_freq)
    emb = torch.cat((freqs, freqs), dim=-1)
    return {
        "q": randn((b, t, hq, d), dev, g),
        "k": randn((b, t, hk, d), dev, g),
        "cos": emb.cos().to(BF16),  # HF casts cos/sin to the activations' dtype
        "sin": emb.sin().to(BF16),
        "grad:q_rot": randn((b, t, hq, d), dev, g),
        "grad:k_rot": randn((b, t, hk, d), dev, g),
    }


def bytes_moved(b, t, hq, hk, d, direction):
    # fwd: read q, k, cos, sin; write q_rot, k_rot. bwd: the same with the gradients.
    return 2.0 * (2 * b * t * (hq + hk) * d + 2 * t * d) * (1 if direction == "fwd" else 2)


def build_eager():
    return lambda t: eager_rope(t["q"], t["k"], t["cos"], t["sin"])


def build_compile():
    fn = compiled(eager_rope)
    return lambda t: fn(t["q"], t["k"], t["cos"], t["sin"])


LIGER_NOTE = (
    "liger RoPE: given q.transpose(1, 2) / k.transpose(1, 2) views ([B,H,T,D] over [B,T,H,D] "
    "storage, as HF calls it); it rotates in place (forward into q/k, backward into the upstream grads)"
)


def build_liger():
    fn = liger_ops().LigerRopeFunction

    # Liger takes q [B, H, T, D], k [B, Hk, T, D]: we hand it the transposed views of our
    # contiguous [B, T, H, D] tensors, exactly what HF's attention passes it (q.view(B, T, H, D)
    # .transpose(1, 2)); Liger transposes back to this physical layout, so no copy is timed.
    def run(t):
        q, k = fn.apply(t["q"].transpose(1, 2), t["k"].transpose(1, 2), t["cos"], t["sin"])
        return q.transpose(1, 2), k.transpose(1, 2)

    return run


def build_ligerzoo():
    fn = ligerzoo_kernel("rope", "apply_rope")
    return lambda t: tuple(fn(t["q"], t["k"], t["cos"], t["sin"]))


def cases(small: bool) -> list[Case]:
    b, t, hq, hk, d = (2, 16, 4, 2, 32) if small else (4, 2048, 32, 8, 128)
    case = Case(
        name="rope",
        label="RoPE",
        shape=f"q[{b},{t},{hq},{d}] k[{b},{t},{hk},{d}]",
        make=partial(make_inputs, b, t, hq, hk, d),
        grad_inputs=GRAD_INPUTS,
        out_names=OUTPUTS,
        peers={
            "eager": build_eager,
            "compile": build_compile,
            "liger": build_liger,
            "ligerzoo": build_ligerzoo,
        },
        reference=reference,
        work=partial(bytes_moved, b, t, hq, hk, d),
        notes=[LIGER_NOTE],
    )
    return [case]
