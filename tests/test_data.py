"""Calibration sampling against the original datasets-based pipeline, and data-file errors."""

from __future__ import annotations

import gzip
import itertools
import json

import pytest
import torch
from transformers import AutoTokenizer

from data import DataFileError, build_calib_loader, read_texts, sample_blocks


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
