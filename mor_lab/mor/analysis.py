"""What the trained MoR family shows, on held-out text: the measurements behind issue 12's must-shows.

(a) :func:`nats_per_token` and :func:`greedy_sample` per model (far from uniform, ``ln V``?);
(b) :func:`equal_flops_table`: members at equal training FLOPs, mean and seed-to-seed spread;
(c) :func:`depth_ablation`: the loss with the learned routing, with every token forced to 1 or to
    N_r recursions, and with a random router of the same capacities;
(d) :func:`recursions_by_class`: mean recursions per lexical token class (identifiers, keywords,
    punctuation, indentation, digits, strings, comments, ...);
(e) :func:`routing_agreement`: decode-time (causal) routing vs the training-time top-k, per recursion.

The random router keeps each sequence's learned *counts* and moves them to random tokens: a per-row
random permutation of the learned recursions. For expert-choice that is exactly "random top-k at the
capacities" (the same tokens per recursion, nested), for token-choice the same depth histogram.
"""
from __future__ import annotations

import builtins
import json
import keyword
import math
import re
import statistics
from pathlib import Path

import torch

from ..train.losses import cross_entropy, next_token_targets
from .model import MoRModel, decode_routing, topk_agreement

# Prompts for the greedy samples: one code, one prose (the corpus is both).
SAMPLE_PROMPTS = ("def read_config(path):\n    ", "The default value of")


def _batches(blocks: torch.Tensor, batch_size: int):
    if blocks.dim() != 2:
        raise ValueError(f"held-out blocks must be [n, T] token ids, got shape {tuple(blocks.shape)}")
    yield from blocks.split(batch_size)


def _routed(model) -> bool:
    return isinstance(model, MoRModel) and model.structure is not None


@torch.no_grad()
def _loss(model, blocks: torch.Tensor, batch_size: int, loops_for=None) -> float:
    """Mean next-token loss over ``blocks``; ``loops_for(ids) -> [B, T]`` forces the recursions."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for ids in _batches(blocks, batch_size):
        ids = ids.to(model.device)
        targets = next_token_targets(ids)
        if isinstance(model, MoRModel):
            logits = model(ids, loops=None if loops_for is None else loops_for(ids)).logits
        else:
            logits = model(ids)
        n = ids.shape[0] * (ids.shape[1] - 1)
        total, count = total + float(cross_entropy(logits, targets)) * n, count + n
    model.train(was_training)
    return total / count


def nats_per_token(model, blocks: torch.Tensor, *, causal: bool = False, batch_size: int = 8) -> float:
    """Held-out next-token loss in nats per token; ``causal``: MoR routed as decoding routes it."""
    if causal and _routed(model) and model.kind in ("expert", "token"):
        return _loss(model, blocks, batch_size, lambda ids: decode_routing(model, ids))
    return _loss(model, blocks, batch_size)


@torch.no_grad()
def greedy_sample(model, tokenizer, prompt: str, max_new_tokens: int = 48) -> str:
    """Greedy continuation of ``prompt``; MoR models route each step causally (decode-time routing), so
    this is what generation produces. Recomputes the prefix each step: fine for a short sample."""
    ids = torch.tensor([tokenizer(prompt, add_special_tokens=False)["input_ids"]], device=model.device)
    if ids.shape[1] == 0:
        raise ValueError("greedy_sample needs a non-empty prompt")
    eos = set(model.config.eos_token_ids)
    new = []
    for _ in range(max_new_tokens):
        window = ids[:, -model.config.max_position_embeddings:]
        if isinstance(model, MoRModel):
            loops = decode_routing(model, window) if _routed(model) and model.kind in ("expert", "token") else None
            logits = model(window, loops=loops).logits
        else:
            logits = model(window)
        token = int(logits[0, -1].argmax())
        if token in eos:
            break
        new.append(token)
        ids = torch.cat([ids, torch.tensor([[token]], device=ids.device)], dim=1)
    return tokenizer.decode(new)


def heldout_report(model, tokenizer, blocks: torch.Tensor, prompts: list[str], max_new_tokens: int = 48) -> dict:
    """(a) for one model: held-out nats/token (training- and decode-time routing), uniform ``ln V`` for
    scale, and a greedy sample per prompt."""
    report = {"nats_per_token": nats_per_token(model, blocks), "uniform": math.log(model.config.vocab_size),
              "tokens": int(blocks.shape[0] * (blocks.shape[1] - 1))}
    if _routed(model) and model.kind in ("expert", "token"):
        report["nats_per_token_causal"] = nats_per_token(model, blocks, causal=True)
    report["samples"] = {p: greedy_sample(model, tokenizer, p, max_new_tokens) for p in prompts}
    return report


# ---------------------------------------------------------------------------------------------------
# (b) equal FLOPs, seeds

def family_logs(root: str | Path | None = None, members=None) -> dict[str, list[dict]]:
    """``train.json`` of every seed of every member under ``root`` (default: the committed models)."""
    from ..checkpoints import FAMILY, checkpoints_root
    root = Path(root) if root is not None else checkpoints_root()
    out = {}
    for member in members or FAMILY:
        logs = [json.loads(p.read_text()) for p in sorted((root / member).glob("seed*/train.json"))]
        if logs:
            out[member] = logs
    return out


def _spread(values: list[float]) -> dict:
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "min": min(values), "max": max(values), "n": len(values)}


def equal_flops_table(logs: dict[str, list[dict]]) -> list[dict]:
    """(b) one row per member: held-out nats/token over seeds (mean, std, min, max), training FLOPs,
    steps, tokens, minutes. ``logs``: member -> the ``train.json`` of each seed (:func:`family_logs`)."""
    rows = []
    for member, runs in logs.items():
        held = [r["result"]["heldout"]["nats_per_token"] for r in runs]
        row = {"model": member, "seeds": len(runs), "heldout": _spread(held),
               "train_flops": statistics.fmean(r["total_flops"] for r in runs),
               "steps": statistics.fmean(r["steps_done"] for r in runs),
               "tokens": statistics.fmean(r["total_tokens"] for r in runs),
               "minutes": statistics.fmean(r["total_seconds"] for r in runs) / 60,
               "params": runs[0]["result"].get("params")}
        causal = [r["result"]["heldout"].get("nats_per_token_causal") for r in runs]
        if all(c is not None for c in causal):
            row["heldout_causal"] = _spread(causal)
        rows.append(row)
    return rows


# ---------------------------------------------------------------------------------------------------
# (c) routed depth matters

def random_routing(loops: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """A random router with the same capacities: each row's recursions ``[B, T]`` moved to random tokens
    (a per-row permutation), so every recursion keeps its number of tokens and selections stay nested."""
    order = torch.rand(loops.shape, generator=generator).argsort(-1).to(loops.device)
    return loops.gather(1, order)


@torch.no_grad()
def depth_ablation(model: MoRModel, blocks: torch.Tensor, *, draws: int = 3, seed: int = 0,
                   batch_size: int = 8) -> dict:
    """(c) held-out loss with the learned routing (training-time; and decode-time), with every token
    forced to 1 and to N_r recursions, and (routed models) with a random router of the same capacities
    (``draws`` random permutations of each row's learned recursions: mean, std, every draw)."""
    if not _routed(model):
        raise ValueError("depth_ablation needs a recursive or MoR model (a vanilla model has no recursions)")
    n = model.num_recursions
    learned = lambda ids: model(ids).routing.loops  # noqa: E731
    out = {"num_recursions": n, "learned": _loss(model, blocks, batch_size, learned),
           "forced_1": _loss(model, blocks, batch_size, lambda ids: torch.ones_like(ids)),
           f"forced_{n}": _loss(model, blocks, batch_size, lambda ids: torch.full_like(ids, n)),
           "mean_loops_learned": float(torch.cat([learned(b.to(model.device)).float().flatten()
                                                  for b in _batches(blocks, batch_size)]).mean())}
    if model.kind in ("expert", "token"):
        out["learned_causal"] = nats_per_token(model, blocks, causal=True, batch_size=batch_size)
        generator = torch.Generator().manual_seed(seed)
        losses = [_loss(model, blocks, batch_size, lambda ids: random_routing(learned(ids), generator))
                  for _ in range(draws)]
        out["random"] = statistics.fmean(losses)
        out["random_std"] = statistics.stdev(losses) if len(losses) > 1 else 0.0
        out["random_draws"] = losses
    return out


# ---------------------------------------------------------------------------------------------------
# (d) recursions by token class

TOKEN_CLASSES = ("keyword", "builtin", "identifier", "number", "string", "comment", "operator", "bracket",
                 "punctuation", "indentation", "newline", "space", "other")
_LEXER = re.compile(r"""
   (?P<comment>\#[^\n]*)
 | (?P<string>[rRbBuUfF]{0,2}(?:\"\"\"[\s\S]*?(?:\"\"\"|\Z)|'''[\s\S]*?(?:'''|\Z)
                              |"(?:[^"\\\n]|\\.)*"|'(?:[^'\\\n]|\\.)*'))
 | (?P<number>\b(?:0[xXoObB][0-9a-fA-F_]+|\d[\d_]*\.?\d*(?:[eE][+-]?\d+)?[jJ]?)|\.\d+(?:[eE][+-]?\d+)?)
 | (?P<name>[^\W\d]\w*)
 | (?P<newline>\n)
 | (?P<space>[ \t\f\r\v]+)
 | (?P<bracket>[()\[\]{}])
 | (?P<operator>\*\*=?|//=?|->|:=|<<=?|>>=?|[-+*/%@&|^~<>!=]=?)
 | (?P<punctuation>[.,:;`$?\\])
 | (?P<other>.)
""", re.VERBOSE)
_BUILTINS = frozenset(dir(builtins))
_WHITESPACE = ("indentation", "newline", "space")


def char_classes(text: str) -> list[str]:
    """The lexical class of every character of ``text``, by a Python-like lexer. Prose is lexed the
    same way (its words count as identifiers); a block cut inside a string starts out of it."""
    classes = []
    line_start = True
    for match in _LEXER.finditer(text):
        kind, value = match.lastgroup, match.group()
        if kind == "name":
            kind = ("keyword" if keyword.iskeyword(value) or keyword.issoftkeyword(value) else
                    "builtin" if value in _BUILTINS else "identifier")
        elif kind == "space" and line_start:
            kind = "indentation"
        classes += [kind] * len(value)
        line_start = kind == "newline" or (line_start and kind == "indentation")
    return classes


def classify_pieces(pieces: list[str]) -> list[str]:
    """A class per token, from the decoded text of each token (``pieces``, concatenated in order): the
    class of its first non-blank character; a blank token is indentation (spaces at a line start, with
    or without the newline before them), a newline, or space."""
    classes = char_classes("".join(pieces))
    out, start = [], 0
    for piece in pieces:
        own = classes[start:start + len(piece)]
        start += len(piece)
        solid = [c for c in own if c not in _WHITESPACE]
        if solid:
            out.append(solid[0])
        elif "indentation" in own:
            out.append("indentation")
        elif "newline" in own:
            out.append("newline")
        else:
            out.append("space" if own else "other")
    return out


@torch.no_grad()
def recursions_by_class(model: MoRModel, tokenizer, blocks: torch.Tensor, *, causal: bool = False,
                        batch_size: int = 8, top: int = 12, min_count: int = 20) -> dict:
    """(d) mean recursions per token class (each token's own recursions: the depth spent on it), with
    its depth histogram; and the ``top`` token strings with the most and the fewest (``min_count``+
    occurrences). ``causal``: decode-time routing instead of the training-time decisions."""
    if not _routed(model):
        raise ValueError("recursions_by_class needs a recursive or MoR model")
    n = model.num_recursions
    per_class: dict[str, list[int]] = {}
    per_token: dict[str, list[int]] = {}
    for ids in _batches(blocks, batch_size):
        ids = ids.to(model.device)
        loops = decode_routing(model, ids) if causal else model(ids).routing.loops
        for row, row_loops in zip(ids.tolist(), loops.tolist()):
            pieces = [tokenizer.decode([i]) for i in row]
            for piece, cls, depth in zip(pieces, classify_pieces(pieces), row_loops):
                per_class.setdefault(cls, []).append(depth)
                per_token.setdefault(piece, []).append(depth)
    rows = []
    for cls in sorted(per_class, key=lambda c: -statistics.fmean(per_class[c])):
        depths = per_class[cls]
        rows.append({"class": cls, "tokens": len(depths), "mean_loops": statistics.fmean(depths),
                     "depth_share": [depths.count(d) / len(depths) for d in range(1, n + 1)]})
    frequent = {t: statistics.fmean(d) for t, d in per_token.items() if len(d) >= min_count}
    ranked = sorted(frequent, key=lambda t: -frequent[t])
    return {"classes": rows, "most": [(t, frequent[t], len(per_token[t])) for t in ranked[:top]],
            "fewest": [(t, frequent[t], len(per_token[t])) for t in ranked[::-1][:top]], "causal": causal}


# ---------------------------------------------------------------------------------------------------
# (e) decode-time vs training-time routing

@torch.no_grad()
def routing_agreement(model: MoRModel, blocks: torch.Tensor, *, batch_size: int = 8, target: float = 0.9) -> dict:
    """(e) the fraction of tokens whose decode-time decision to take recursion ``r`` (r = 2..N_r) equals
    the training-time top-k's, over ``blocks`` (:func:`mor_lab.mor.model.topk_agreement` per batch);
    whole-depth agreement; mean recursions both ways; whether every recursion reaches ``target``."""
    if not _routed(model) or model.kind not in ("expert", "token"):
        raise ValueError("routing_agreement needs a routed MoR model (kind 'expert' or 'token')")
    sums, tokens = None, 0
    for ids in _batches(blocks, batch_size):
        result = topk_agreement(model, ids.to(model.device))
        values = torch.tensor(result["per_loop"] + [result["depth"], result["train_mean_loops"],
                                                    result["decode_mean_loops"]], dtype=torch.float64)
        sums = values * ids.numel() if sums is None else sums + values * ids.numel()
        tokens += ids.numel()
    mean = (sums / tokens).tolist()
    per = {f"recursion {r + 2}": v for r, v in enumerate(mean[:-3])}
    return {"per_recursion": per, "depth": mean[-3], "train_mean_loops": mean[-2], "decode_mean_loops": mean[-1],
            "target": target, "meets_target": all(v >= target for v in per.values()), "tokens": tokens}


def family_report(root: str | Path | None = None, members=None, *, prompts=SAMPLE_PROMPTS, max_new_tokens: int = 48,
                  draws: int = 3) -> dict:
    """(a)-(e) for every seed of every member under ``root`` (default: the committed models), each on the
    held-out blocks its logged loss was measured on; plus (b), the equal-FLOPs table."""
    from ..checkpoints import FAMILY, checkpoints_root, heldout_blocks, load_dir
    from ..models.hf import load_tokenizer
    root = Path(root) if root is not None else checkpoints_root()
    members = list(members or FAMILY)
    out = {"equal_flops": equal_flops_table(family_logs(root, members)), "models": {}}
    for member in members:
        for directory in sorted((root / member).glob("seed*")):
            model, tokenizer, blocks = load_dir(directory), load_tokenizer(directory), heldout_blocks(directory)
            entry = {"heldout": heldout_report(model, tokenizer, blocks, list(prompts), max_new_tokens)}
            if _routed(model):
                entry["depth"] = depth_ablation(model, blocks, draws=draws)
                entry["by_class"] = recursions_by_class(model, tokenizer, blocks)
                if model.kind in ("expert", "token"):
                    entry["agreement"] = routing_agreement(model, blocks)
            out["models"][f"{member}@{directory.name}"] = entry
    return out


__all__ = ["SAMPLE_PROMPTS", "TOKEN_CLASSES", "char_classes", "classify_pieces", "depth_ablation", "equal_flops_table",
           "family_logs", "family_report", "greedy_sample", "heldout_report", "nats_per_token", "random_routing",
           "recursions_by_class", "routing_agreement"]
