"""A small byte-level BPE tokenizer trained on an offline corpus, and the corpus as token ids, cached.

The lab's models are trained from scratch on text every Python install has (the standard library's
source and docstrings, the pydoc topics: :mod:`mor_lab.train.data`). Their tokenizer is trained on the
*training* split only, with HF ``tokenizers``' BPE trainer, which is deterministic for a given text
(ties between merges are broken by the pair's ids, not by hash order: checked across processes and
hash seeds); ``tokenizer_sha`` identifies it. Training it on the full ~28 MB corpus and tokenizing
take about a minute on 2 cores, so both are cached under ``$MOR_LAB_CACHE/lab_tokens``, keyed by
the text itself, the vocabulary size and the ``tokenizers`` version.
"""
from __future__ import annotations

import hashlib
import json
import platform
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from .data import Corpus, load_corpus, tokenize

SPECIAL_TOKEN = "<|endoftext|>"
LAB_CORPUS = ("pydoc", "stdlib_docs", "stdlib_code")  # what ``corpus="lab"`` means


def train_bpe(text: str, vocab_size: int = 2048):
    """A byte-level BPE tokenizer trained on ``text`` (seconds for ~1 MB), as a HF fast tokenizer.

    Deterministic: the same text and size give the same merges and ids in any process."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    if not isinstance(vocab_size, int) or vocab_size < 257 + 1:
        raise ValueError(f"vocab_size must be an integer >= 258 (256 bytes + the special token + merges), "
                         f"got {vocab_size!r}")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[SPECIAL_TOKEN], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator((text[i:i + 10_000] for i in range(0, len(text), 10_000)), trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=SPECIAL_TOKEN)


def tokenizer_sha(tokenizer) -> str:
    """A short id of a fast tokenizer's vocabulary, merges and settings."""
    return hashlib.sha256(tokenizer.backend_tokenizer.to_str().encode()).hexdigest()[:16]


def corpus_parts(corpus: str) -> list[str]:
    """``"lab"`` -> the three offline corpora; ``"a,b"`` -> both; anything else: one corpus (name or path)."""
    if corpus == "lab":
        return list(LAB_CORPUS)
    return [part.strip() for part in str(corpus).split(",") if part.strip()]


def load_parts(corpus: str, max_chars: int | None = None) -> Corpus:
    """The corpus ``corpus`` (see :func:`corpus_parts`), each part capped at ``max_chars``, joined."""
    parts = [load_corpus(part, max_chars=max_chars) for part in corpus_parts(corpus)]
    if not parts:
        raise ValueError(f"corpus {corpus!r} names no corpus")
    return Corpus(corpus, "\n\n".join(p.train for p in parts if p.train),
                  "\n\n".join(p.validation for p in parts if p.validation))


@dataclass
class CorpusTokens:
    """A corpus as token ids, with the tokenizer that made them and where they came from."""
    tokenizer: object
    train: torch.Tensor  # [N] int64
    validation: torch.Tensor  # [M] int64
    info: dict  # corpus, characters, tokens, text and tokenizer hashes, Python version (the stdlib is the text)


def cache_dir() -> Path:
    from ..models.hf import cache_root
    return cache_root() / "lab_tokens"


def corpus_tokens(corpus: str = "lab", vocab_size: int = 4096, max_chars: int | None = None, *,
                  tokenizer=None, use_cache: bool = True) -> CorpusTokens:
    """Token ids of ``corpus`` with a BPE tokenizer of ``vocab_size`` trained on its training split (or
    with ``tokenizer``, e.g. a teacher's); cached on disk by the text's hash."""
    text = load_parts(corpus, max_chars)
    if not text.train or not text.validation:
        raise ValueError(f"corpus {corpus!r} (max_chars={max_chars}) has an empty training or validation split; "
                         f"raise max_chars or use a larger corpus")
    import tokenizers
    digest = hashlib.sha256()
    for piece in (text.train, "\x00", text.validation, "\x00", str(vocab_size), tokenizers.__version__,
                  tokenizer_sha(tokenizer) if tokenizer is not None else "own"):
        digest.update(piece.encode())
    key = digest.hexdigest()[:20]
    directory = cache_dir() / key
    if use_cache and (directory / "info.json").exists():
        from transformers import PreTrainedTokenizerFast
        tok = tokenizer or PreTrainedTokenizerFast.from_pretrained(str(directory))
        return CorpusTokens(tok, torch.load(directory / "train.pt").long(),
                            torch.load(directory / "validation.pt").long(),
                            json.loads((directory / "info.json").read_text()))
    tok = tokenizer or train_bpe(text.train, vocab_size)
    train, validation = tokenize(tok, text.train), tokenize(tok, text.validation)
    info = {"corpus": corpus, "max_chars": max_chars, "train_chars": len(text.train),
            "validation_chars": len(text.validation), "train_tokens": int(train.numel()),
            "validation_tokens": int(validation.numel()), "vocab_size": len(tok),
            "text_sha256": hashlib.sha256((text.train + "\x00" + text.validation).encode()).hexdigest()[:16],
            "tokenizer_sha": tokenizer_sha(tok), "python": platform.python_version(),
            "tokenizers": tokenizers.__version__}
    if use_cache:
        directory.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=directory.parent, prefix=".writing-"))
        try:
            tok.save_pretrained(str(tmp))
            dtype = torch.int16 if len(tok) < 2 ** 15 else torch.int32
            torch.save(train.to(dtype), tmp / "train.pt")
            torch.save(validation.to(dtype), tmp / "validation.pt")
            (tmp / "info.json").write_text(json.dumps(info, indent=1))
            shutil.rmtree(directory, ignore_errors=True)
            tmp.rename(directory)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return CorpusTokens(tok, train, validation, info)
