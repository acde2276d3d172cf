"""Calibration sampling against the original datasets-based pipeline, and data-file errors."""

from __future__ import annotations

import gzip
import itertools
import json
import subprocess
import sys

import pytest
import torch
from transformers import AutoTokenizer

from data import DataFileError, build_calib_loader, read_texts, sample_blocks
from data.calib import _MIN_CHARS, _settled_tokens, check_blocks, document_tokens

from conftest import REPO


def original_pipeline(texts, tokenizer, block_size, n_blocks, seed):
    """The paper code's sampling, written with HF `datasets` as the original `data/build.py` does."""
    datasets = pytest.importorskip("datasets")
    ds = datasets.Dataset.from_dict({"text": texts})
    ds = ds.shuffle(seed=seed).select(range(min(n_blocks * 16, len(ds))))
    ds = ds.map(lambda ex: tokenizer(ex["text"]), batched=True, remove_columns=["text"])

    def group_texts(examples):
        cat = {k: list(itertools.chain(*examples[k])) for k in examples.keys()}
        total = len(cat["input_ids"])
        if total >= block_size:
            total = (total // block_size) * block_size
        return {k: [t[i: i + block_size] for i in range(0, total, block_size)] for k, t in cat.items()}

    ds = ds.map(group_texts, batched=True)
    return torch.tensor(ds.select(range(n_blocks))["input_ids"])


@pytest.mark.parametrize("n_blocks,block_size", [(8, 64), (100, 256)])
def test_sampling_matches_original_pipeline(c4_path, tokenizer_dir, n_blocks, block_size):
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    # Twice the sample: 2000 documents, so that groups of 1000 documents and their boundary matter.
    texts = read_texts(c4_path) * 2
    ours = sample_blocks(texts, tok, block_size, n_blocks, seed=42)
    assert ours.shape == (n_blocks, block_size)
    assert torch.equal(ours, original_pipeline(texts, tok, block_size, n_blocks, seed=42))


def test_seed_changes_blocks(c4_path, tokenizer_dir):
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    texts = read_texts(c4_path)
    a = sample_blocks(texts, tok, 64, 4, seed=1)
    assert torch.equal(a, sample_blocks(texts, tok, 64, 4, seed=1))
    assert not torch.equal(a, sample_blocks(texts, tok, 64, 4, seed=2))


def test_gzip_and_json_array_read_the_same(c4_path, tmp_path):
    texts = read_texts(c4_path)
    gz = tmp_path / "c4.json.gz"
    with gzip.open(gz, "wt", encoding="utf-8") as f:
        f.write(c4_path.read_text(encoding="utf-8"))
    arr = tmp_path / "math_style.json"
    arr.write_text(json.dumps([{"text": t} for t in texts[:50]]))
    assert read_texts(gz) == texts
    assert read_texts(arr) == texts[:50]


def test_loader_batches_in_order(c4_path, tokenizer_dir):
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    loader = build_calib_loader("c4", tok, 32, 10, 4, 0, seed=42, path=str(c4_path))
    sizes = [b["input_ids"].shape for b in loader]
    assert sizes == [(4, 32), (4, 32), (2, 32)]
    assert torch.equal(torch.cat([b["input_ids"] for b in loader]),
                       sample_blocks(read_texts(c4_path), tok, 32, 10, seed=42))


def test_block_size_capped_by_model_max_length(c4_path, tokenizer_dir):
    tok = AutoTokenizer.from_pretrained(tokenizer_dir, model_max_length=24)
    loader = build_calib_loader("c4", tok, 2048, 2, 2, 0, path=str(c4_path))
    assert next(iter(loader))["input_ids"].shape == (2, 24)


def test_missing_file_says_where_and_how(tokenizer_dir, tmp_path, monkeypatch):
    import data.calib

    monkeypatch.setattr(data.calib, "REPO_ROOT", tmp_path)  # a checkout without the data files
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    with pytest.raises(DataFileError, match=r"not found: .*data/c4-train.00000-of-01024.json .*allenai/c4"):
        build_calib_loader("c4", tok, 32, 2, 2, 0)
    with pytest.raises(DataFileError, match=r"not found: .*nope.json; .*math_calib_construction"):
        build_calib_loader("math", tok, 32, 2, 2, 0, path=str(tmp_path / "nope.json"))


@pytest.mark.parametrize("content,match", [
    ('{"text": "a"}\n{"text": oops}\n', r"line 2 is not valid JSON"),
    ('{"text": "a"}\n{"content": "b"}\n', r"record 2 has no string 'text' field"),
    ('[{"text": "a"}, ', r"is not valid JSON"),
    ("", r"holds no documents"),
])
def test_malformed_file(tmp_path, content, match):
    p = tmp_path / "bad.json"
    p.write_text(content)
    with pytest.raises(DataFileError, match=match):
        read_texts(p)


def test_fewer_blocks_than_asked(c4_path, tokenizer_dir):
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    texts = read_texts(c4_path)[:20]
    with pytest.raises(DataFileError, match=r"gives only \d+ blocks of 512 tokens .* asks for 500"):
        sample_blocks(texts, tok, 512, 500, seed=0)


def _awkward_text(texts) -> str:
    """C4 text with what pre-tokenizers treat specially near any cut: runs of spaces and newlines, digits,
    punctuation runs, contractions, accents and combining marks, emoji, a literal special token."""
    pieces = ["  ", "\n\n", "   x", "1234567", "?!...", "'s", "don't", "café", "e\u0301", "👍🏽", "<s>", "\t"]
    words = " ".join(texts[:40]).split(" ")
    return "".join(w + (pieces[i % len(pieces)] if i % 3 == 0 else " ") for i, w in enumerate(words))


def test_document_tokens_equal_the_full_tokenization_at_every_cut(c4_path, tokenizer_dir):
    """A long document tokenized only as far as n tokens need gives the first n tokens of the whole document."""
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    text = _awkward_text(read_texts(c4_path))
    full = tok(text)["input_ids"]
    assert len(text) > 40 * _MIN_CHARS and len(full) > 5000
    for n in [*range(1, 400), *range(400, 5000, 37)]:  # every first-try cut position up to 3200 characters
        assert document_tokens(tok, text, n) == full[:n], n
    assert document_tokens(tok, text) == full


@pytest.fixture(scope="module")
def sentencepiece_style(c4_path):
    """A BPE tokenizer as transformers 5 builds Llama's and Mixtral's: Metaspace(split=False), so a document is
    one pre-token; byte fallback. Trained with splitting at spaces, as SentencePiece trains, on the C4 sample."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    bytes_ = [f"<0x{i:02X}>" for i in range(256)]
    tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first", split=True)
    tok.train_from_iterator(read_texts(c4_path)[:300], trainers.BpeTrainer(
        vocab_size=1200, special_tokens=["<unk>", "<s>", "</s>", *bytes_]))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first", split=False)
    tok.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()])
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   model_max_length=4096)


def test_document_tokens_of_a_sentencepiece_style_tokenizer(c4_path, sentencepiece_style):
    """The whole document is one pre-token: cuts are settled at token boundaries no vocabulary token crosses."""
    tok = sentencepiece_style
    text = _awkward_text(read_texts(c4_path))
    full = tok(text)["input_ids"]
    assert _settled_tokens(tok, tok(text[:2000])) > 100  # cut documents are settled, not tokenized whole
    for n in [*range(1, 300, 3), *range(300, 5000, 97)]:
        assert document_tokens(tok, text, n) == full[:n], n
    long_texts = [" ".join(read_texts(c4_path)[i: i + 20]) for i in range(0, 400, 9)]
    assert torch.equal(sample_blocks(long_texts, tok, 128, 4, seed=5), original_pipeline(long_texts, tok, 128, 4, 5))


def test_document_tokens_of_a_tokenizer_that_settles_nothing(c4_path):
    """A WordPiece model over the whole text (no pre-tokenizer): neither rule applies, the document is
    tokenized whole."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    text = " ".join(read_texts(c4_path)[:10])
    chars = sorted(set(text))
    vocab = {"[UNK]": 0, **{c: i + 1 for i, c in enumerate(chars)}, **{"##" + c: len(chars) + i + 1
                                                                      for i, c in enumerate(chars)}}
    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordPiece(
        vocab, unk_token="[UNK]", max_input_chars_per_word=10**9)), unk_token="[UNK]")
    full = tok(text)["input_ids"]
    assert len(text) > _MIN_CHARS and _settled_tokens(tok, tok(text[:_MIN_CHARS])) == 0
    assert document_tokens(tok, text, 50) == full[:50]


@pytest.mark.parametrize("n_blocks,block_size", [(2, 256), (8, 64)])
def test_long_documents_match_the_original_pipeline(c4_path, tokenizer_dir, n_blocks, block_size):
    """Documents of 5-32 C4 documents each: the blocks come from the first few, cut short, and still equal
    the original pipeline's (which tokenizes every sampled document whole)."""
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    texts = read_texts(c4_path)
    long_texts = [" ".join(texts[i: i + 5 + 3 * (i % 10)]) for i in range(0, 300, 7)] + texts[:50]
    ours = sample_blocks(long_texts, tok, block_size, n_blocks, seed=3)
    assert torch.equal(ours, original_pipeline(long_texts, tok, block_size, n_blocks, seed=3))


def test_one_50mb_document_makes_1024_tokens_in_seconds_with_bounded_memory(tmp_path, tokenizer_dir, c4_path):
    """Before: the whole document was tokenized (7.4 GB and 125 s for 50 MB on a real tokenizer)."""
    text = " ".join(read_texts(c4_path))
    doc = (text * (50_000_000 // len(text) + 1))[:50_000_000]
    big = tmp_path / "one_doc.json"
    big.write_text(json.dumps({"text": doc}) + "\n")
    del doc, text
    script = (
        "import resource, sys, time\n"
        "from transformers import AutoTokenizer\n"
        "from data import build_calib_loader\n"
        f"tok = AutoTokenizer.from_pretrained({str(tokenizer_dir)!r})\n"
        "base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        "t = time.time()\n"
        f"loader = build_calib_loader('c4', tok, 1024, 1, 1, 0, path={str(big)!r})\n"
        "print(time.time() - t, (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) / 1024,"
        " tuple(next(iter(loader))['input_ids'].shape))\n"
    )
    out = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, check=True)
    seconds, extra_mib, shape = out.stdout.strip().split(maxsplit=2)
    assert shape == "(1, 1024)"
    # Reading the file (50 MB of JSON, then the 50 MB string) is the rest: the tokenizer sees a few KB.
    assert float(extra_mib) < 400, out.stdout
    assert float(seconds) < 10, out.stdout  # about 1 s on 2 CPU cores, most of it reading the file


def test_all_special_calibration_blocks_are_refused(tokenizer_dir, caplog):
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    bos_only = torch.full((4, 8), tok.bos_token_id)  # e.g. sampling from a model with 1-token blocks
    with pytest.raises(DataFileError, match=r"the 4 calibration blocks from sampling hold only special tokens "
                                            r"\(32 tokens, all <s>\)"):
        check_blocks(bos_only, tok, "sampling")
    mostly = bos_only.clone()
    mostly[:, :3] = 100  # 12 of 32 ordinary
    check_blocks(mostly, tok, "f.json")
    assert "20 of the 32 calibration tokens from f.json (62%) are special tokens" in caplog.text


def test_blocks_of_one_token_are_refused(tokenizer_dir, c4_path):
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    with pytest.raises(DataFileError, match=r"calibration blocks of 1 token .* have no context"):
        build_calib_loader("c4", tok, 1, 4, 2, 0, path=str(c4_path))
