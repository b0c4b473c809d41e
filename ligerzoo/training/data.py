"""Training data: examples tokenised, packed into rows of `seq_len`, read in a fixed order.

Plain text (every example a text, formats.py) is packed as a stream: documents (each with BOS and
EOS) are concatenated and cut into rows; the position ids restart at every document start (and at
every row start), so the model attends within each document, and the first token of a document is
never a target of the previous one.

Chat and instruction examples, whose loss sees only the answers, are packed whole, since an
example split across rows would lose its prompt: they fill rows greedily in file order (the rows
are shuffled anyway); when the next one does not fit, the rest of the row is padding (the
tokenizer's pad id, else EOS), a document of its own that is never a target; an example longer
than `seq_len` keeps its first `seq_len` tokens and is counted as cut. The loss sees a token when
its role is ANSWER (PROMPT too with train_on_prompt), by its label alone (IGNORE_INDEX elsewhere),
so the fused loss and the step's token count work as they do for text.

Each step reads the next `world_size * batch_size` rows of a seeded permutation (reshuffled each
epoch); rank r takes its slice, so the rows a step sees do not depend on how they are split across
ranks. The only data state is the number of rows consumed, saved in checkpoints.

Validation data is a second file, or whole examples held out of the training file by a seeded
choice before packing; it is packed as training data is, except that plain text's last partial
row is kept (padded), and `eval_batches` reads every row once.

A large corpus is tokenised once into a token file (`ligerzoo prepare`, token_file.py) that
training maps into memory: plain-text rows are cut from the map as batches need them, the same
rows a text file of the same documents gives; whole-example data is laid out in memory at load.
"""

import random
from collections.abc import Iterator
from pathlib import Path

import torch

from ligerzoo.kernels import IGNORE_INDEX
from ligerzoo.training.formats import (
    ANSWER,
    PROMPT,
    TEXT,
    Example,
    TokenizedCorpus,
    read_examples,
    tokenize_corpus,
)
from ligerzoo.training.token_file import (
    TOKEN_FILE_SUFFIX,
    check_tokenizer,
    read_token_file,
)


def builtin_corpus(num_documents: int, seed: int = 0) -> list[str]:
    """A deterministic toy corpus: short stories from a small grammar, learnable in minutes."""
    rng = random.Random(seed)
    names = ["Ada", "Bo", "Cy", "Dee", "Eli", "Fay", "Gus", "Hal"]
    adjectives = ["red", "small", "quiet", "old", "bright", "heavy", "round", "green"]
    nouns = ["box", "bird", "lamp", "boat", "stone", "cup", "kite", "door"]
    verbs = ["found", "painted", "carried", "lost", "opened", "watched", "sold", "fixed"]
    places = ["in the garden", "by the river", "at the market", "on the hill", "under the bridge"]
    documents = []
    for _ in range(num_documents):
        who = rng.choice(names)
        sentences = [f"{who} {rng.choice(verbs)} the {rng.choice(adjectives)} {rng.choice(nouns)} "
                     f"{rng.choice(places)}." for _ in range(rng.randint(2, 6))]
        sentences.append(f"Then {who} went home.")
        documents.append(" ".join(sentences))
    return documents


class PackedData:
    """Rows of packed documents, handed out step by step, deterministically sharded over ranks.

    tokens: every document's ids end to end [N], of any integer dtype; a memory map is read only
        where a batch falls. Row i is tokens[i * seq_len : (i + 1) * seq_len]; the tail is dropped.
    document_starts: the index in `tokens` where each document begins [D], ascending, from 0.
    loss_mask: which tokens may be targets [N], bool; None: all (plain text). A document's first
        token is never one.
    """

    def __init__(self, tokens: torch.Tensor, document_starts: torch.Tensor, seq_len: int, seed: int,
                 loss_mask: torch.Tensor | None = None):
        self.num_rows = len(tokens) // seq_len
        if self.num_rows == 0:
            raise ValueError(f"the corpus has {len(tokens)} tokens, fewer than one row of seq_len={seq_len}")
        self.tokens, self.document_starts, self.seq_len = tokens, document_starts, seq_len
        self.loss_mask = loss_mask
        self.seed = seed
        self.rows_consumed = 0

    @classmethod
    def from_documents(cls, documents: list[list[int]], seq_len: int, seed: int) -> "PackedData":
        """Pack tokenised documents held in memory."""
        tokens = torch.tensor([t for doc in documents for t in doc], dtype=torch.long)
        starts = torch.tensor([0] + [len(doc) for doc in documents[:-1]], dtype=torch.long).cumsum(0)
        return cls(tokens, starts, seq_len, seed)

    def __len__(self) -> int:
        return self.num_rows

    def next_batch(self, batch_size: int, rank: int, world_size: int) -> dict[str, torch.Tensor]:
        """This rank's `batch_size` rows of the next `world_size * batch_size`."""
        first = self.rows_consumed + rank * batch_size
        rows = [self._row_index(i) for i in range(first, first + batch_size)]
        self.rows_consumed += world_size * batch_size
        return self._rows(rows)

    def eval_batches(self, batch_size: int, rank: int, world_size: int) -> Iterator[dict[str, torch.Tensor]]:
        """Every row once, in order, as next_batch's dicts: batch k of rank r holds rows from
        (k * world_size + r) * batch_size on. Rows past the last are row 0 with every label
        IGNORE_INDEX, so that every rank runs ceil(rows / (world_size * batch_size)) batches (FSDP
        needs every rank in every forward)."""
        per_step = world_size * batch_size
        for first in range(rank * batch_size, -(-len(self) // per_step) * per_step, per_step):
            rows = range(first, first + batch_size)
            batch = self._rows([row if row < len(self) else 0 for row in rows])
            batch["labels"][torch.tensor([row >= len(self) for row in rows])] = IGNORE_INDEX
            yield batch

    def _rows(self, rows: list[int]) -> dict[str, torch.Tensor]:
        """Input ids, labels and position ids of the rows numbered `rows`."""
        length = self.seq_len
        tokens = torch.stack([self.tokens[r * length:(r + 1) * length].long() for r in rows])  # [B, T]
        begins = torch.tensor(rows, dtype=torch.long) * length
        spans = torch.searchsorted(self.document_starts, torch.stack([begins, begins + length], dim=1))
        is_start = torch.zeros(len(rows), length, dtype=torch.bool)
        for row, (begin, (first, end)) in enumerate(zip(begins.tolist(), spans.tolist())):
            is_start[row, self.document_starts[first:end] - begin] = True
        not_target = is_start  # never predict across documents
        if self.loss_mask is not None:
            not_target = is_start | ~torch.stack([self.loss_mask[r * length:(r + 1) * length] for r in rows])
        labels = tokens.masked_fill(not_target, IGNORE_INDEX)
        is_start[:, 0] = True
        column = torch.arange(length).expand(len(rows), length)
        last_start = torch.where(is_start, column, 0).cummax(dim=1).values
        positions = column - last_start  # restarts at each document and each row
        return {"input_ids": tokens, "labels": labels, "position_ids": positions}

    def _row_index(self, i: int) -> int:
        epoch, offset = divmod(i, len(self))
        if getattr(self, "_epoch", None) != epoch:  # one permutation per epoch, cached
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._epoch, self._order = epoch, torch.randperm(len(self), generator=generator)
        return int(self._order[offset])

    def state_dict(self) -> dict:
        return {"rows_consumed": self.rows_consumed}

    def load_state_dict(self, state: dict) -> None:
        self.rows_consumed = state["rows_consumed"]


def pack(corpus: TokenizedCorpus, seq_len: int, seed: int, pad_id: int, train_on_prompt: bool = False,
         keep_tail: bool = False) -> tuple[PackedData, dict]:
    """Pack a corpus into rows (plain text as a stream, other examples whole), and say what it
    holds: {"examples", "formats" (examples of each), "tokens" (of the examples), "rows",
    "padding" (tokens), "cut" (examples longer than a row), "targets" (tokens in the loss, over
    one pass of the rows, as training counts them)}.

    keep_tail: plain text's last partial row kept, padded, rather than dropped (for evaluation).
    """
    if corpus.roles is None:
        tokens, starts, mask, cut = corpus.tokens, corpus.starts, None, 0
        padding = -len(tokens) % seq_len if keep_tail else 0
        if padding:
            tokens = torch.cat([tokens.long(), torch.full((padding,), pad_id)])
            starts = torch.cat([starts, torch.tensor([len(corpus.tokens)])])
            mask = torch.arange(len(tokens)) < len(corpus.tokens)
    else:
        tokens, starts, roles, cut = _pack_whole(corpus, seq_len, pad_id)
        mask = roles >= PROMPT if train_on_prompt else roles == ANSWER
        padding = len(tokens) - int(corpus.lengths().clamp(max=seq_len).sum())
    data = PackedData(tokens, starts, seq_len, seed, loss_mask=mask)
    stats = {"examples": len(corpus), "formats": corpus.format_counts(), "tokens": len(corpus.tokens),
             "rows": len(data), "padding": padding, "cut": cut, "targets": _count_targets(data)}
    return data, stats


def _pack_whole(corpus: TokenizedCorpus, seq_len: int, pad_id: int) -> tuple[torch.Tensor, ...]:
    """Examples whole in rows, next fit in file order, the rest of a row padding: (tokens [R * T]
    int32, document starts (the examples' and the padding's), roles [R * T], examples cut).

    A row holds consecutive whole examples, or the first seq_len tokens of one longer example
    alone, so each row is one slice of the corpus."""
    rows = []  # [first token in the corpus, tokens] of each row
    starts, cut = [], 0

    def end_row():  # what the last row leaves is padding, a document of its own
        if rows and rows[-1][1] < seq_len:
            starts.append((len(rows) - 1) * seq_len + rows[-1][1])

    for start, length in zip(corpus.starts.tolist(), corpus.lengths().tolist()):
        if length > seq_len:
            cut, length = cut + 1, seq_len
        if not rows or rows[-1][1] + length > seq_len:
            end_row()
            rows.append([start, 0])
        starts.append((len(rows) - 1) * seq_len + rows[-1][1])
        rows[-1][1] += length
    end_row()
    tokens = torch.full((len(rows) * seq_len,), pad_id, dtype=torch.int32)
    roles = torch.zeros(len(rows) * seq_len, dtype=torch.uint8)  # PADDING
    for row, (begin, length) in enumerate(rows):
        tokens[row * seq_len:row * seq_len + length] = corpus.tokens[begin:begin + length]
        roles[row * seq_len:row * seq_len + length] = corpus.roles[begin:begin + length]
    return tokens, torch.tensor(starts, dtype=torch.int64), roles, cut


def _count_targets(data: PackedData) -> int:
    """The targets of one pass over the rows, as training counts them (labels[:, 1:]): in the loss
    mask, neither a document's first token nor a row's."""
    rows, length = len(data), data.seq_len
    starts = data.document_starts[data.document_starts < rows * length]
    if data.loss_mask is None:
        return rows * (length - 1) - int((starts % length != 0).sum())
    counted = data.loss_mask[:rows * length].clone()
    counted[starts] = False
    counted[::length] = False
    return int(counted.sum())


def hold_out(corpus: TokenizedCorpus, fraction: float, seed: int) -> tuple[TokenizedCorpus, TokenizedCorpus]:
    """(training, validation): `fraction` of the examples (rounded, at least one) held out whole,
    chosen by a permutation seeded with `seed`; both keep the file's order."""
    count = max(1, round(fraction * len(corpus)))
    if count >= len(corpus):
        raise ValueError(f"--data.val_fraction {fraction} of the {len(corpus)} examples holds out {count}, "
                         "leaving none to train on: lower it, or pass --data.val_path")
    held = torch.zeros(len(corpus), dtype=torch.bool)
    held[torch.randperm(len(corpus), generator=torch.Generator().manual_seed(seed))[:count]] = True
    train, val = torch.nonzero(~held)[:, 0].tolist(), torch.nonzero(held)[:, 0].tolist()
    return corpus.select(train), corpus.select(val)


def load_corpus(path: str, tokenizer) -> TokenizedCorpus:
    """A corpus file's examples, tokenised: a token file mapped (and checked to be `tokenizer`'s),
    any other file read and tokenised here."""
    if Path(path).suffix.lower() == TOKEN_FILE_SUFFIX:
        corpus, header = read_token_file(path)
        check_tokenizer(header, tokenizer, path)
        return corpus
    return tokenize_corpus(read_examples(path), tokenizer)


def build_datasets(data_config, tokenizer, seed: int) -> tuple[PackedData, PackedData | None, dict]:
    """The training data (the configured file, or the built-in corpus), the validation data (None
    without data.val_path or data.val_fraction), and what each holds: {"train": ..., "val": ...
    or None} (see pack)."""
    config = data_config
    if config.path is None:
        texts = builtin_corpus(config.num_documents, seed)
        examples = (Example(TEXT, text, f"built-in document {i}") for i, text in enumerate(texts))
        corpus = tokenize_corpus(examples, tokenizer)
    else:
        corpus = load_corpus(config.path, tokenizer)
    val_corpus = None
    if config.val_path is not None:
        val_corpus = load_corpus(config.val_path, tokenizer)
    elif config.val_fraction > 0:
        corpus, val_corpus = hold_out(corpus, config.val_fraction, seed)
        if corpus.roles is None and len(corpus.tokens) < config.seq_len:
            raise ValueError(f"--data.val_fraction {config.val_fraction} holds out {len(val_corpus)} "
                             f"examples, leaving {len(corpus.tokens)} tokens to train on, fewer than one row "
                             f"of seq_len={config.seq_len}: lower it, or pass --data.val_path")
    pad_id = _pad_id(tokenizer)
    train, train_stats = pack(corpus, config.seq_len, seed, pad_id, config.train_on_prompt)
    val, val_stats = None, None
    if val_corpus is not None:
        val, val_stats = pack(val_corpus, config.seq_len, seed, pad_id, config.train_on_prompt,
                              keep_tail=True)
    return train, val, {"train": train_stats, "val": val_stats}


def build_eval_data(path: str, tokenizer, seq_len: int,
                    train_on_prompt: bool = False) -> tuple[PackedData, dict]:
    """A file packed for evaluation as validation data is (every token in some row), and what it
    holds (see pack)."""
    return pack(load_corpus(path, tokenizer), seq_len, 0, _pad_id(tokenizer), train_on_prompt, keep_tail=True)


def describe_datasets(stats: dict) -> str:
    """A line for each data set of build_datasets' statistics."""
    lines = []
    for name, held in stats.items():
        if held is None:
            continue
        formats = ", ".join(f"{count:,} {kind}" for kind, count in held["formats"].items())
        line = (f"{name} data: {held['examples']:,} examples ({formats}), {held['tokens']:,} tokens, "
                f"{held['rows']:,} rows")
        if held["padding"]:
            line += f" ({held['padding']:,} padding tokens)"
        line += f", {held['targets']:,} targets"
        cut = held["cut"]
        if cut:
            line += (f"; {cut:,} example{'s' * (cut != 1)} longer than a row cut to its length "
                     "(their ends are not trained on)")
        lines.append(line)
    return "\n".join(lines)


def _pad_id(tokenizer) -> int:
    """The id that fills the rest of a row: the tokenizer's pad id where it has one, else EOS."""
    pad_id = getattr(tokenizer, "pad_id", None)
    return tokenizer.eos_id if pad_id is None else pad_id
