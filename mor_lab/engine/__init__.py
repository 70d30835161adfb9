"""The one engine (``scheduler``), its depth policies (``policies``), the cost model (``cost``), sampling, trace."""
from .generate import GenerationOutput, encode_prompts, generate, generate_ids
from .plan import LoopStructure
from .scheduler import Scheduler

__all__ = ["GenerationOutput", "LoopStructure", "Scheduler", "encode_prompts", "generate", "generate_ids"]
