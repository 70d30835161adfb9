"""Early exit: confidence measures, exit heads, and batched decoding policies (static, CALM, FREE).

Also the logit-lens analysis (``lens``): when could a token stop going deeper, and what would it save.
"""
from .confidence import CANONICAL_MEASURES, MEASURE_ALIASES, MetaClassifier, calm_threshold, confidence
from .heads import (ExitConfig, ExitHeads, cache_exit_states, evaluate_exit_heads, free_layer_map,
                    free_shallow_layers, train_exit_heads)
from .threshold import AdaptiveThreshold, ThresholdConfig

__all__ = ["CANONICAL_MEASURES", "MEASURE_ALIASES", "AdaptiveThreshold", "CalmExit", "ExitConfig", "ExitHeads", "FreeDecoding", "MetaClassifier",
           "StaticExit", "ThresholdConfig", "cache_exit_states", "calm_threshold", "confidence",
           "evaluate_exit_heads", "free_layer_map", "free_shallow_layers", "train_exit_heads"]


def __getattr__(name):
    """The decoding policies live in the engine (``mor_lab.engine.policies``); imported lazily here, since
    the engine's policies import this package's confidence measures."""
    if name in ("CalmExit", "FreeDecoding", "StaticExit", "early_exit_policy"):
        from ..engine import policies
        return getattr(policies, name)
    raise AttributeError(f"module 'mor_lab.early_exit' has no attribute {name!r}")
