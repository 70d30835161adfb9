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


# ---------------------------------------------------------------------------------------------------
# Committed heads: trained by ``mor-lab train exit-heads-smollm2 --size full`` on SmolLM2's own greedy
# continuations of chat prompts (the distribution decoding sees), shipped with the package.

COMMITTED_ADAPTERS = ("linear", "block")


def committed_heads_dir(adapter: str):
    """Where the committed heads of one adapter type live (``mor_lab/checkpoints/exit-heads-smollm2/``)."""
    from ..checkpoints import checkpoints_root
    if adapter not in COMMITTED_ADAPTERS:
        raise ValueError(f"no committed exit heads of type {adapter!r}; types: {', '.join(COMMITTED_ADAPTERS)}")
    return checkpoints_root() / "exit-heads-smollm2" / adapter


def commit_exit_heads(run_dir, model, exit_layers: list[int] | None = None, dtype=torch.float16):
    """Copy the heads a training run left in ``run_dir`` into the package: only ``exit_layers`` (default
    all), stored in ``dtype``, with its training log and the backbone's fingerprint (checked on load)."""
    import shutil
    from pathlib import Path
    run_dir = Path(run_dir)
    heads = ExitHeads.load(run_dir)
    layers = sorted(exit_layers or heads.exit_layers)
    kept = ExitHeads(ExitConfig(exit_layers=layers, adapter=heads.config.adapter,
                                adapter_rank=heads.config.adapter_rank, measure=heads.config.measure),
                     heads.hidden_size, model_config=heads.model_config)
    keep = {str(layer) for layer in layers}  # state-dict keys are "adapters.<layer>...", "meta.<layer>..."
    kept.load_state_dict({k: v for k, v in heads.state_dict().items() if k.split(".")[1] in keep})
    dest = committed_heads_dir(heads.config.adapter)
    kept.to(dtype).save(dest)
    shutil.copy(run_dir / "train.json", dest / "train.json")
    (dest / "backbone.json").write_text(json.dumps({"model_fingerprint": model_fingerprint(model)}) + "\n")
    return dest


def committed_exit_heads(model, adapter: str = "linear", measure: str = "margin") -> ExitHeads:
    """The committed ``adapter`` heads for ``model`` (SmolLM2-135M-Instruct, offline).
    Another backbone is a clear error: its hidden states are not the ones these heads read."""
    directory = committed_heads_dir(adapter)
    if not (directory / "exit_heads.json").exists():
        raise ValueError(f"no committed {adapter} exit heads in {directory}: train them with `python -m mor_lab.cli "
                         f"train exit-heads-smollm2 --size full --set adapter={adapter} --out runs/exit-{adapter}`, "
                         "then mor_lab.early_exit.recipes.commit_exit_heads")
    expected = json.loads((directory / "backbone.json").read_text())["model_fingerprint"]
    if model_fingerprint(model) != expected:
        raise ValueError(f"the committed {adapter} exit heads were trained on SmolLM2-135M-Instruct (fingerprint "
                         f"{expected}), not on this model ({model_fingerprint(model)}); train heads for it with "
                         "pretrained_exit_heads(model, tokenizer, layers)")
    heads = ExitHeads.load(directory).placed_for(model)  # 16-bit on disk, float32 once loaded
    heads.config.measure = measure
    heads.check(model)
    return heads.eval()
