"""Turn a pretrained (vanilla) Decoder into a recursive one: shared layers looped by a depth plan.

The recursive model is an ordinary :class:`~mor_lab.models.decoder.Decoder` whose ``config.num_layers``
is the number of physical (shared, plus prelude/coda) layers and whose ``plan`` loops them, so the
engine, the KV cache and checkpoints work unchanged. Any Llama-family model works: they all load as
the same Decoder.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from ..models.decoder import Decoder, DecoderLayer, StepDelta
from .sharing import RecursiveConfig, SharingPlan, init_sources

NORMS = ("input_layernorm", "post_attention_layernorm")


@dataclass
class Conversion:
    """A converted model and how it was made."""
    model: Decoder  # the recursive decoder
    sharing: SharingPlan
    config: RecursiveConfig
    sources: tuple[tuple[int, ...], ...]  # per physical layer: the original layers whose mean it started from
    params_before: int
    params_after: int

    def __str__(self) -> str:
        sources = ", ".join(f"{j}<-{list(s) if len(s) > 1 else s[0]}" for j, s in enumerate(self.sources))
        return (f"{self.sharing}\ninit {self.config.init} (physical <- original): {sources}\n"
                f"norms {'tied' if self.config.tie_norms else 'per position'}; parameters "
                f"{self.params_before:,} -> {self.params_after:,} ({self.params_after / self.params_before:.1%})")


def count_parameters(model: torch.nn.Module, include_embeddings: bool = True) -> int:
    """Distinct parameters (tied embeddings count once); without embeddings: no token embedding or LM head."""
    params = {id(p): p for p in model.parameters()}
    if not include_embeddings and isinstance(model, Decoder):
        for p in (model.embed_tokens.weight, model.lm_head.weight):
            params.pop(id(p), None)
    return sum(p.numel() for p in params.values())


def parameter_counts(model: Decoder) -> dict[str, int]:
    """Where the parameters are: embeddings (+ head, final norm), physical layers, LoRA, per-step norms."""
    lora = sum(p.numel() for d in model.step_deltas.values() for p in d.lora.parameters())
    step_norms = sum(p.numel() for d in model.step_deltas.values() for p in d.norms.parameters())
    layers = sum(p.numel() for p in model.layers.parameters())
    total = count_parameters(model)
    return {"embeddings": total - layers - lora - step_norms, "layers": layers, "lora": lora,
            "step_norms": step_norms, "total": total}


def empty_like(model: Decoder, num_layers: int, plan: list[int] | None = None) -> Decoder:
    """A Decoder like ``model`` (config, device, dtype, rope) with ``num_layers`` physical layers and
    uninitialised weights, for callers that overwrite them all: a random init costs seconds on a CPU."""
    config = dataclasses.replace(model.config, num_layers=num_layers)
    with torch.device("meta"):
        new = Decoder(config, plan)
    new = new.to_empty(device=model.device).to(model.dtype)
    if config.tie_word_embeddings:  # moving off the meta device unties them
        new.lm_head.weight = new.embed_tokens.weight
    with torch.no_grad():
        new.rotary.inv_freq.copy_(model.rotary.inv_freq)
    return new


def check_vanilla(model: Decoder) -> None:
    if model.plan != list(range(model.config.num_layers)) or len(model.step_deltas):
        raise ValueError("convert needs a vanilla Decoder (plan = every layer once, no step deltas); "
                         "got a plan or step deltas already")


@torch.no_grad()
def mean_layer(layers: list[DecoderLayer]) -> dict[str, torch.Tensor]:
    """The state dict of the element-wise mean of ``layers`` (a plain copy for one layer)."""
    states = [layer.state_dict() for layer in layers]
    if len(states) == 1:
        return {k: v.clone() for k, v in states[0].items()}
    return {k: torch.stack([s[k].float() for s in states]).mean(0).to(v.dtype) for k, v in states[0].items()}


@torch.no_grad()
def convert(model: Decoder, config: RecursiveConfig | None = None, **overrides) -> Conversion:
    """A recursive copy of the vanilla ``model`` (which is left unchanged); see :mod:`mor_lab.recursive.sharing`.

    Each physical layer starts from the mean of its ``init_sources`` (one layer, or the tied group
    for ``init="average"``). Norm weights: ``tie_norms=True`` shares them like everything else (from
    the same source); ``False`` gives every looped step its original layer's own norm weights
    (``StepDelta.norms``), which is what lets a full-rank relaxation reproduce the original exactly.
    Embeddings, final norm and LM head are copied.
    """
    config = dataclasses.replace(config, **overrides) if config else RecursiveConfig(**overrides)
    check_vanilla(model)
    sharing = SharingPlan.build(model.config.num_layers, config.num_recursions, config.strategy)
    sources = init_sources(sharing, config.init, config.seed)
    recursive = empty_like(model, sharing.num_physical_layers, sharing.plan)
    recursive.embed_tokens.load_state_dict(model.embed_tokens.state_dict())
    recursive.norm.load_state_dict(model.norm.state_dict())
    if not model.config.tie_word_embeddings:
        recursive.lm_head.load_state_dict(model.lm_head.state_dict())
    for j, source in enumerate(sources):
        recursive.layers[j].load_state_dict(mean_layer([model.layers[i] for i in source]))
    if not config.tie_norms:
        for s in sharing.steps:
            if s.loop is not None:
                original = model.layers[s.original]
                recursive.step_deltas[str(s.step)] = StepDelta(
                    norms={name: getattr(original, name).weight for name in NORMS})
    recursive.train(model.training)
    return Conversion(recursive, sharing, config, sources, count_parameters(model), count_parameters(recursive))


@torch.no_grad()
def select_layers(model: Decoder, layers: list[int]) -> Decoder:
    """A vanilla copy of ``model`` that runs only ``layers``, in that order (e.g. ``sharing.kept_layers``:
    the subsampled model a recursive one approximates when L does not divide)."""
    check_vanilla(model)
    copy = empty_like(model, len(layers))
    state = {k: v for k, v in model.state_dict().items() if not k.startswith("layers.")}
    for j, i in enumerate(layers):
        state.update({f"layers.{j}.{k}": v for k, v in model.layers[i].state_dict().items()})
    copy.load_state_dict(state)
    return copy.train(model.training)
