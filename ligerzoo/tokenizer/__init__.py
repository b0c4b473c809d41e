"""Tokenizers for Llama-family models, behind one interface (`Tokenizer`).

- SentencePiece (`tokenizer.model`): Llama 2, Mistral, Mixtral (sentencepiece_model.py).
- Byte-level BPE through tiktoken (tiktoken_bpe.py): Llama 3 from Meta's `original/tokenizer.model`,
  and every byte-level Hugging Face `tokenizer.json` (GPT-2, Llama 3, SmolLM2, Qwen2,
  DeepSeek-R1-Distill-Llama), read by tokenizer_json.py.
- SentencePiece-style BPE from a `tokenizer.json` (Llama 2, Mistral, TinyLlama repositories that
  ship no `tokenizer.model`): tokenizer_json.py, merging as Hugging Face does (bpe.py).
- Mistral's `tekken.json` (Mistral-Nemo, Ministral, Mistral Small 3): tekken.py.
- Bytes: UTF-8 bytes as ids 0-255, <s> 256, </s> 257, for models trained from scratch; it needs
  no file, and `ByteTokenizer.save` writes it as a `tokenizer.json` that Hugging Face reads too.

`load_tokenizer` finds the file in a directory, a path, or a Hub repo id, and tells the kinds
apart by their content, not their name. Encodings equal the reference implementations' (llama-models'
`Tokenizer`, mistral-common's tokenizers, transformers for tokenizer.json) token for token. Text
that looks like a special token (`<|eot_id|>`, `[INST]`) is plain text unless
`encode(..., allow_special=True)`, which is how a rendered chat template is encoded; the
hand-written `format_chat` formats place special tokens themselves.
"""

from ligerzoo.tokenizer.base import (
    StreamDecoder,
    Tokenizer,
    TokenizerError,
    tokenizer_fingerprint,
)
from ligerzoo.tokenizer.byte import ByteTokenizer
from ligerzoo.tokenizer.chat import CHAT_FORMATS
from ligerzoo.tokenizer.loading import load_tokenizer
from ligerzoo.tokenizer.sentencepiece_model import SentencePieceTokenizer
from ligerzoo.tokenizer.tekken import TekkenTokenizer
from ligerzoo.tokenizer.tiktoken_bpe import (
    LLAMA3_NUM_SPECIALS,
    LLAMA3_PATTERN,
    MAX_ENCODE_CHARS,
    MAX_RUN_CHARS,
    TiktokenTokenizer,
)
from ligerzoo.tokenizer.tokenizer_json import SentencePieceBPETokenizer

__all__ = [
    "CHAT_FORMATS", "LLAMA3_NUM_SPECIALS", "LLAMA3_PATTERN", "MAX_ENCODE_CHARS", "MAX_RUN_CHARS",
    "ByteTokenizer", "SentencePieceBPETokenizer", "SentencePieceTokenizer", "StreamDecoder",
    "TekkenTokenizer", "TiktokenTokenizer", "Tokenizer", "TokenizerError", "load_tokenizer",
    "tokenizer_fingerprint",
]
