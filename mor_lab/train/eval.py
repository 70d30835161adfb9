"""Perplexity with a sliding window, for any model that maps input_ids to logits.

Text longer than the window is scored the way Hugging Face's "perplexity of fixed-length models" guide
does: windows of ``max_length`` tokens start every ``stride`` tokens, and each window after the first
scores only its last ``stride`` tokens. Every token (but the very first, which nothing predicts) is
scored exactly once, with ``max_length - stride`` tokens or more of context. Smaller strides give each
token more context (lower, fairer perplexity) at the price of more forward passes.

The model is only called as ``model(input_ids)``, so vanilla, early-exit and recursive models are
compared by the same code; a Hugging Face model (whose output has ``.logits``) works too.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .data import tokenize


@dataclass(frozen=True)
class PerplexityResult:
    ppl: float     # exp(nll)
    nll: float     # mean negative log-likelihood per scored token, in nats
    tokens: int    # tokens scored

    def __str__(self) -> str:
        return f"perplexity {self.ppl:.3f} (nll {self.nll:.4f} nats/token over {self.tokens:,} tokens)"


@dataclass(frozen=True)
class Window:
    begin: int       # first token of the window (absolute index)
    end: int         # one past its last token
    score_from: int  # first token it scores; tokens [score_from, end) are predicted from their prefix


def strided_windows(num_tokens: int, max_length: int, stride: int) -> list[Window]:
    """The windows that score tokens 1..num_tokens-1 once each (token 0 has nothing to predict it).

    With ``stride == max_length`` the windows do not overlap and, as in the Hugging Face guide, the
    first token of each window is skipped: nothing inside its window predicts it.
    """
    windows, scored_to = [], 1
    for begin in range(0, num_tokens, stride):
        end = min(begin + max_length, num_tokens)
        windows.append(Window(begin, end, max(scored_to, begin + 1)))
        scored_to = end
        if end == num_tokens:
            break
    return windows


def perplexity(model, tokenizer, text, *, max_length: int | None = None, stride: int | None = None,
               max_tokens: int | None = None, batch_size: int = 4, progress: bool = False) -> PerplexityResult:
    """Perplexity of ``model`` on ``text`` (a string with a tokenizer, or token ids with ``tokenizer=None``).

    ``max_length`` defaults to min(1024, the model's context) and ``stride`` to half of it; ``max_tokens``
    keeps only the first tokens of the text. Windows of the same shape run ``batch_size`` at a time.
    """
    ids = _as_ids(tokenizer, text)
    if max_tokens is not None:
        if max_tokens < 2:
            raise ValueError(f"max_tokens must be at least 2 (one to predict from, one to score), got {max_tokens}")
        ids = ids[:max_tokens]
    if ids.numel() < 2:
        raise ValueError(f"perplexity needs at least 2 tokens, got {ids.numel()}")
    context = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    max_length = max_length if max_length is not None else min(1024, context or 1024)
    stride = stride if stride is not None else max(1, max_length // 2)
    if max_length < 2:
        raise ValueError(f"max_length must be at least 2, got {max_length}")
    if not 1 <= stride <= max_length:
        raise ValueError(f"stride must be between 1 and max_length ({max_length}), got {stride}: a stride "
                         "longer than the window would skip tokens")
    if context is not None and max_length > context:
        raise ValueError(f"max_length ({max_length}) exceeds the model's context "
                         f"(config.max_position_embeddings = {context})")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")

    # Windows with the same length and scored span stack into one batch: the first, the many middle
    # ones, the last. No padding, so models whose routing looks at the whole batch see only real tokens.
    groups: dict[tuple[int, int], list[Window]] = {}
    for w in strided_windows(ids.numel(), max_length, stride):
        groups.setdefault((w.end - w.begin, w.score_from - w.begin), []).append(w)
    batches = [(start, group[i:i + batch_size]) for (_, start), group in groups.items()
               for i in range(0, len(group), batch_size)]
    if progress:
        from tqdm.auto import tqdm
        batches = tqdm(batches, desc="perplexity", unit="batch")

    device = _device_of(model)
    total_nll, count = torch.zeros((), dtype=torch.float64), 0
    with torch.inference_mode(), _eval_mode(model):
        for start, windows in batches:
            x = torch.stack([ids[w.begin:w.end] for w in windows]).to(device)
            logits = model(x)
            logits = getattr(logits, "logits", logits)  # Hugging Face models return an output object
            predicted = logits[:, start - 1:-1].float()  # position t predicts token t + 1
            target = x[:, start:]
            nll = F.cross_entropy(predicted.reshape(-1, predicted.shape[-1]), target.reshape(-1), reduction="sum")
            total_nll += nll.double().cpu()
            count += target.numel()
    mean = (total_nll / count).item()
    return PerplexityResult(ppl=float(torch.tensor(mean).exp()), nll=mean, tokens=count)


def _as_ids(tokenizer, text) -> torch.Tensor:
    if isinstance(text, str):
        if not text.strip():
            raise ValueError("perplexity got empty text")
        if tokenizer is None:
            raise ValueError("text is a string: pass a tokenizer, or pass token ids with tokenizer=None")
        return tokenize(tokenizer, text)
    ids = torch.as_tensor(text, dtype=torch.long)
    if ids.dim() == 2 and ids.shape[0] == 1:
        ids = ids[0]
    if ids.dim() != 1:
        raise ValueError(f"token ids must be 1-D (or [1, T]), got shape {tuple(ids.shape)}")
    if ids.numel() == 0:
        raise ValueError("perplexity got no tokens")
    return ids.cpu()


def _device_of(model) -> torch.device:
    if isinstance(model, torch.nn.Module):
        parameter = next(model.parameters(), None)
        if parameter is not None:
            return parameter.device
    return getattr(model, "device", None) or torch.device("cpu")


@contextlib.contextmanager
def _eval_mode(model):
    """Evaluate without dropout, then leave a module in training mode if it was."""
    was_training = isinstance(model, torch.nn.Module) and model.training
    if was_training:
        model.eval()
    try:
        yield
    finally:
        if was_training:
            model.train()
