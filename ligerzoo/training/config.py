"""The training configuration: one typed object, read from TOML, then `--section.key value` flags.

`--config`, `--max_steps`, `--output_dir` and `--checkpoint_every` are short forms of
`--config`, `--train.max_steps`, `--train.output_dir` and `--train.checkpoint_every`.
"""

import dataclasses
import math
import tomllib
import types
import typing
from dataclasses import dataclass, field


@dataclass
class ModelSection:
    name: str | None = None  # Hub repo id or local checkpoint dir to fine-tune; None: from scratch
    # The from-scratch shape (a Llama), ignored when `name` is set.
    vocab_size: int = 320  # the byte tokenizer's 258 ids, padded to a multiple of 64
    hidden_size: int = 128
    intermediate_size: int = 384
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False


@dataclass
class DataSection:
    # A .txt file (documents split at blank lines), a .jsonl file ("text"), or a .tokens file of
    # `ligerzoo prepare` (made with the same tokenizer); None: the built-in corpus.
    path: str | None = None
    tokenizer: str | None = None  # default: the model's tokenizer, or "bytes" (a from-scratch model's)
    # Chat and instruction data put only the answers in the loss; true puts the prompts back.
    train_on_prompt: bool = False
    val_path: str | None = None  # a held-out file of the same formats, for the validation loss
    val_fraction: float = 0.0  # or this fraction of the training file's examples held out (0: none)
    seq_len: int = 256
    batch_size: int = 8  # rows per micro-batch per rank
    grad_accum: int = 1  # micro-batches per step
    num_documents: int = 4000  # size of the built-in corpus


@dataclass
class TrainSection:
    output_dir: str = "runs/default"
    max_steps: int = 200
    checkpoint_every: int = 100  # 0: only the final checkpoint and export
    eval_every: int = 0  # steps between validation losses (0: only the final one), with data.val_*
    keep_checkpoints: int = 0  # the newest N checkpoints are kept, older ones deleted; 0: keep all
    # Start afresh in an output_dir that holds an earlier run (its checkpoints, metrics and export
    # are deleted); without it such a directory is resumed from, or refused if it cannot be.
    overwrite: bool = False
    lr: float = 3e-3
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio
    warmup_steps: int = 20
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    max_grad_norm: float = 1.0
    activation_checkpointing: str = "off"  # off | full | keep-attention | selective (blocks.py)
    compile: bool = False
    # off | rowwise | tensorwise: the blocks' linear layers (and Mixtral's experts, rowwise under
    # either) multiply in FP8 (models/float8.py); weights, optimizer state, checkpoints and the
    # export keep their dtype.
    float8: str = "off"
    # Rowwise on one rank: cast each block weight to its FP8 rows once after every optimizer step and
    # keep them (1 byte a block parameter, all the time), instead of at every forward, recomputation
    # and backward (models/float8_weight_rows.py). Several ranks gather FP8 rows instead.
    float8_keep_weight_rows: bool = False
    # Rows of logits the fused loss makes at a time, a [rows, vocab] buffer (0: as many as 126 MiB
    # hold, 512 of a 128,256-entry vocabulary in bf16). More rows pass over the head's weight
    # gradient fewer times: 2048 made an FP8 Llama-3.2-1B step 4% faster, for 375 MiB more at
    # the peak without activation checkpointing and none with it (benchmarks/RESULTS.md).
    loss_chunk_rows: int = 0
    dtype: str = "bfloat16"  # parameter and compute dtype on the GPU (CPU runs in float32)
    # The sharded weights AdamW updates, and its state, on the GPU: float32 (master weights, 16
    # bytes a parameter with the gradient and AdamW state) or bfloat16 (8 bytes: leaner, less exact).
    master_dtype: str = "float32"
    # FSDP2 on several GPUs: how many blocks ahead each block starts the all-gathers (0: FSDP2's
    # own order), and whether a block's parameters are freed between its forward and backward.
    fsdp_prefetch: int = 0
    fsdp_reshard_after_forward: bool = True
    seed: int = 0


@dataclass
class MedusaSection:
    num_heads: int = 0  # Medusa heads to train (0: none); head k predicts the token k+1 after the next
    num_layers: int = 1  # residual blocks per head
    shared_output: bool = False  # heads use the base model's output projection instead of their own
    mode: str = "heads"  # heads: trunk frozen, heads only (Medusa-1); joint: trunk and heads (Medusa-2)
    decay: float = 0.8  # head k's loss weighted by decay ** (k - 1)
    heads_weight: float = 0.2  # joint: loss = base loss + heads_weight * the heads' weighted losses


@dataclass
class Config:
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    train: TrainSection = field(default_factory=TrainSection)
    medusa: MedusaSection = field(default_factory=MedusaSection)


FLOAT32_MAX = 3.4028234663852886e38

SHORT_FLAGS = {"max_steps": "train.max_steps", "output_dir": "train.output_dir",
               "checkpoint_every": "train.checkpoint_every"}


def load_config(argv: list[str]) -> Config:
    """Parse `[--config FILE] [--section.key value | --section.key=value ...]` into a Config."""
    pairs = _pairs(argv)
    config = Config()
    for key, value in pairs:
        if key == "config":
            with open(value, "rb") as file:
                for section, values in tomllib.load(file).items():
                    if not isinstance(values, dict):
                        raise ValueError(f"{value}: top-level key {section!r} must be a [section]")
                    for name, item in values.items():
                        _set(config, f"{section}.{name}", item, from_text=False)
    for key, value in pairs:
        if key != "config":
            _set(config, SHORT_FLAGS.get(key, key), value, from_text=True)
    problems = config_problems(config)
    if problems:
        raise ValueError("bad settings:\n  " + "\n  ".join(problems) if len(problems) > 1 else problems[0])
    return config


def config_problems(config: Config) -> list[str]:
    """Every setting outside its range, each as "--section.key VALUE: what is allowed"."""
    problems = []

    def require(ok: bool, key: str, allowed: str) -> None:
        if not ok:
            section, _, name = key.partition(".")
            problems.append(f"--{key} {getattr(getattr(config, section), name)!r}: {allowed}")

    model, data, train, medusa = config.model, config.data, config.train, config.medusa
    require(model.name is None or model.name.strip() != "", "model.name", "a Hub repo id or a directory")
    for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                 "num_key_value_heads", "max_position_embeddings"):
        require(getattr(model, name) >= 1, f"model.{name}", "a positive integer")
    if model.num_attention_heads >= 1 and model.num_key_value_heads >= 1:
        require(model.hidden_size % model.num_attention_heads == 0, "model.hidden_size",
                f"a multiple of model.num_attention_heads ({model.num_attention_heads})")
        require(model.num_attention_heads % model.num_key_value_heads == 0, "model.num_key_value_heads",
                f"a divisor of model.num_attention_heads ({model.num_attention_heads})")
    require(data.path is None or data.path.strip() != "", "data.path", "a file, or none for the built-in corpus")
    require(data.tokenizer is None or data.tokenizer.strip() != "", "data.tokenizer",
            "a Hub repo id, a directory or file, or 'bytes'")
    require(data.seq_len >= 2, "data.seq_len", "2 or more tokens a row (each row predicts its next tokens)")
    require(data.val_path is None or data.val_path.strip() != "", "data.val_path", "a file, or none")
    require(0 <= data.val_fraction < 1, "data.val_fraction", "a fraction of the examples, in [0, 1)")
    if data.val_path is not None and data.val_fraction > 0:
        problems.append(f"--data.val_path and --data.val_fraction {data.val_fraction} both given: choose one")
    for name in ("batch_size", "grad_accum", "num_documents"):
        require(getattr(data, name) >= 1, f"data.{name}", "a positive integer")
    require(train.output_dir.strip() != "", "train.output_dir", "a directory to write the run into")
    require(train.max_steps >= 1, "train.max_steps", "a positive number of steps")
    require(train.checkpoint_every >= 0, "train.checkpoint_every", "steps between checkpoints, or 0 for none "
            "but the final one")
    require(train.eval_every >= 0, "train.eval_every", "steps between validations, or 0 for the final one only")
    require(train.keep_checkpoints >= 0, "train.keep_checkpoints", "how many checkpoints to keep, or 0 for all")
    require(0 < train.lr < FLOAT32_MAX, "train.lr", "a positive learning rate (the optimizer holds it as a float32)")
    require(0 <= train.min_lr_ratio <= 1, "train.min_lr_ratio", "a fraction of train.lr, from 0 to 1")
    require(train.warmup_steps >= 0, "train.warmup_steps", "0 or more steps")
    require(0 <= train.weight_decay < math.inf, "train.weight_decay", "0 or more")
    require(len(train.betas) == 2 and all(0 <= b < 1 for b in train.betas), "train.betas",
            "two numbers in [0, 1), as --train.betas 0.9,0.95")
    require(0 < train.max_grad_norm, "train.max_grad_norm", "a positive gradient norm to clip at (inf: no "
            "clipping); 0 would zero every update")
    require(train.activation_checkpointing in ("off", "full", "keep-attention", "selective"),
            "train.activation_checkpointing", "'off', 'full', 'keep-attention' or 'selective'")
    require(train.float8 in ("off", "rowwise", "tensorwise"), "train.float8", "'off', 'rowwise' or 'tensorwise'")
    require(not train.float8_keep_weight_rows or train.float8 == "rowwise", "train.float8_keep_weight_rows",
            "false unless --train.float8 is rowwise (it keeps the rowwise casts)")
    require(train.loss_chunk_rows >= 0, "train.loss_chunk_rows", "a positive number of rows, or 0 for the "
            "default (as many as 126 MiB of logits hold)")
    for name in ("dtype", "master_dtype"):
        require(getattr(train, name) in ("float32", "bfloat16", "float16"), f"train.{name}",
                "'float32', 'bfloat16' or 'float16'")
    require(train.fsdp_prefetch >= 0, "train.fsdp_prefetch", "blocks to gather ahead, 0 or more")
    require(0 <= train.seed < 2**63, "train.seed", "an integer from 0 to 2**63 - 1")
    require(medusa.num_heads >= 0, "medusa.num_heads", "0 (no heads) or more")
    require(medusa.num_layers >= 1, "medusa.num_layers", "a positive number of blocks a head")
    require(medusa.mode in ("heads", "joint"), "medusa.mode", "'heads' (trunk frozen) or 'joint'")
    require(0 < medusa.decay <= 1, "medusa.decay", "a weight ratio in (0, 1]")
    require(0 <= medusa.heads_weight < math.inf, "medusa.heads_weight", "0 or more")
    return problems


def config_warnings(config: Config) -> list[str]:
    """Settings that are legal but most likely not what was meant."""
    warnings, train = [], config.train
    if train.warmup_steps >= train.max_steps:
        warnings.append(f"train.warmup_steps ({train.warmup_steps}) is not shorter than the run "
                        f"(train.max_steps {train.max_steps}): the learning rate never reaches train.lr")
    if train.checkpoint_every > train.max_steps:
        warnings.append(f"train.checkpoint_every ({train.checkpoint_every}) exceeds train.max_steps "
                        f"({train.max_steps}): only the final checkpoint is written")
    if train.eval_every and config.data.val_path is None and config.data.val_fraction == 0:
        warnings.append("train.eval_every is set but there is no validation data: pass --data.val_path FILE "
                        "or --data.val_fraction F")
    if config.model.name is None and config.data.seq_len > config.model.max_position_embeddings:
        warnings.append(f"data.seq_len ({config.data.seq_len}) exceeds model.max_position_embeddings "
                        f"({config.model.max_position_embeddings}): the model is trained past its context")
    return warnings


def _pairs(argv: list[str]) -> list[tuple[str, str]]:
    pairs, i = [], 0
    while i < len(argv):
        arg = argv[i]
        if not arg.startswith("--"):
            raise ValueError(f"unexpected argument {arg!r}: flags look like --section.key value")
        if "=" in arg:
            key, value = arg[2:].split("=", 1)
            i += 1
        elif i + 1 < len(argv):
            key, value = arg[2:], argv[i + 1]
            i += 2
        else:
            raise ValueError(f"flag {arg} has no value")
        pairs.append((key, value))
    return pairs


def _set(config: Config, dotted: str, value, from_text: bool) -> None:
    section_name, _, name = dotted.partition(".")
    section = getattr(config, section_name, None)
    names = {f.name for f in dataclasses.fields(section)} if dataclasses.is_dataclass(section) else set()
    if name not in names:
        known = sorted(f"{s.name}.{f.name}" for s in dataclasses.fields(Config)
                       for f in dataclasses.fields(getattr(config, s.name)))
        raise ValueError(f"unknown setting {dotted!r}; known: {', '.join(known)}")
    hint = typing.get_type_hints(type(section))[name]
    setattr(section, name, _coerce(value, hint, dotted) if from_text else _check(value, hint, dotted))


def _coerce(text: str, hint, key: str):
    """The value of a command-line string for a field of type `hint`."""
    options = typing.get_args(hint) if isinstance(hint, types.UnionType) else (hint,)
    if type(None) in options and text.lower() in ("none", "null"):
        return None
    base = next(t for t in options if t is not type(None))
    try:
        if base is bool:
            if text.lower() not in ("true", "false", "1", "0"):
                raise ValueError
            return text.lower() in ("true", "1")
        if typing.get_origin(base) is tuple:
            return tuple(float(part) for part in text.split(","))
        return base(text)
    except ValueError:
        raise ValueError(f"--{key} {text!r} is not a valid {getattr(base, '__name__', base)}") from None


def _check(value, hint, key: str):
    """A TOML value, checked against the field's type (ints are accepted for floats)."""
    options = typing.get_args(hint) if isinstance(hint, types.UnionType) else (hint,)
    for option in options:
        origin = typing.get_origin(option) or option
        if origin is tuple and isinstance(value, list):
            return tuple(float(v) for v in value)
        if option is float and isinstance(value, int) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, origin) and not (origin is int and isinstance(value, bool)):
            return value
    raise ValueError(f"{key} = {value!r} in the config file: expected {hint}")
