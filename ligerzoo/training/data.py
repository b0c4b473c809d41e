"""Training data: documents tokenised, packed into rows of `seq_len`, read in a fixed order.

Documents are concatenated (each with BOS and EOS) and cut into rows; the position ids restart at
every document start (and at every row start), so the model attends within each document, and the
first token of a document is never a target of the previous one. Each step reads the next
`world_size * batch_size` rows of a seeded permutation (reshuffled each epoch); rank r takes its
slice, so the rows a step sees do not depend on how they are split across ranks. The only data
state is the number of rows consumed, saved in checkpoints.
"""

import json
import random
from pathlib import Path

import torch

IGNORE_INDEX = -100


class ByteTokenizer:
    """UTF-8 bytes as ids 0-255, BOS 256, EOS 257: needs no files, for models trained from scratch."""

    bos_id, eos_id, vocab_size = 256, 257, 258

    def encode(self, text: str, bos: bool = True, eos: bool = False) -> list[int]:
        return [self.bos_id] * bos + list(text.encode("utf-8")) + [self.eos_id] * eos

    def decode(self, ids) -> str:
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")


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


def read_documents(path: str) -> list[str]:
    """A .jsonl file's "text" fields, or a text file's blank-line-separated paragraphs."""
    text = Path(path).read_text(encoding="utf-8")
    if path.endswith(".jsonl"):
        documents = []
        for number, line in enumerate(text.splitlines(), 1):
            if line.strip():
                record = json.loads(line)
                if "text" not in record:
                    raise ValueError(f"{path}:{number}: a JSONL record needs a \"text\" field, got {sorted(record)}")
                documents.append(record["text"])
        return documents
    return [part.strip() for part in text.split("\n\n") if part.strip()]


class PackedData:
    """Rows of packed documents, handed out step by step, deterministically sharded over ranks."""

    def __init__(self, documents: list[list[int]], seq_len: int, seed: int):
        flat = torch.tensor([t for doc in documents for t in doc], dtype=torch.long)
        starts = torch.zeros(len(flat), dtype=torch.bool)
        offsets = torch.tensor([0] + [len(doc) for doc in documents[:-1]]).cumsum(0)
        starts[offsets] = True
        n_rows = len(flat) // seq_len
        if n_rows == 0:
            raise ValueError(f"the corpus has {len(flat)} tokens, fewer than one row of seq_len={seq_len}")
        self.tokens = flat[: n_rows * seq_len].view(n_rows, seq_len)  # [R, T]
        is_start = starts[: n_rows * seq_len].view(n_rows, seq_len)
        self.labels = self.tokens.masked_fill(is_start, IGNORE_INDEX)  # never predict across documents
        is_start[:, 0] = True
        column = torch.arange(seq_len).expand(n_rows, seq_len)
        last_start = torch.where(is_start, column, 0).cummax(dim=1).values
        self.positions = column - last_start  # restarts at each document and each row
        self.seed = seed
        self.rows_consumed = 0

    def __len__(self) -> int:
        return self.tokens.shape[0]

    def next_batch(self, batch_size: int, rank: int, world_size: int) -> dict[str, torch.Tensor]:
        """This rank's `batch_size` rows of the next `world_size * batch_size`."""
        first = self.rows_consumed + rank * batch_size
        rows = torch.stack([self._row_index(i) for i in range(first, first + batch_size)])
        self.rows_consumed += world_size * batch_size
        return {"input_ids": self.tokens[rows], "labels": self.labels[rows], "position_ids": self.positions[rows]}

    def _row_index(self, i: int) -> torch.Tensor:
        epoch, offset = divmod(i, len(self))
        if getattr(self, "_epoch", None) != epoch:  # one permutation per epoch, cached
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._epoch, self._order = epoch, torch.randperm(len(self), generator=generator)
        return self._order[offset]

    def state_dict(self) -> dict:
        return {"rows_consumed": self.rows_consumed}

    def load_state_dict(self, state: dict) -> None:
        self.rows_consumed = state["rows_consumed"]


def build_data(data_config, tokenizer, seed: int) -> PackedData:
    """Tokenise the configured corpus (or the built-in one) and pack it."""
    if data_config.path is None:
        texts = builtin_corpus(data_config.num_documents, seed)
    else:
        texts = read_documents(data_config.path)
    documents = [tokenizer.encode(text, bos=True, eos=True) for text in texts]
    return PackedData(documents, data_config.seq_len, seed)
