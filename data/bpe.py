"""Byte-level BPE tokenizers trained from text: the demo model's (scripts/train_moe.py) and the tests'."""

from __future__ import annotations

import json
from pathlib import Path

SPECIAL_TOKENS = ("<unk>", "<s>", "</s>")  # ids 0, 1, 2
UNK, BOS, EOS = SPECIAL_TOKENS
# transformers 5 saves the class as "TokenizersBackend", which transformers 4.x cannot load; both load this name.
SAVED_CLASS = "PreTrainedTokenizerFast"
# Keys transformers 5 writes that 4.x does not know; a PreTrainedTokenizerFast needs none of them to load.
NOT_SAVED = ("backend",)


def train_bpe_tokenizer(texts: list[str], vocab_size: int, model_max_length: int, min_frequency: int = 2):
    """A byte-level BPE tokenizer trained on `texts`, as a PreTrainedTokenizerFast.

    ByteLevel pre-tokenizer and decoder, special tokens <unk> <s> </s> (ids 0, 1, 2; pad = </s>);
    calling it prepends <s>, as the Llama/Mixtral tokenizers do. vocab_size counts the special tokens.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency,
                                  special_tokens=list(SPECIAL_TOKENS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer, length=len(texts))
    bos_id = tok.token_to_id(BOS)
    tok.post_processor = processors.Sequence([
        processors.ByteLevel(trim_offsets=False),
        processors.TemplateProcessing(single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, bos_id)]),
    ])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS, eos_token=EOS, unk_token=UNK, pad_token=EOS,
                                   model_max_length=model_max_length, padding_side="right",
                                   clean_up_tokenization_spaces=False)


def save_tokenizer(tokenizer, folder: str | Path) -> None:
    """tokenizer.save_pretrained(folder), with a tokenizer_config.json that transformers 4.x and 5.x both load
    (the form of demo/tiny-moe's, which tests/test_checkpoint_compat.py loads in 4.57)."""
    tokenizer.save_pretrained(folder)
    config_file = Path(folder) / "tokenizer_config.json"
    config = json.loads(config_file.read_text())
    config["tokenizer_class"] = SAVED_CLASS
    for key in NOT_SAVED:
        config.pop(key, None)
    config_file.write_text(json.dumps(config, indent=2, sort_keys=True, ensure_ascii=False) + "\n")
