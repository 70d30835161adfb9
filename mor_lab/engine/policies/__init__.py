"""Depth policies: one small file each, each owning its per-row state; the scheduler serves them all."""
from .base import Context, DepthPolicy, Exit, FullDepth
from .exits import EARLY_EXIT_METHODS, CalmExit, StaticExit, early_exit_policy, exit_confidence, exit_logits
from .free import FreeDecoding
from .loops import ConfidenceLoops, FixedLoops, LoopExit, NeverExit
from .routed import RoutedDepth

__all__ = ["EARLY_EXIT_METHODS", "CalmExit", "ConfidenceLoops", "Context", "DepthPolicy", "Exit", "FixedLoops", "FreeDecoding", "FullDepth",
           "LoopExit", "NeverExit", "RoutedDepth", "StaticExit", "early_exit_policy", "exit_confidence", "exit_logits"]
