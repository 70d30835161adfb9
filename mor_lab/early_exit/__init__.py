"""Early exit: confidence measures, exit heads, and batched decoding policies (static, CALM, FREE).

Also the logit-lens analysis (``lens``): when could a token stop going deeper, and what would it save.
"""
from .confidence import MEASURES, MetaClassifier, calm_threshold, confidence
from .decoding import CalmExit, StaticExit
from .free import FreeDecoding
from .heads import (ExitConfig, ExitHeads, cache_exit_states, evaluate_exit_heads, free_layer_map,
                    free_shallow_layers, train_exit_heads)
from .threshold import AdaptiveThreshold, ThresholdConfig

__all__ = ["MEASURES", "AdaptiveThreshold", "CalmExit", "ExitConfig", "ExitHeads", "FreeDecoding", "MetaClassifier",
           "StaticExit", "ThresholdConfig", "cache_exit_states", "calm_threshold", "confidence",
           "evaluate_exit_heads", "free_layer_map", "free_shallow_layers", "train_exit_heads"]
