"""Text corpora that need no download, split deterministically, and token batches for training.

Every Python install ships English prose (the pydoc topics behind ``help()``, the standard library's
docstrings) and tens of MB of code (the standard library itself), so notebooks can measure perplexity
and fine-tune offline. ``load_corpus`` also reads local text files, and Hugging Face datasets when the
``datasets`` package and a network are available.

The train/validation split is decided per document by a hash of its key (topic name, file path, ...),
not by position or a random draw: it is the same on every machine and run, and a document never moves
between splits when a corpus is capped or grows.
"""
from __future__ import annotations

import ast
import functools
import hashlib
import os
import sysconfig
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator

import torch

VALIDATION_FRACTION = 0.1
OFFLINE_CORPORA = {
    "pydoc": "CPython's pydoc topics: ~0.5 MB of documentation prose, one document per topic",
    "stdlib_docs": "docstrings of the standard library modules: ~1.8 MB of prose, one document per module",
    "stdlib_code": "the standard library's source code: tens of MB of Python, one document per file",
}
TEXT_SUFFIXES = (".txt", ".md")
_TEST_DIRS = {"test", "tests", "idle_test"}  # docstrings in test suites are not documentation


class CorpusError(ValueError):
    """A corpus could not be loaded; the message says why and what to use instead."""


@dataclass(frozen=True)
class Corpus:
    """A corpus as two strings (documents joined by blank lines): enough for tokenizing and perplexity."""
    name: str
    train: str
    validation: str

    def __repr__(self) -> str:
        return (f"Corpus({self.name!r}, train={len(self.train):,} chars, "
                f"validation={len(self.validation):,} chars)")


def load_corpus(name: str | os.PathLike, max_chars: int | None = None,
                validation_fraction: float = VALIDATION_FRACTION) -> Corpus:
    """Load a corpus by name: an offline one (``OFFLINE_CORPORA``), a local file or directory of
    .txt/.md files, or ``"hf:<dataset>[:<config>]"``.

    About ``validation_fraction`` of the documents go to validation (by count, so its share of the
    characters varies with document sizes). ``max_chars`` caps train + validation together, shared by
    the same fraction: each split is filled with whole documents taken in a hash order (a spread-out
    sample, not the alphabetically first ones), skipping those too big for the room left, and only
    what is kept is read, so a small cap is fast.
    """
    if max_chars is not None and max_chars <= 0:
        raise ValueError(f"max_chars must be a positive number of characters or None, got {max_chars!r}")
    if not 0 < validation_fraction < 1:
        raise ValueError(f"validation_fraction must be in (0, 1), got {validation_fraction!r}")
    key = str(name)
    if key in OFFLINE_CORPORA:
        sources = {"pydoc": _pydoc_documents, "stdlib_docs": _stdlib_docs_documents,
                   "stdlib_code": _stdlib_code_documents}
        return _split_documents(key, sources[key](), max_chars, validation_fraction)
    if key.startswith("hf:"):
        return _hf_corpus(key, max_chars, validation_fraction)
    if os.path.exists(key):
        return _split_documents(key, _local_documents(Path(key)), max_chars, validation_fraction)
    raise CorpusError(
        f"unknown corpus {key!r}: use one of the offline corpora ({', '.join(OFFLINE_CORPORA)}), "
        f"a path to a text file or a directory of {'/'.join(TEXT_SUFFIXES)} files, "
        f"or 'hf:<dataset>[:<config>]' (needs the `datasets` package and a network)")


# ---------------------------------------------------------------------------------------------------
# Deterministic split. Documents are (key, read) pairs: reading is deferred so a cap reads only what
# it keeps (parsing all of the stdlib takes seconds).

def _unit_hash(key: str, salt: str) -> float:
    """A number in [0, 1) fixed by ``key`` alone (Python's ``hash`` is salted per process)."""
    digest = hashlib.blake2b(f"{salt}:{key}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2 ** 64


def is_validation(key: str, validation_fraction: float = VALIDATION_FRACTION) -> bool:
    """Whether the document named ``key`` belongs to the validation split."""
    return _unit_hash(key, "split") < validation_fraction


def _budgets(max_chars: int | None, validation_fraction: float) -> dict[str, int | None]:
    """Characters each split may hold: a cap is shared by the fraction, so small caps keep a validation split."""
    if max_chars is None:
        return {"train": None, "validation": None}
    validation = max(1, int(max_chars * validation_fraction))
    return {"train": max_chars - validation, "validation": validation}


def _split_documents(name: str, documents: dict[str, Callable[[], str]], max_chars: int | None,
                     validation_fraction: float) -> Corpus:
    keys = sorted(documents)
    if max_chars is not None:
        keys.sort(key=lambda k: _unit_hash(k, "order"))  # a spread-out sample, independent of the split hash
    budget = _budgets(max_chars, validation_fraction)
    kept = {"train": {}, "validation": {}}
    used = {"train": 0, "validation": 0}

    def full(split):
        return budget[split] is not None and used[split] >= 0.99 * budget[split]

    for key in keys:
        if full("train") and full("validation"):
            break
        split = "validation" if is_validation(key, validation_fraction) else "train"
        if full(split):
            continue  # without reading it: reading can mean parsing
        text = documents[key]().strip()
        if not text or (budget[split] is not None and used[split] + len(text) > budget[split]):
            continue  # empty, or too big for the room left: documents are kept whole
        kept[split][key] = text
        used[split] += len(text) + 2
    if not kept["train"] and not kept["validation"]:
        raise CorpusError(f"corpus {name!r} has no text" + (f" within max_chars={max_chars}" if max_chars else ""))
    # Each split reads in key order, whatever order the cap drew documents in.
    train, validation = ("\n\n".join(kept[s][k] for k in sorted(kept[s])) for s in ("train", "validation"))
    return Corpus(name, train, validation)


# ---------------------------------------------------------------------------------------------------
# Sources

def _pydoc_documents() -> dict[str, Callable[[], str]]:
    from pydoc_data.topics import topics
    return {name: functools.partial(str, text) for name, text in topics.items()}


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def _stdlib_files(skip_tests: bool) -> list[Path]:
    root = stdlib_root()
    files = []
    for path in root.rglob("*.py"):
        parts = set(path.relative_to(root).parts[:-1])
        if "site-packages" in parts or "dist-packages" in parts or (skip_tests and parts & _TEST_DIRS):
            continue
        files.append(path)
    return files


def _stdlib_code_documents() -> dict[str, Callable[[], str]]:
    root = stdlib_root()
    return {path.relative_to(root).as_posix(): functools.partial(_read_source, path)
            for path in _stdlib_files(skip_tests=False)}


def _stdlib_docs_documents() -> dict[str, Callable[[], str]]:
    root = stdlib_root()
    return {path.relative_to(root).as_posix(): functools.partial(module_docstrings, str(path))
            for path in _stdlib_files(skip_tests=True)}


def _read_source(path: Path) -> str:
    """A source file's text; the test suite holds a few deliberately mis-encoded files: skip those."""
    try:
        return path.read_text(encoding="utf-8")
    except (UnicodeDecodeError, OSError):
        return ""


@functools.lru_cache(maxsize=None)
def module_docstrings(path: str) -> str:
    """The docstrings of a Python file (module, classes, functions), found by parsing, never importing.

    Cached per process: parsing the whole stdlib takes several seconds on a small CPU.
    """
    source = _read_source(Path(path))
    try:
        with warnings.catch_warnings():  # e.g. invalid escape sequences in old modules
            warnings.simplefilter("ignore")
            tree = ast.parse(source)
    except (SyntaxError, ValueError):
        return ""
    docs = []

    def visit(node):  # statements only: docstrings never hide inside expressions, and skipping them is fast
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            doc = ast.get_docstring(node)
            if doc:
                docs.append(doc)
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.stmt, ast.excepthandler, ast.match_case)):
                visit(child)

    visit(tree)
    return "\n\n".join(docs)


def _local_documents(path: Path, block_chars: int = 4000) -> dict[str, Callable[[], str]]:
    """A file, or every .txt/.md file under a directory, cut into blocks of paragraphs.

    Blocks (not whole files) are the documents so that even a single file gets a validation split.
    """
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.suffix.lower() in TEXT_SUFFIXES)
    documents = {}
    for file in files:
        name = file.name if file == path else file.relative_to(path).as_posix()
        text = file.read_text(encoding="utf-8", errors="replace")
        for i, block in enumerate(_paragraph_blocks(text, block_chars)):
            documents[f"{name}#{i:06d}"] = functools.partial(str, block)
    return documents


def _paragraph_blocks(text: str, block_chars: int) -> list[str]:
    blocks, current, size = [], [], 0
    for paragraph in text.split("\n\n"):
        current.append(paragraph)
        size += len(paragraph) + 2
        if size >= block_chars:
            blocks.append("\n\n".join(current))
            current, size = [], 0
    if current:
        blocks.append("\n\n".join(current))
    return blocks


def _hf_corpus(name: str, max_chars: int | None, validation_fraction: float) -> Corpus:
    """``hf:<dataset>[:<config>]``: the dataset's own validation split when it has one, else a hash split."""
    offline = f"offline corpora: {', '.join(OFFLINE_CORPORA)}, or a local text file"
    try:
        import datasets
    except ImportError:
        raise CorpusError(f"{name!r} needs the `datasets` package (pip install datasets) and a network; "
                          f"or use an {offline}") from None
    path, _, config = name[3:].partition(":")
    try:  # streaming reads only what a cap keeps
        splits = datasets.load_dataset(path, config or None, streaming=max_chars is not None)
    except Exception as e:  # offline, unknown dataset, missing config: the library's message says which
        raise CorpusError(f"could not load Hugging Face dataset {name!r} ({type(e).__name__}: {e}); "
                          f"without a network use an {offline}") from e
    if "validation" in splits:
        train_split = "train" if "train" in splits else next(s for s in splits if s != "validation")
        budget = _budgets(max_chars, validation_fraction)
        train = _take(_texts(splits[train_split]), budget["train"])
        validation = _take(_texts(splits["validation"]), budget["validation"])
        return Corpus(name, "\n\n".join(train), "\n\n".join(validation))
    rows = _take(_texts(splits["train"] if "train" in splits else next(iter(splits.values()))), max_chars)
    documents = {f"row{i:09d}": functools.partial(str, text) for i, text in enumerate(rows)}
    return _split_documents(name, documents, None, validation_fraction)


def _texts(rows: Iterable[dict]) -> Iterator[str]:
    """The text of each row: the ``text`` column, else the first string column."""
    column = None
    for row in rows:
        if column is None:
            column = "text" if "text" in row else next((k for k, v in row.items() if isinstance(v, str)), None)
            if column is None:
                raise CorpusError(f"the dataset has no text column (columns: {', '.join(row)})")
        yield row[column]


def _take(texts: Iterable[str], max_chars: int | None) -> list[str]:
    kept, total = [], 0
    for text in texts:
        text = text.strip()
        if not text:
            continue
        if max_chars is not None:
            if total >= max_chars:
                break
            text = text[:max_chars - total]
        kept.append(text)
        total += len(text) + 2
    return kept


# ---------------------------------------------------------------------------------------------------
# Tokens

def tokenize(tokenizer, text: str, chunk_chars: int = 100_000) -> torch.Tensor:
    """Token ids of ``text`` as a 1-D LongTensor, without special tokens.

    Long text is cut at newlines into ~``chunk_chars`` pieces, tokenized as one batch (fast tokenizers
    run it in parallel); ids may differ from one-shot tokenization only at those rare seams. Takes a
    Hugging Face tokenizer or any object with ``encode(text) -> list[int]``.
    """
    pieces, start = [], 0
    while start < len(text):
        cut = text.find("\n", start + chunk_chars)
        end = len(text) if cut == -1 else cut + 1
        pieces.append(text[start:end])
        start = end
    if not pieces:
        return torch.empty(0, dtype=torch.long)
    if hasattr(tokenizer, "batch_decode"):  # Hugging Face
        ids = tokenizer(pieces, add_special_tokens=False)["input_ids"]
    else:
        ids = [tokenizer.encode(piece) for piece in pieces]
    return torch.tensor([i for piece in ids for i in piece], dtype=torch.long)


class TokenBatches:
    """``[batch_size, seq_len]`` LongTensor blocks cut from a token stream; each ``for`` is one epoch.

    The stream is cut into consecutive non-overlapping blocks; an epoch visits them in an order drawn
    from ``generator`` (or a new one seeded with ``seed``), so a run is reproducible and successive
    epochs differ. Pass a tokenizer to tokenize text first. Any incomplete last batch is dropped unless
    ``drop_last=False``.
    """

    def __init__(self, tokens, batch_size: int, seq_len: int, *, tokenizer=None, shuffle: bool = True,
                 seed: int = 0, generator: torch.Generator | None = None, drop_last: bool = True):
        if batch_size < 1 or seq_len < 1:
            raise ValueError(f"batch_size and seq_len must be >= 1, got {batch_size} and {seq_len}")
        if isinstance(tokens, str):
            if tokenizer is None:
                raise ValueError("TokenBatches got text: pass tokenizer=..., or token ids")
            tokens = tokenize(tokenizer, tokens)
        tokens = torch.as_tensor(tokens, dtype=torch.long).flatten()
        num_blocks = tokens.numel() // seq_len
        if num_blocks == 0:
            raise ValueError(f"{tokens.numel()} tokens make no block of seq_len={seq_len}")
        self.blocks = tokens[:num_blocks * seq_len].view(num_blocks, seq_len)
        self.batch_size, self.shuffle, self.drop_last = batch_size, shuffle, drop_last
        self.generator = generator if generator is not None else torch.Generator().manual_seed(seed)

    def __len__(self) -> int:
        n = len(self.blocks)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def __iter__(self) -> Iterator[torch.Tensor]:
        n = len(self.blocks)
        order = torch.randperm(n, generator=self.generator) if self.shuffle else torch.arange(n)
        for i in range(len(self)):
            yield self.blocks[order[i * self.batch_size:(i + 1) * self.batch_size]]
