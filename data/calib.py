"""Calibration sets, sampled as the paper's code does.

Documents are shuffled with the seed (numpy `default_rng(seed).permutation`, which is what
`datasets.Dataset.shuffle(seed=...)` does), the first `n_blocks_for_stat * 16` are
tokenized, the token lists are concatenated per group of 1000 documents (the batch of the
original `datasets.map(group_texts, batched=True)`) and cut into blocks of
`min(tokenizer.model_max_length, max_block_size)` tokens, and the first
`n_blocks_for_stat` blocks are kept (all of them when it is <= 0).

Only the tokens those blocks use are made: documents are tokenized in order until the
blocks are full, and a long document only as far as needed (`document_tokens`), so a
file with one 50 MB document costs what its first blocks cost.
"""

from __future__ import annotations

import functools
import gzip
import json
import logging
import lzma
import re
from contextlib import contextmanager
from dataclasses import dataclass
from itertools import chain
from pathlib import Path

import numpy as np
import tokenizers
import torch
import transformers

from cli import available_cpus

logger = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parent.parent
DOCS_PER_BLOCK = 16  # documents sampled per requested block (original code)
GROUP_DOCS = 1000  # documents concatenated together (datasets.map default batch size)


class DataFileError(ValueError):
    """A calibration or benchmark data file is missing, malformed or too small."""


def _open_text(path: Path):
    if path.suffix == ".gz":
        return gzip.open(path, "rt", encoding="utf-8")
    if path.suffix == ".xz":
        return lzma.open(path, "rt", encoding="utf-8")
    return open(path, "r", encoding="utf-8")


def read_texts(path: str | Path, field: str = "text") -> list[str]:
    """The `field` of every record of a JSON-lines file (plain, .gz or .xz) or a JSON array file."""
    path = Path(path)
    fmt = "JSON lines with a 'text' field (the C4 shard format) or a JSON array of {\"text\": ...}"
    try:
        with _open_text(path) as f:
            head = f.read(4096).lstrip()
            f.seek(0)
            if head.startswith("["):
                try:
                    records = json.load(f)
                except json.JSONDecodeError as e:
                    raise DataFileError(f"{path} is not valid JSON ({e}); expected {fmt}") from None
                numbered = list(enumerate(records, 1))
            else:
                numbered = []
                for n, line in enumerate(f, 1):
                    if line.strip():
                        try:
                            numbered.append((n, json.loads(line)))
                        except json.JSONDecodeError as e:
                            raise DataFileError(f"{path}: line {n} is not valid JSON ({e.msg}); expected {fmt}") from None
    except (OSError, EOFError, lzma.LZMAError, UnicodeDecodeError) as e:
        if isinstance(e, FileNotFoundError):
            raise
        raise DataFileError(f"{path} cannot be read ({e}); expected {fmt}") from None
    texts = []
    for n, rec in numbered:
        if not isinstance(rec, dict) or not isinstance(rec.get(field), str):
            raise DataFileError(f"{path}: record {n} has no string '{field}' field; expected {fmt}")
        texts.append(rec[field])
    if not texts:
        raise DataFileError(f"{path} holds no documents; expected {fmt}")
    return texts


@contextmanager
def quiet_tokenizer():
    # Long documents are cut into blocks afterwards; the "sequence longer than" warning is noise.
    level = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()
    try:
        yield
    finally:
        transformers.logging.set_verbosity(level)


MIN_BLOCK_SIZE = 2


def block_size_for(tokenizer, max_block_size: int) -> int:
    """min(model_max_length, max_block_size); DataFileError when it leaves blocks without context."""
    size = min(int(tokenizer.model_max_length), max_block_size)
    if size < MIN_BLOCK_SIZE:
        # One token per block: every calibration token would be the first of its sequence (for `self`,
        # only the BOS token), so attention sees no context and the MoE inputs are not the model's.
        raise DataFileError(f"calibration blocks of {size} token (--max_block_size {max_block_size}, tokenizer "
                            f"model_max_length {tokenizer.model_max_length}) have no context; use at least "
                            f"{MIN_BLOCK_SIZE} tokens (the paper uses 2048)")
    return size


# First try at the characters needed for n tokens (about 4 characters per token in English for large
# vocabularies, 2 for tiny ones); too few only costs another, 4x longer try.
_CHARS_PER_TOKEN, _MIN_CHARS = 8, 1024
_BYTE_TOKEN = re.compile(r"<0x[0-9A-Fa-f]{2}>")  # BPE byte fallback


@functools.lru_cache(maxsize=8)
def _bpe_bigrams(tokenizer) -> frozenset[str] | None:
    """Every pair of adjacent characters inside a vocabulary token, for a BPE tokenizer that keeps the whole
    text one pre-token (SentencePiece style: no pre-tokenizer, or Metaspace(split=False), as transformers 5's
    Llama and Mixtral tokenizers); None for any other tokenizer."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    model = getattr(backend, "model", None)
    pre = getattr(backend, "pre_tokenizer", None)
    if not isinstance(model, tokenizers.models.BPE) or model.dropout or model.continuing_subword_prefix \
            or model.end_of_word_suffix:
        return None
    if pre is not None and not (isinstance(pre, tokenizers.pre_tokenizers.Metaspace) and not pre.split):
        return None
    return frozenset(t[i: i + 2] for t in backend.get_vocab() for i in range(len(t) - 1))


def _settled_tokens(tokenizer, encoding) -> int:
    r"""How many leading tokens of a text cut at some character are the same for every continuation of it.

    A fast tokenizer normalizes character by character, splits the text into pre-tokens and
    tokenizes each pre-token on its own; special tokens are added at the start and the end.
    - Pre-tokens (words, number runs, whitespace runs) are split by patterns that look at most one
      character ahead, so a cut can only change the last pre-token (cut in the middle) and the one
      before it (e.g. `\s+(?!\S)` splits a run of spaces by what follows it): the tokens of every
      earlier pre-token are those of the full text.
    - A BPE tokenizer that keeps the text one pre-token (`_bpe_bigrams`) builds every token by merging
      two neighbouring tokens into a vocabulary token. Where the characters on the two sides of a token
      boundary appear next to each other in no vocabulary token, no merge ever crosses that boundary,
      in the cut text or the full one: the tokens before it depend only on the characters before it,
      which the cut does not change (the last token, which holds the last character, is not used).
    A slow tokenizer, or another that does not split, settles nothing (the document is tokenized whole).
    """
    try:
        words = encoding.word_ids()
    except ValueError:  # slow tokenizer: no alignment information
        return 0
    text = [i for i, w in enumerate(words) if w is not None]
    if not text:
        return 0
    last = words[text[-1]]
    if last > 0:
        return next(i for i in text if words[i] >= last - 1)
    bigrams = _bpe_bigrams(tokenizer)
    if bigrams is None:
        return 0
    tokens, unk = encoding.tokens(), getattr(tokenizer, "unk_token", None)
    for i in range(text[-1] - 1, text[0], -1):  # the boundary before token i, from the end
        a, b = tokens[i - 1], tokens[i]
        ordinary = words[i - 1] is not None and unk not in (a, b) and not (_BYTE_TOKEN.fullmatch(a) or
                                                                             _BYTE_TOKEN.fullmatch(b))
        if ordinary and a[-1] + b[0] not in bigrams:
            return i
    return 0


def document_tokens(tokenizer, text: str, n: int | None = None) -> list[int]:
    """tokenizer(text)["input_ids"][:n], tokenizing only as much of a long text as those tokens need."""
    if n is not None:
        chars = max(_MIN_CHARS, _CHARS_PER_TOKEN * n)
        while chars < len(text):
            encoding = tokenizer(text[:chars])
            if _settled_tokens(tokenizer, encoding) >= n:  # exact: see _settled_tokens
                return encoding["input_ids"][:n]
            chars *= 4
    return tokenizer(text)["input_ids"][:n]


def sample_blocks(texts: list[str], tokenizer, block_size: int, n_blocks: int, seed: int,
                  source: str = "the calibration set") -> torch.Tensor:
    """(n_blocks, block_size) token ids sampled as the paper's code (see module doc)."""
    order = np.random.default_rng(seed).permutation(len(texts))
    if n_blocks > 0:
        order = order[: n_blocks * DOCS_PER_BLOCK]
    docs = [texts[i] for i in order]
    if not any(d.strip() for d in docs):
        raise DataFileError(f"all {len(docs)} sampled documents of {source} are empty; use a file with text")
    blocks: list[list[int]] = []
    with quiet_tokenizer():
        for g in range(0, len(docs), GROUP_DOCS):
            if n_blocks <= 0:  # the whole file: every token
                tokens = list(chain.from_iterable(tokenizer(docs[g: g + GROUP_DOCS])["input_ids"]))
            else:
                # The group's first blocks are the first tokens of its concatenation: stop there.
                need = (n_blocks - len(blocks)) * block_size
                tokens = []
                for doc in docs[g: g + GROUP_DOCS]:
                    tokens += document_tokens(tokenizer, doc, need - len(tokens))
                    if len(tokens) >= need:
                        break
            blocks.extend(tokens[i: i + block_size] for i in range(0, len(tokens) - block_size + 1, block_size))
            if 0 < n_blocks <= len(blocks):
                break
    if n_blocks > 0:
        if len(blocks) < n_blocks:
            raise DataFileError(
                f"{source} gives only {len(blocks)} blocks of {block_size} tokens from {len(docs)} documents, "
                f"but --n_blocks_for_stat asks for {n_blocks}; lower --n_blocks_for_stat or --max_block_size, "
                f"or use a larger file"
            )
        blocks = blocks[:n_blocks]
    if not blocks:
        raise DataFileError(f"{source} holds fewer than {block_size} tokens; lower --max_block_size")
    return torch.tensor(blocks, dtype=torch.long)


def check_blocks(blocks: torch.Tensor, tokenizer, source: str) -> None:
    """Refuse calibration blocks made only of special tokens; warn, with numbers, when they are mostly that."""
    special = torch.isin(blocks, torch.tensor(tokenizer.all_special_ids, dtype=blocks.dtype))
    n_special, n = int(special.sum()), blocks.numel()
    if n_special == n:
        names = ", ".join(sorted({tokenizer.convert_ids_to_tokens(int(t)) for t in blocks.unique()}))
        raise DataFileError(f"the {blocks.shape[0]} calibration blocks from {source} hold only special tokens "
                            f"({n} tokens, all {names}): nothing to calibrate on")
    if n_special > n / 2:
        logger.warning("%d of the %d calibration tokens from %s (%.0f%%) are special tokens", n_special, n, source,
                       100 * n_special / n)


@dataclass(frozen=True)
class FileCalibSet:
    """A calibration set read from a data file."""

    name: str
    default_paths: tuple[str, ...]  # tried in order, relative to the repo root
    how_to_get: str

    def resolve(self, path: str | None) -> Path:
        candidates = [Path(path)] if path else [REPO_ROOT / p for p in self.default_paths]
        for c in candidates:
            if c.is_file():
                return c
        where = str(candidates[0]) if path else " or ".join(str(c) for c in candidates)
        raise DataFileError(f"calibration file for --calib_set {self.name} not found: {where}; {self.how_to_get}")

    needs_model = False

    def blocks(self, tokenizer, block_size: int, n_blocks: int, seed: int, path: str | None = None,
               **_unused) -> torch.Tensor:
        file = self.resolve(path)
        blocks = sample_blocks(read_texts(file), tokenizer, block_size, n_blocks, seed, source=str(file))
        check_blocks(blocks, tokenizer, str(file))
        return blocks


def _collate(rows: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    return {"input_ids": torch.stack(rows)}


def make_loader(blocks: torch.Tensor, batch_size: int, num_workers: int = 0) -> torch.utils.data.DataLoader:
    """Batches of `batch_size` blocks in order (no shuffle, last batch kept), as the original loader.

    The blocks are already in memory, so workers beyond the CPU count only add processes.
    """
    workers = min(num_workers, available_cpus())
    return torch.utils.data.DataLoader(list(blocks), batch_size=batch_size, shuffle=False, drop_last=False,
                                       num_workers=workers, collate_fn=_collate)

