"""Hugging Face's BPE model (tokenizers/src/models/bpe), merge for merge, in Python.

A pre-token becomes one symbol per character (its vocabulary id; unknown characters fall back
to their UTF-8 bytes as `<0xNN>` tokens, or become the unknown token), then the adjacent pair
whose merge is listed first is merged, again and again, the leftmost first among equals. This
is the exact reference semantics, used where tiktoken's (merge the adjacent pair whose merged
token ranks lowest) could differ: SentencePiece-style vocabularies, and byte-level files whose
merges are not in training order.

Speed comes from two things that do not change the result: a cache of pre-tokens already seen,
and cutting a long pre-token where no merge can ever join the characters on either side (no
merge joins a token ending with the left one to a token starting with the right one), so that
a 1 MB text that SentencePiece-style files leave in one piece merges word by word.
"""

from __future__ import annotations

import heapq

_CACHE_ENTRIES = 200_000  # pre-tokens remembered; the cache is emptied when it grows past this
_CHUNKED_LENGTH = 32  # longer pre-tokens are cut at boundaries that no merge crosses


class BPEError(ValueError):
    """A BPE model that is inconsistent (a merge of tokens that are not in the vocabulary)."""


class BPE:
    """Hugging Face's BPE `tokenize`: a pre-token (str) to its ids.

    vocab: token -> id. merges: (left, right) pairs, highest priority first.
    unk_token: the token for characters outside the vocabulary (None: they are dropped, as
        Hugging Face drops them). fuse_unk: consecutive unknown characters make one unk.
    byte_fallback: unknown characters become their UTF-8 bytes' `<0xNN>` tokens where those exist.
    ignore_merges: a pre-token that is itself in the vocabulary is that token, unmerged.
    """

    def __init__(self, vocab: dict[str, int], merges: list[tuple[str, str]], *, unk_token: str | None = None,
                 fuse_unk: bool = False, byte_fallback: bool = False, ignore_merges: bool = False):
        self.vocab = vocab
        self.ignore_merges = ignore_merges
        self._fuse_unk = fuse_unk
        if unk_token is not None and unk_token not in vocab:
            raise BPEError(f"the unknown token {unk_token!r} is not in the vocabulary")
        self._unk_id = None if unk_token is None else vocab[unk_token]
        self._byte_ids = [vocab.get(f"<0x{b:02X}>") for b in range(256)] if byte_fallback else None
        # (left id, right id) -> (rank, merged id); a pair listed twice keeps its last rank, as in HF
        self._merges: dict[tuple[int, int], tuple[int, int]] = {}
        for rank, (left, right) in enumerate(merges):
            missing = next((t for t in (left, right, left + right) if t not in vocab), None)
            if missing is not None:
                raise BPEError(f"merge {rank} ({left!r} + {right!r}) needs {missing!r}, which is not in the "
                               "vocabulary")
            self._merges[vocab[left], vocab[right]] = (rank, vocab[left + right])
        self._crossable = _crossable_boundaries(self._merges)
        self._cache: dict[str, list[int]] = {}

    def tokenize(self, piece: str) -> list[int]:
        """The ids of one pre-token."""
        if self.ignore_merges:
            whole = self.vocab.get(piece)
            if whole is not None:
                return [whole]
        ids = self._cache.get(piece)
        if ids is None:
            ids = self._merge_chunks(self._symbols(piece))
            if len(self._cache) >= _CACHE_ENTRIES:
                self._cache.clear()
            self._cache[piece] = ids
        return ids

    def _symbols(self, piece: str) -> list[int]:
        """One id per character: HF's `merge_word` before merging (with its unk/byte rules)."""
        vocab, symbols = self.vocab, []
        unk = None  # the pending unknown token, added before the next known symbol
        for char in piece:
            token = vocab.get(char)
            if token is not None:
                if unk is not None:
                    symbols.append(unk)
                    unk = None
                symbols.append(token)
                continue
            if self._byte_ids is not None:
                byte_ids = [self._byte_ids[b] for b in char.encode("utf-8")]
                if None not in byte_ids:
                    symbols.extend(byte_ids)
                    continue
            if self._unk_id is not None:
                if unk is not None and not self._fuse_unk:
                    symbols.append(unk)
                unk = self._unk_id
        if unk is not None:
            symbols.append(unk)
        return symbols

    def _merge_chunks(self, symbols: list[int]) -> list[int]:
        if len(symbols) <= _CHUNKED_LENGTH:
            return self._merge(symbols)
        crossable, out, start = self._crossable, [], 0
        for i in range(1, len(symbols)):
            if (symbols[i - 1], symbols[i]) not in crossable:
                out += self._merge_cached(symbols[start:i])
                start = i
        out += self._merge_cached(symbols[start:])
        return out

    def _merge_cached(self, symbols: list[int]) -> list[int]:
        if len(symbols) == 1:
            return symbols
        key = tuple(symbols)
        ids = self._cache.get(key)  # tuples and strs never collide as keys
        if ids is None:
            ids = self._cache[key] = self._merge(symbols)
        return ids

    def _merge(self, symbols: list[int]) -> list[int]:
        """HF's `Word::merge_all`: a heap of (rank, position, merged id); an entry whose pair has
        changed since it was pushed is skipped."""
        merges, n = self._merges, len(symbols)
        if n < 2:
            return symbols
        ids = list(symbols)
        heap = []
        for i in range(n - 1):
            merge = merges.get((ids[i], ids[i + 1]))
            if merge is not None:
                heap.append((merge[0], i, merge[1]))
        if not heap:
            return ids
        heapq.heapify(heap)
        following = list(range(1, n + 1))
        following[-1] = -1
        preceding = list(range(-1, n - 1))
        alive = [True] * n
        while heap:
            _, pos, merged = heapq.heappop(heap)
            right = following[pos]
            if not alive[pos] or right < 0:
                continue
            current = merges.get((ids[pos], ids[right]))
            if current is None or current[1] != merged:
                continue
            ids[pos] = merged
            alive[right] = False
            after = following[right]
            following[pos] = after
            if after >= 0:
                preceding[after] = pos
            before = preceding[pos]
            if before >= 0 and (merge := merges.get((ids[before], merged))) is not None:
                heapq.heappush(heap, (merge[0], before, merge[1]))
            if after >= 0 and (merge := merges.get((merged, ids[after]))) is not None:
                heapq.heappush(heap, (merge[0], pos, merge[1]))
        return [token for token, live in zip(ids, alive) if live]


def _crossable_boundaries(merges: dict[tuple[int, int], tuple[int, int]]) -> set[tuple[int, int]]:
    """The pairs of first symbols (single characters' or bytes' ids) that some merge can join:
    for each merge, the last symbol of its left token and the first of its right token."""
    made_from = {}
    for pair, (_, merged) in sorted(merges.items(), key=lambda item: item[1][0]):
        made_from.setdefault(merged, pair)

    def edge(token: int, side: int) -> int:
        for _ in range(len(made_from) + 1):  # bounded: a malformed file may make a token from itself
            if token not in made_from:
                break
            token = made_from[token][side]
        return token

    return {(edge(left, 1), edge(right, 0)) for left, right in merges}
