"""Cross-entropy, mean over the rows not ignored: logits[4096, 128256] (Llama 3's vocabulary)."""

from functools import partial

import torch
import torch.nn.functional as F

from .case import IGNORE, Case, compiled, liger_ops, ligerzoo_kernel, randn, targets


def eager_cross_entropy(logits, target):
    # transformers ForCausalLMLoss: logits.float() then F.cross_entropy
    return F.cross_entropy(logits.float(), target, ignore_index=IGNORE)


def loss_and_grad_rows64(logits64, target):
    """Sum of the row losses and d(sum)/d(logits) (softmax - onehot, zero on ignored rows)."""
    valid = target != IGNORE
    tgt = target.clamp(min=0).unsqueeze(1)
    lse = torch.logsumexp(logits64, dim=-1)
    loss_sum = ((lse - logits64.gather(1, tgt).squeeze(1)) * valid).sum()
    p = torch.exp(logits64 - lse.unsqueeze(1))
    p.scatter_add_(1, tgt, -torch.ones_like(tgt, dtype=p.dtype))
    p.mul_(valid.unsqueeze(1).to(p.dtype))
    return loss_sum, p


def reference(master, chunk=1024):
    """float64 loss and its gradient, computed by hand in row chunks (a float64 [N, V] would not fit)."""
    logits, target = master["logits"], master["target"]
    n_valid = int((target != IGNORE).sum())
    dlogits = torch.empty(logits.shape, dtype=torch.float32, device=logits.device)
    loss = torch.zeros((), dtype=torch.float64, device=logits.device)
    for i in range(0, logits.shape[0], chunk):
        ls, p = loss_and_grad_rows64(logits[i : i + chunk].double(), target[i : i + chunk])
        loss += ls
        dlogits[i : i + chunk] = p / n_valid
        del p
    return {"loss": (loss / n_valid).float(), "dlogits": dlogits}


def make_inputs(n, v, dev, g):
    return {"logits": randn((n, v), dev, g, 2.0), "target": targets(n, v, dev, g)}


def bytes_moved(n, v, direction):
    # fwd: read logits. fwd+bwd (scalar loss: the grad can be made in the forward pass):
    # read logits, write dlogits.
    return 2.0 * n * v * (1 if direction == "fwd" else 2)


def build_eager():
    return lambda t: (eager_cross_entropy(t["logits"], t["target"]),)


def build_compile():
    fn = compiled(eager_cross_entropy)
    return lambda t: (fn(t["logits"], t["target"]),)


LIGER_NOTE = "liger CE: writes dlogits over the logits (in place) when they require grad"


def build_liger():
    fn = liger_ops().LigerCrossEntropyFunction
    # (_input, target, weight, ignore_index, lse_square_scale, label_smoothing, reduction, ...)
    return lambda t: (fn.apply(t["logits"], t["target"], None, IGNORE, 0.0, 0.0, "mean")[0],)


def build_ligerzoo():
    fn = ligerzoo_kernel("cross_entropy", "cross_entropy")
    return lambda t: (fn(t["logits"], t["target"], ignore_index=IGNORE),)


def cases(small: bool) -> list[Case]:
    n, v = (64, 1000) if small else (4096, 128256)
    case = Case(
        name="cross_entropy",
        label="CrossEntropy",
        shape=f"logits[{n},{v}]",
        make=partial(make_inputs, n, v),
        grad_inputs=("logits",),
        out_names=("loss",),
        peers={
            "eager": build_eager,
            "compile": build_compile,
            "liger": build_liger,
            "ligerzoo": build_ligerzoo,
        },
        reference=reference,
        work=partial(bytes_moved, n, v),
        notes=[LIGER_NOTE],
    )
    return [case]
