"""Mixture-of-Recursions: routers, the model family, training at equal FLOPs; routed decoding is the engine's
``RoutedDepth`` policy (re-exported here)."""
from .model import (KINDS, KV_SCHEMES, MoRConfig, MoRModel, MoROutput, Routing, calibrate_thresholds, decode_routing,
                    topk_agreement)
from .routers import (ExpertChoiceRouter, RouterConfig, TokenChoiceRouter, capacity_schedule, default_capacity,
                      hierarchical_topk, topk_count)

__all__ = ["KINDS", "KV_SCHEMES", "ExpertChoiceRouter", "MoRConfig", "MoRModel", "MoROutput", "RoutedDepth",
           "RouterConfig", "Routing", "TokenChoiceRouter", "calibrate_thresholds", "capacity_schedule",
           "decode_routing", "default_capacity", "hierarchical_topk", "topk_agreement", "topk_count"]


def __getattr__(name):
    if name == "RoutedDepth":  # lazily: the engine's policies import this package's routers
        from ..engine.policies import RoutedDepth
        return RoutedDepth
    raise AttributeError(f"module 'mor_lab.mor' has no attribute {name!r}")
