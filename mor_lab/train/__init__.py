"""Data and evaluation for training: offline corpora, token batches, sliding-window perplexity."""
from .data import (OFFLINE_CORPORA, Corpus, CorpusError, TokenBatches, is_validation, load_corpus,
                   module_docstrings, tokenize)
from .eval import PerplexityResult, Window, perplexity, strided_windows

__all__ = ["OFFLINE_CORPORA", "Corpus", "CorpusError", "PerplexityResult", "TokenBatches", "Window",
           "is_validation", "load_corpus", "module_docstrings", "perplexity", "strided_windows", "tokenize"]
