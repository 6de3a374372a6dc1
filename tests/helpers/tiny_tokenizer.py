"""A word-level tokenizer over the tiny models' vocabulary, built in memory (nothing is downloaded)."""

from __future__ import annotations

from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

# Ids 0-2 are pad/bos/eos as in conftest's tiny models; the rest are words, so every id decodes to a visible token.
SPECIAL = ["<pad>", "<s>", "</s>"]


def tiny_tokenizer(vocab_size: int = 97) -> PreTrainedTokenizerFast:
    """A fast tokenizer with `vocab_size` ids: "<pad>", "<s>", "</s>", then "w3", "w4", ..."""
    vocab = {token: i for i, token in enumerate(SPECIAL)}
    vocab.update({f"w{i}": i for i in range(len(SPECIAL), vocab_size)})
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<pad>")
