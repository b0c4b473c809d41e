"""The `ligerzoo` command.

    ligerzoo download MODEL [--revision R] [--no-weights] [--no-tokenizer]
    ligerzoo generate MODEL "prompt" [--max-new-tokens N] [--temperature T] [--top-k K] [--top-p P]
                      [--seed S] [--dtype bf16] [--device cuda] [--chat] [--chat-format F]
                      [--medusa DIR [--medusa-tree NAME]]
    ligerzoo chat MODEL [--system TEXT] [--max-new-tokens N] [--temperature T] [--top-k K] [--top-p P]
                  [--seed S] [--dtype bf16] [--device cuda] [--chat-format F]
    ligerzoo eval MODEL --data FILE [--seq-len N] [--batch-size B] [--train-on-prompt] [--dtype] [--device]
    ligerzoo plot DIR [--out PATH.png|.svg|.pdf|.jpg|...]
    ligerzoo prepare INPUT [INPUT ...] --output PATH.tokens [--tokenizer NAME_OR_DIR]

MODEL is a local checkpoint directory or a Hugging Face Hub repo id. Generated text goes to
stdout as it is produced; progress, timings and errors go to stderr. DIR is a training run's
output directory (the one holding metrics.jsonl). Each command imports what it
uses when it runs.
"""

from __future__ import annotations

import argparse
import re
import sys
import time
from collections.abc import Iterator
from pathlib import Path

# ligerzoo.medusa.tree.TREES' names, here so that parsing the arguments imports nothing heavy.
TREE_NAMES = ("chain", "small", "mc_sim_7b_63")
DEFAULT_EVAL_SEQ_LEN = 2048
DTYPES = {"bf16": "bfloat16", "bfloat16": "bfloat16", "fp16": "float16", "float16": "float16",
          "fp32": "float32", "float32": "float32"}
# How a file of each image format `plot` writes begins (matplotlib's savefig format is the suffix):
# an existing file at the output path is replaced only if it is such an image, an earlier plot.
IMAGE_SIGNATURES = {
    ".png": rb"\x89PNG\r\n\x1a\n", ".jpg": rb"\xff\xd8\xff", ".jpeg": rb"\xff\xd8\xff",
    ".svg": rb"(<\?xml[^>]*>\s*)?(<!DOCTYPE svg|<svg)", ".svgz": rb"\x1f\x8b", ".pdf": rb"%PDF-",
    ".eps": rb"%!PS-Adobe", ".ps": rb"%!PS-Adobe", ".gif": rb"GIF8[79]a", ".webp": rb"RIFF.{4}WEBP",
    ".tif": rb"II\*\x00|MM\x00\*", ".tiff": rb"II\*\x00|MM\x00\*",
}


def main(argv: list[str] | None = None) -> int:
    """Run the command line `argv` (default: sys.argv[1:]); returns the exit status."""
    args = _parser().parse_args(argv)
    try:
        return args.command(args)
    except (ValueError, OSError) as error:  # bad input: the package's errors say what to do
        print(f"ligerzoo {args.name}: error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130


def download(args: argparse.Namespace) -> int:
    """Fetch a Hub repo's files into the cache (huggingface_hub's progress bars on stderr) and
    print the local directory."""
    from ligerzoo.hf.hub import resolve_model_dir

    directory = resolve_model_dir(args.model, args.revision, weights=args.weights, tokenizer=args.tokenizer)
    print(directory)
    return 0


def generate(args: argparse.Namespace) -> int:
    """Load a model and its tokenizer, and stream the continuation of the prompt to stdout; with
    --medusa, by Medusa tree decoding with the heads in that directory."""
    import torch

    from ligerzoo.hf.pretrained import from_pretrained
    from ligerzoo.inference import generate as generate_ids
    from ligerzoo.hf.hub import resolve_model_dir
    from ligerzoo.tokenizer import load_tokenizer

    if args.medusa is not None and (args.top_k is not None or args.top_p is not None):
        raise ValueError("--top-k and --top-p do not apply to Medusa decoding: with --temperature > 0 it "
                         "samples with typical acceptance")
    device = _device(args.device)
    dtype = DTYPES[args.dtype] if args.dtype else ("bfloat16" if device.type == "cuda" else "float32")
    directory = resolve_model_dir(args.model, args.revision)  # one fetch for the weights and tokenizer
    tokenizer = load_tokenizer(directory, chat_format=args.chat_format)
    if args.chat:
        prompt = tokenizer.format_chat([{"role": "user", "content": args.prompt}])
    else:
        prompt = tokenizer.encode(args.prompt, bos=True)
    start = time.perf_counter()
    model = from_pretrained(directory, dtype=dtype, device=device)
    _status(f"loaded {args.model} ({dtype}, {device}) in {time.perf_counter() - start:.1f} s; "
            f"prompt of {len(prompt)} tokens")
    if args.medusa is not None:
        from ligerzoo.medusa import MedusaStats, load_heads, medusa_generate

        heads = load_heads(args.medusa, dtype=getattr(torch, dtype), device=device)
        stats = MedusaStats()

    decoder = tokenizer.decoder()
    produced = 0

    def on_token(row: int, token_id: int) -> None:
        nonlocal produced
        produced += 1
        if token_id not in tokenizer.stop_ids:  # a stop token ends the reply; it is not text
            sys.stdout.write(decoder.step(token_id))
            sys.stdout.flush()

    start = time.perf_counter()
    if args.medusa is None:
        generate_ids(model, [prompt], max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                     top_k=args.top_k, top_p=args.top_p, stop_ids=tokenizer.stop_ids, on_token=on_token,
                     seed=args.seed, vocab_size=min(tokenizer.vocab_size, model.config.vocab_size))
    else:
        medusa_generate(model, heads, [prompt], max_new_tokens=args.max_new_tokens, tree=args.medusa_tree,
                        stop_ids=tokenizer.stop_ids,
                        acceptance="typical" if args.temperature > 0 else "greedy",
                        temperature=args.temperature, on_token=on_token, seed=args.seed, stats=stats)
    sys.stdout.write(decoder.flush() + "\n")
    sys.stdout.flush()
    seconds = time.perf_counter() - start
    _status(f"{produced} tokens in {seconds:.2f} s "
            f"({produced / max(seconds, 1e-9):.1f} tokens/s, prefill included)")
    if args.medusa is not None:
        _status(f"medusa ({args.medusa_tree} tree): mean accepted length {stats.mean_accepted_length:.2f} "
                f"tokens per forward over {stats.forwards} forwards")
    return 0


def chat(args: argparse.Namespace) -> int:
    """Talk with a model: each line of stdin is a user message and each reply streams to stdout.
    The conversation is kept, its oldest turns dropped when it outgrows the model's context;
    /reset forgets it, /exit or the end of the input ends the session."""
    from ligerzoo.hf.pretrained import from_pretrained
    from ligerzoo.hf.hub import resolve_model_dir
    from ligerzoo.tokenizer import load_tokenizer

    if args.temperature == 0 and (args.top_k is not None or args.top_p is not None):
        raise ValueError("--top-k and --top-p restrict sampling: set --temperature > 0 (0 is greedy)")
    device = _device(args.device)
    dtype = DTYPES[args.dtype] if args.dtype else ("bfloat16" if device.type == "cuda" else "float32")
    directory = resolve_model_dir(args.model, args.revision)
    tokenizer = load_tokenizer(directory, chat_format=args.chat_format)
    system = [{"role": "system", "content": args.system}] if args.system else []
    tokenizer.format_chat([*system, {"role": "user", "content": "Hi"}])  # no chat format: fail before loading
    start = time.perf_counter()
    model = from_pretrained(directory, dtype=dtype, device=device)
    context = model.config.max_position_embeddings
    budget = context - args.max_new_tokens  # the longest prompt
    if budget < 1:
        raise ValueError(f"--max-new-tokens {args.max_new_tokens} leaves no room for a prompt in the model's "
                         f"context of {context} tokens (max_position_embeddings): lower it")
    _status(f"loaded {args.model} ({dtype}, {device}) in {time.perf_counter() - start:.1f} s; "
            "/reset clears the conversation, /exit or end of input ends it")

    history, replies = list(system), 0
    for line in _user_lines(prompt=sys.stdin.isatty()):
        if line == "/exit":
            break
        if line == "/reset":
            history = list(system)
            _status("(conversation cleared)")
            continue
        history.append({"role": "user", "content": line})
        prompt, dropped = _fit_conversation(tokenizer, history, len(system), budget)
        if len(prompt) > budget:
            history.pop()
            _status(f"ligerzoo {args.name}: error: this message makes a prompt of {len(prompt)} tokens, "
                    f"which with --max-new-tokens {args.max_new_tokens} exceeds the model's context of "
                    f"{context} tokens: shorten it, or lower --max-new-tokens")
            continue
        if dropped:
            del history[len(system):len(system) + dropped]
            _status(f"(the conversation outgrew the model's context of {context} tokens: dropped its oldest "
                    f"{dropped} messages)")
        seed = None if args.seed is None else args.seed + replies
        new = _stream_reply(model, tokenizer, prompt, args, seed)
        replies += 1
        if not new or new[-1] not in tokenizer.stop_ids:
            _status(f"(reply cut at --max-new-tokens {args.max_new_tokens})")
        history.append({"role": "assistant",
                        "content": tokenizer.decode([t for t in new if t not in tokenizer.stop_ids])})
    return 0


def evaluate(args: argparse.Namespace) -> int:
    """The loss and perplexity of a model on a text or chat file, with the masking rules of
    training, progress and tokens/s on stderr; the figures on stdout."""
    from ligerzoo.hf.pretrained import from_pretrained
    from ligerzoo.hf.hub import resolve_model_dir
    from ligerzoo.tokenizer import load_tokenizer
    from ligerzoo.training.data import build_eval_data
    from ligerzoo.training.evaluate import evaluate as evaluate_loss

    device = _device(args.device)
    dtype = DTYPES[args.dtype] if args.dtype else ("bfloat16" if device.type == "cuda" else "float32")
    directory = resolve_model_dir(args.model, args.revision)
    tokenizer = load_tokenizer(args.tokenizer or directory)
    start = time.perf_counter()
    model = from_pretrained(directory, dtype=dtype, device=device)
    if device.type == "cuda":  # as training runs them: a packed row's document mask needs flex_attention compiled
        from ligerzoo.training.blocks import prepare_blocks

        prepare_blocks(model, compile=True)
    seq_len = args.seq_len or min(DEFAULT_EVAL_SEQ_LEN, model.config.max_position_embeddings)
    if seq_len > model.config.max_position_embeddings:
        raise ValueError(f"--seq-len {seq_len} exceeds the model's context of "
                         f"{model.config.max_position_embeddings} tokens (max_position_embeddings)")
    data, _ = build_eval_data(args.data, tokenizer, seq_len, args.train_on_prompt)
    num_batches = -(-len(data) // args.batch_size)
    _status(f"loaded {args.model} ({dtype}, {device}) in {time.perf_counter() - start:.1f} s; {args.data}: "
            f"{len(data):,} rows of {seq_len} tokens, {num_batches:,} batches of {args.batch_size}")
    last = time.perf_counter()

    def on_batch(done: int, tokens: int, seconds: float) -> None:
        nonlocal last
        if time.perf_counter() - last >= 5 or done == num_batches:
            last = time.perf_counter()
            _status(f"batch {done:,}/{num_batches:,}  {tokens / max(seconds, 1e-9):,.0f} tok/s")

    result = evaluate_loss(model, data.eval_batches(args.batch_size, 0, 1), device, on_batch)
    print(f"loss {result['loss']:.4f}  perplexity {result['perplexity']:.3f}  "
          f"({result['tokens']:,} target tokens, {result['tokens_per_s']:,.0f} tok/s)")
    return 0


def plot(args: argparse.Namespace) -> int:
    """Draw the loss and throughput of a training run against the step into an image (its format
    the suffix of --out: PNG by default) and print its path. matplotlib is the optional extra `plot`."""
    from ligerzoo.training.metrics import read_metrics

    steps, losses, throughputs, val_steps, val_losses = [], [], [], [], []
    for record in read_metrics(args.directory):
        steps.append(record["step"])
        losses.append(record["loss"])
        if isinstance(record.get("val_loss"), (int, float)):
            val_steps.append(record["step"])
            val_losses.append(record["val_loss"])
        throughputs.append(record["tokens_per_s"])
    out = Path(args.out) if args.out else Path(args.directory) / "metrics.png"
    image_format = _image_format(out)
    try:
        import matplotlib

        matplotlib.use("Agg")  # files only, no display
        from matplotlib import pyplot
    except ImportError as error:
        if error.name == "PIL":  # matplotlib needs it, whatever the format
            reason = "matplotlib needs pillow, which is not installed: pip install pillow"
        elif (error.name or "").startswith("matplotlib"):
            reason = 'matplotlib is not installed; install the extra: pip install "ligerzoo[plot]"'
        else:
            reason = f"matplotlib cannot be imported ({error})"
        print(f"ligerzoo {args.name}: error: {reason}", file=sys.stderr)
        return 1
    figure, (loss_axes, speed_axes) = pyplot.subplots(2, 1, sharex=True, figsize=(8, 6))
    try:
        loss_axes.plot(steps, losses, color="tab:blue", label="training")
        if val_steps:
            loss_axes.plot(val_steps, val_losses, color="tab:red", marker="o", markersize=3, label="validation")
            loss_axes.legend()
        loss_axes.set_ylabel("loss")
        loss_axes.set_title(str(args.directory))
        speed_axes.plot(steps, throughputs, color="tab:orange")
        speed_axes.set_ylabel("tokens/s")
        speed_axes.set_xlabel("step")
        for axes in (loss_axes, speed_axes):
            axes.grid(True, alpha=0.3)
        figure.tight_layout()
        if image_format not in figure.canvas.get_supported_filetypes():
            raise ValueError(f"matplotlib {matplotlib.__version__} cannot write {out.suffix} files; "
                             f"use .png, .svg or .pdf")
        figure.savefig(out, format=image_format, dpi=100)
    finally:
        pyplot.close(figure)
    print(out)
    return 0


def prepare(args: argparse.Namespace) -> int:
    """Tokenise text corpora, a document at a time, into one token file for training to map,
    showing progress on stderr, and print its path."""
    from ligerzoo.tokenizer import ByteTokenizer, load_tokenizer
    from ligerzoo.training.token_file import write_token_file

    tokenizer = ByteTokenizer() if args.tokenizer == "bytes" else load_tokenizer(args.tokenizer)
    start = last = time.perf_counter()

    def on_progress(documents: int, tokens: int, bytes_read: int) -> None:
        nonlocal last
        now = time.perf_counter()
        if now - last >= 10:  # a line now and then, readable in a log as on a terminal
            last = now
            megabytes_per_s = bytes_read / 1e6 / (now - start)
            _status(f"{documents:,} documents, {tokens:,} tokens, {megabytes_per_s:.1f} MB/s")

    header = write_token_file(args.inputs, tokenizer, args.output, on_progress)
    seconds = time.perf_counter() - start
    megabytes = sum(Path(path).stat().st_size for path in args.inputs) / 1e6
    _status(f"{header['num_documents']:,} documents, {header['num_tokens']:,} tokens ({header['dtype']}) "
            f"from {megabytes:.1f} MB in {seconds:.1f} s ({megabytes / max(seconds, 1e-9):.1f} MB/s)")
    print(args.output)
    return 0


def _user_lines(prompt: bool) -> Iterator[str]:
    """The non-blank lines of stdin, stripped, until its end; with `prompt`, "> " on stderr before each."""
    while True:
        if prompt:
            sys.stderr.write("> ")
            sys.stderr.flush()
        line = sys.stdin.readline()
        if not line:
            if prompt:
                sys.stderr.write("\n")  # end the prompt's line after Ctrl-D
            return
        if line.strip():
            yield line.strip()


def _stream_reply(model, tokenizer, prompt: list[int], args: argparse.Namespace,
                  seed: int | None) -> list[int]:
    """Generate the reply to `prompt` with args' sampling settings, writing its text to stdout as
    it comes; return its ids (the stop token last, if one ended it)."""
    from ligerzoo.inference import generate

    decoder = tokenizer.decoder()

    def on_token(row: int, token_id: int) -> None:
        if token_id not in tokenizer.stop_ids:  # a stop token ends the reply; it is not text
            sys.stdout.write(decoder.step(token_id))
            sys.stdout.flush()

    new = generate(model, [prompt], max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                   top_k=args.top_k, top_p=args.top_p, stop_ids=tokenizer.stop_ids, on_token=on_token,
                   seed=seed, vocab_size=min(tokenizer.vocab_size, model.config.vocab_size))[0]
    sys.stdout.write(decoder.flush() + "\n")
    sys.stdout.flush()
    return new


def _fit_conversation(tokenizer, history: list[dict], keep: int, budget: int) -> tuple[list[int], int]:
    """The prompt ids of `history` with the generation prompt, and how many messages after the
    first `keep` (the system message) were left out of it so that it fits `budget` tokens: whole
    exchanges, oldest first, the last user message always kept (the ids are longer than `budget`
    when even that does not fit)."""
    start = keep
    while True:
        ids = tokenizer.format_chat(history[:keep] + history[start:], add_generation_prompt=True)
        if len(ids) <= budget or start == len(history) - 1:
            return ids, start - keep
        start += 1  # the oldest user message, then up to the next one: its replies
        while start < len(history) - 1 and history[start]["role"] != "user":
            start += 1


def _status(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _device(name: str | None):
    """The torch device --device names (default: cuda if available, else cpu), checked to exist,
    so that a wrong one fails in one line before anything is loaded."""
    import torch

    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:  # torch's message lists twenty device types ligerzoo does not run on
        raise ValueError(f"--device {name!r} is not a device: use cpu, cuda or cuda:N") from None
    if device.type not in ("cpu", "cuda") or (device.type == "cpu" and device.index):
        raise ValueError(f"--device {name!r}: ligerzoo runs on cpu, cuda or cuda:N")
    count = torch.cuda.device_count() if device.type == "cuda" else 0
    if device.type == "cuda" and count == 0:
        why = "this PyTorch is a CPU-only build" if torch.version.cuda is None else "no CUDA GPU is visible"
        raise ValueError(f"--device {name}: {why}; use --device cpu")
    if device.type == "cuda" and device.index is not None and device.index >= count:
        raise ValueError(f"--device {name}: this machine has {count} CUDA GPU{'s' * (count > 1)} "
                         f"(cuda:0{f' to cuda:{count - 1}' if count > 1 else ''})")
    return device


def _image_format(out: Path) -> str:
    """The savefig format `out`'s suffix names; raises if it names none, or if `out` is something
    other than an image of that format (never overwrite metrics.jsonl or a checkpoint)."""
    if out.is_dir():
        raise IsADirectoryError(f"cannot write the plot to {out}: it is a directory; name an image file")
    if not out.parent.is_dir():
        raise FileNotFoundError(f"cannot write the plot to {out}: no such directory: {out.parent}")
    suffix = out.suffix.lower()
    if suffix not in IMAGE_SIGNATURES:
        why = f"its suffix {out.suffix!r} names no image format" if out.suffix else "it has no suffix"
        raise ValueError(f"cannot write the plot to {out}: {why}; name the image format with one of "
                         f"{', '.join(IMAGE_SIGNATURES)}")
    if out.exists():
        with open(out, "rb") as f:
            head = f.read(512)  # an SVG's XML declaration comes before its <svg
        if not re.match(IMAGE_SIGNATURES[suffix], head, re.DOTALL):
            raise FileExistsError(f"not overwriting {out}: it exists and is not a {suffix[1:].upper()} "
                                  "image; choose another --out, or remove the file")
    return suffix[1:]


# ---------------------------------------------------------------------------------------------
# Arguments


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ligerzoo", description="Llama-family models on their own kernels.")
    commands = parser.add_subparsers(title="commands", required=True, metavar="COMMAND")

    fetch = commands.add_parser(
        "download", help="fetch a Hub repo's checkpoint and tokenizer into the cache",
        description="Fetch the files ligerzoo reads (configs, safetensors weights, tokenizer) of a Hugging "
                    "Face Hub repo into huggingface_hub's cache, and print the local directory. HF_TOKEN, "
                    "HF_HOME, HF_HUB_CACHE and HF_ENDPOINT apply.")
    fetch.add_argument("model", help="Hub repo id, e.g. meta-llama/Llama-3.2-1B")
    fetch.add_argument("--revision", help="branch, tag or commit hash (default: main)")
    fetch.add_argument("--weights", action=argparse.BooleanOptionalAction, default=True,
                       help="fetch the safetensors weights (default: yes)")
    fetch.add_argument("--tokenizer", action=argparse.BooleanOptionalAction, default=True,
                       help="fetch the tokenizer files (default: yes)")
    fetch.set_defaults(command=download, name="download")

    gen = commands.add_parser(
        "generate", help="continue a prompt (or answer it, with --chat), streaming the text",
        description="Continue PROMPT with MODEL, streaming the text to stdout as it is produced.")
    gen.add_argument("model", help="local checkpoint directory or Hub repo id")
    gen.add_argument("prompt")
    _add_decoding_arguments(gen, max_new_tokens=256, seed_help="seed of the sampling")
    gen.add_argument("--chat", action="store_true",
                     help="wrap the prompt as a user message in the model's instruct format")
    gen.add_argument("--medusa", metavar="DIR",
                     help="decode with the Medusa heads saved in DIR (greedy: the same text, fewer forwards; "
                          "--temperature > 0: typical acceptance)")
    gen.add_argument("--medusa-tree", choices=sorted(TREE_NAMES), default="mc_sim_7b_63", metavar="NAME",
                     help=f"the tree of candidates Medusa verifies per forward: {', '.join(TREE_NAMES)} "
                          f"(default: mc_sim_7b_63, the Medusa project's)")
    gen.set_defaults(command=generate, name="generate")

    talk = commands.add_parser(
        "chat", help="talk with a model, a line a message, the conversation kept",
        description="Talk with MODEL in its chat format: each line of stdin is a user message, each reply "
                    "streams to stdout. The conversation is kept (its oldest exchanges dropped when it "
                    "outgrows the model's context); /reset clears it, /exit or end of input ends.")
    talk.add_argument("model", help="local checkpoint directory or Hub repo id")
    talk.add_argument("--system", metavar="TEXT", help="a system message opening the conversation")
    _add_decoding_arguments(talk, max_new_tokens=512, seed_help="seed of the sampling (reply i uses S + i)")
    talk.set_defaults(command=chat, name="chat")

    score = commands.add_parser(
        "eval", help="the loss and perplexity of a model on a text or chat file",
        description="Compute MODEL's mean loss per target token and its perplexity on FILE, with training's "
                    "formats and masking: .txt or {\"text\"} lines count every token; {\"messages\"}, "
                    "{\"prompt\", \"completion\"} and alpaca lines count only the answers. Rows of "
                    "--seq-len tokens packed as training packs them; progress and tokens/s on stderr.")
    score.add_argument("model", help="local checkpoint directory, training export or Hub repo id")
    score.add_argument("--data", required=True, metavar="FILE", help=".txt, .jsonl, .json or a prepared .tokens file")
    score.add_argument("--revision", help="branch, tag or commit hash of a Hub repo (default: main)")
    score.add_argument("--tokenizer", metavar="NAME_OR_DIR", help="default: the model's own")
    score.add_argument("--seq-len", type=_positive_int, metavar="N",
                       help=f"tokens a row (default: {DEFAULT_EVAL_SEQ_LEN}, or the model's context if shorter)")
    score.add_argument("--batch-size", type=_positive_int, default=4, metavar="B", help="rows a forward (default: 4)")
    score.add_argument("--train-on-prompt", action="store_true",
                       help="count the prompts of chat and instruction examples too")
    score.add_argument("--dtype", choices=sorted(DTYPES), help="default: bf16 on cuda, fp32 on cpu")
    score.add_argument("--device", help="default: cuda if available, else cpu")
    score.set_defaults(command=evaluate, name="eval")

    draw = commands.add_parser(
        "plot", help="draw a training run's loss and throughput curves into an image",
        description="Draw the loss and throughput (tokens/s) of DIR/metrics.jsonl against the step "
                    "into an image and print its path. Needs matplotlib: pip install \"ligerzoo[plot]\".")
    draw.add_argument("directory", metavar="DIR", help="a training run's output_dir")
    draw.add_argument("--out", metavar="PATH",
                      help=f"the image to write, its format named by its suffix "
                           f"({', '.join(IMAGE_SIGNATURES)}); an existing file is replaced only if it is "
                           "an image of that format (default: DIR/metrics.png)")
    draw.set_defaults(command=plot, name="plot")

    tokenise = commands.add_parser(
        "prepare", help="tokenise text corpora once into a token file for training",
        description="Tokenise the documents of each INPUT (.txt: split at blank lines; .jsonl: the \"text\" "
                    "field of each line), one at a time, into one memory-mapped token file, and print its "
                    "path. Train on it with --data.path PATH.tokens and the same tokenizer.")
    tokenise.add_argument("inputs", nargs="+", metavar="INPUT", help="a .txt or .jsonl file")
    tokenise.add_argument("--output", required=True, metavar="PATH",
                          help="the token file to write, named *.tokens")
    tokenise.add_argument("--tokenizer", default="bytes", metavar="NAME_OR_DIR",
                          help="a Hub repo id, a checkpoint directory or a tokenizer file, or 'bytes' "
                               "(the byte tokenizer of models trained from scratch; the default)")
    tokenise.set_defaults(command=prepare, name="prepare")
    return parser


def _add_decoding_arguments(parser: argparse.ArgumentParser, max_new_tokens: int, seed_help: str) -> None:
    """The options generate and chat share: the model's revision, sampling, dtype and device, and
    the hand-written chat format."""
    parser.add_argument("--revision", help="branch, tag or commit hash of a Hub repo (default: main)")
    parser.add_argument("--max-new-tokens", type=_positive_int, default=max_new_tokens, metavar="N",
                        help=f"the most tokens a reply (default: {max_new_tokens})")
    parser.add_argument("--temperature", type=_non_negative_float, default=0.0, metavar="T",
                        help="0 (the default) is greedy")
    parser.add_argument("--top-k", type=_positive_int, metavar="K", help="sample among the K likeliest tokens")
    parser.add_argument("--top-p", type=_probability, metavar="P",
                        help="sample among the likeliest tokens whose probabilities add up to P")
    parser.add_argument("--seed", type=int, metavar="S", help=seed_help)
    parser.add_argument("--dtype", choices=sorted(DTYPES), help="default: bf16 on cuda, fp32 on cpu")
    parser.add_argument("--device", help="default: cuda if available, else cpu")
    parser.add_argument("--chat-format", metavar="F",
                        help="a hand-written instruct format, for tokenizer files without a chat template "
                             "(llama2, llama3, mistral-v1, mistral-v2, mistral-v3)")


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text} is not a positive integer")
    return value


def _non_negative_float(text: str) -> float:
    value = _float(text)
    if not value >= 0:  # also rejects nan
        raise argparse.ArgumentTypeError(f"{text} is negative; 0 is greedy")
    return value


def _probability(text: str) -> float:
    value = _float(text)
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"{text} is not in (0, 1]")
    return value


def _float(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
