"""Mixture-of-Recursions: routers, the model family, routed decoding, training at equal FLOPs."""
from .model import (KINDS, KV_SCHEMES, MoRConfig, MoRModel, MoROutput, RoutedDepth, RoutedExit, Routing,
                    calibrate_thresholds, decode_routing, topk_agreement)
from .routers import (ExpertChoiceRouter, RouterConfig, TokenChoiceRouter, capacity_schedule, default_capacity,
                      hierarchical_topk, topk_count)

__all__ = ["KINDS", "KV_SCHEMES", "ExpertChoiceRouter", "MoRConfig", "MoRModel", "MoROutput", "RoutedDepth",
           "RoutedExit", "RouterConfig", "Routing", "TokenChoiceRouter", "calibrate_thresholds", "capacity_schedule",
           "decode_routing", "default_capacity", "hierarchical_topk", "topk_agreement", "topk_count"]
