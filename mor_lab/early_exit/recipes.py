"""Ready-made exit heads for a loaded model: trained once on the offline corpus, cached on disk.

Notebooks and benchmarks share this one recipe, so they measure the same heads. Training follows
``heads.train_exit_heads``: frozen backbone, hidden states cached once, adapters + meta classifiers
trained against the full model's own predictions (FREE's objective for one exit, CALM's for several).
"""
from __future__ import annotations

import hashlib
import json

import torch

from ..models.hf import cache_root
from ..runtime import pick
from ..train.data import load_corpus, tokenize
from .heads import ExitConfig, ExitHeads, train_exit_heads


def model_fingerprint(model) -> str:
    """A short id of a model's config and weights, to key cached artifacts."""
    digest = hashlib.sha256(json.dumps(model.config.to_dict(), sort_keys=True).encode())
    for p in (model.embed_tokens.weight, model.layers[0].mlp.down_proj.weight, model.norm.weight):
        digest.update(p.detach().float().flatten()[:4096].cpu().numpy().tobytes())
    return digest.hexdigest()[:12]


def training_blocks(tokenizer, num_tokens: int, block: int = 128, corpus: str = "pydoc") -> torch.Tensor:
    """``[n, block]`` token blocks from the corpus's training split."""
    ids = tokenize(tokenizer, load_corpus(corpus).train)[: num_tokens]
    n = len(ids) // block
    if n == 0:
        raise ValueError(f"need at least {block} training tokens, the corpus gave {len(ids)}")
    return ids[: n * block].view(n, block)


def pretrained_exit_heads(model, tokenizer, exit_layers: list[int], *, measure: str = "margin",
                          tokens: int | None = None, steps: int | None = None, lr: float = 1e-3,
                          seed: int = 0, progress: bool = True, use_cache: bool = True) -> ExitHeads:
    """Exit heads after ``exit_layers`` (numbers of depth steps), trained or loaded from the cache.

    Sizes follow the quick switch: ``MOR_LAB_QUICK=1`` trains on 2k tokens for 40 steps (about a
    minute on a laptop CPU); the full setting on 32k tokens for 400 steps.
    """
    tokens = tokens or pick(quick=2048, full=32768)
    steps = steps or pick(quick=40, full=400)
    config = ExitConfig(exit_layers=sorted(exit_layers), adapter="linear", measure=measure)
    key = f"{model_fingerprint(model)}-L{'_'.join(map(str, config.exit_layers))}-{tokens}t-{steps}s-{lr}-{seed}"
    directory = cache_root() / "exit_heads" / key
    if use_cache and (directory / "exit_heads.json").exists():
        heads = ExitHeads.load(directory, device=model.device)
        heads.config.measure = measure
        return heads.eval()
    heads = ExitHeads.for_model(model, config, seed=seed)
    blocks = training_blocks(tokenizer, tokens).to(model.device)
    train_exit_heads(model, heads, blocks.split(8), steps=steps, lr=lr, seed=seed, progress=progress,
                     checkpoint=directory if use_cache else None)
    return heads.eval()
