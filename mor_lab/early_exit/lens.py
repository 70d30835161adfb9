"""The logit lens over a Trace: at which depth step could each generated token have stopped?

Reads a :class:`~mor_lab.engine.trace.Trace` recorded with ``record_predictions=True``: for every
generated token, the top-1 token and its probability ("confidence") if the model had applied its
final norm + LM head right after each depth step. No model is needed here, only those numbers.

Choices, stated once:

- The *final prediction* is the top-1 after the token's last step (for greedy decoding that is the
  token that was emitted; with sampling it may differ from the emitted token).
- The *oracle exit* is the first step whose top-1 equals the final prediction. Exiting there emits
  the same token, so it is the best any exit rule could do for that token, even if the top-1 wanders
  off again in between.
- A *confidence threshold* ``tau`` exits at the first step whose confidence is ``>= tau``; a token
  that never gets there runs all its steps. ``tau <= 0`` exits everyone at the first step, ``tau > 1``
  nobody.
- Steps are depth-step indices (0-based); "layers" counts steps executed (exit step index + 1).
- This is a per-token, teacher-forced what-if: every token keeps the full model's context. A real
  early-exit decoder changes later tokens when it gets one wrong, and skipped layers leave holes in
  the KV cache; notebook 01 deals with both.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..engine.trace import TokenTrace, Trace


@dataclass
class ExitSummary:
    """Where every generated token exits under one rule, and what that saves."""

    threshold: float | None  # None for the oracle
    exit_step: list[np.ndarray]  # per sequence, per token: depth step it exits after
    layers: list[np.ndarray]  # per sequence, per token: depth steps executed
    full_layers: list[np.ndarray]  # per sequence, per token: steps the full model ran
    agrees: list[np.ndarray]  # per sequence, per token: exited top-1 == final top-1
    confidence: list[np.ndarray]  # per sequence, per token: top-1 probability where it exits
    mean_layers: float  # mean steps executed per token
    layers_saved: float  # fraction of the full model's steps skipped, over all tokens
    agreement: float  # fraction of tokens whose exited prediction equals the final one

    @property
    def num_tokens(self) -> int:
        return int(sum(len(a) for a in self.layers))


def _predictions(token: TokenTrace) -> tuple[np.ndarray, np.ndarray]:
    if token.top1 is None or token.confidence is None:
        raise ValueError("this trace has no logit-lens predictions; generate with record_predictions=True")
    if not token.steps:
        raise ValueError("a token in this trace ran no depth steps, so it has no prediction to analyse")
    return np.asarray(token.top1), np.asarray(token.confidence, dtype=float)


def oracle_index(token: TokenTrace) -> int:
    """Position in ``token.steps`` of the first step whose top-1 equals the final top-1."""
    top1, _ = _predictions(token)
    return int(np.argmax(top1 == top1[-1]))  # the last step always matches, so argmax finds one


def threshold_index(token: TokenTrace, threshold: float) -> int:
    """Position in ``token.steps`` of the first step with confidence ``>= threshold`` (else the last)."""
    _, conf = _predictions(token)
    hits = np.flatnonzero(conf >= threshold)
    return int(hits[0]) if len(hits) else len(conf) - 1


def _summarize(trace: Trace, index_of, threshold: float | None) -> ExitSummary:
    exit_step, layers, full, agrees, conf = [], [], [], [], []
    for seq in trace.tokens:
        idx = [index_of(t) for t in seq]
        exit_step.append(np.array([t.steps[i] for t, i in zip(seq, idx)], dtype=int))
        layers.append(np.array(idx, dtype=int) + 1)
        full.append(np.array([t.num_steps for t in seq], dtype=int))
        agrees.append(np.array([t.top1[i] == t.top1[-1] for t, i in zip(seq, idx)], dtype=bool))
        conf.append(np.array([t.confidence[i] for t, i in zip(seq, idx)], dtype=float))
    ran, total = np.concatenate(layers or [np.zeros(0)]), np.concatenate(full or [np.zeros(0)])
    same = np.concatenate(agrees or [np.zeros(0, bool)])
    if not len(ran):
        raise ValueError("this trace has no generated tokens to analyse")
    return ExitSummary(threshold, exit_step, layers, full, agrees, conf, mean_layers=float(ran.mean()),
                       layers_saved=float(1 - ran.sum() / total.sum()), agreement=float(same.mean()))


def oracle_exits(trace: Trace) -> ExitSummary:
    """Exit every token at its oracle step: the most a perfect exit rule could save (agreement is 1)."""
    return _summarize(trace, oracle_index, None)


def threshold_exits(trace: Trace, threshold: float) -> ExitSummary:
    """Exit every token at the first step whose confidence reaches ``threshold``."""
    return _summarize(trace, lambda t: threshold_index(t, threshold), float(threshold))


def threshold_sweep(trace: Trace, thresholds) -> np.ndarray:
    """``[len(thresholds), 3]`` rows of (threshold, layers saved, agreement): the trade-off curve."""
    rows = []
    for tau in thresholds:
        s = threshold_exits(trace, tau)
        rows.append((float(tau), s.layers_saved, s.agreement))
    return np.array(rows).reshape(-1, 3)


def batched_layers_saved(summary: ExitSummary) -> float:
    """Layers saved when a batch step must run until its deepest token has exited.

    In static batching token ``i`` of every sequence is computed in the same engine step, and a step
    is as deep as its deepest token: per-token savings shrink once tokens share a step.
    """
    ran = full = 0
    for i in range(max(len(a) for a in summary.layers)):
        live = [s for s, a in enumerate(summary.layers) if len(a) > i]
        ran += len(live) * max(int(summary.layers[s][i]) for s in live)
        full += sum(int(summary.full_layers[s][i]) for s in live)
    return 1 - ran / full


def lens_matrices(trace: Trace, seq: int) -> tuple[np.ndarray, np.ndarray]:
    """For sequence ``seq``: ``[steps x tokens]`` confidence and "top-1 == final top-1" matrices.

    Rows are depth steps ``0 .. trace.num_steps-1``; a step a token did not run is NaN / False.
    """
    tokens = trace.tokens[seq]
    conf = np.full((trace.num_steps, len(tokens)), np.nan)
    match = np.zeros((trace.num_steps, len(tokens)), dtype=bool)
    for j, token in enumerate(tokens):
        top1, c = _predictions(token)
        conf[token.steps, j] = c
        match[token.steps, j] = top1 == top1[-1]
    return conf, match
