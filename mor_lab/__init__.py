"""mor_lab: adaptive computation for LLMs (early exit, FREE, recursive transformers, MoR), taught and measured."""
from .engine.generate import GenerationOutput, generate, generate_ids
from .engine.sampling import Sampler
from .engine.trace import Trace
from .models.cache import Chunk, KVCache
from .models.config import ModelConfig
from .models.decoder import Decoder, random_decoder
from .models.hf import DEFAULT_MODEL, ModelLoadError, load_pretrained
from .runtime import default_device, is_quick, pick

__version__ = "0.1.0"
__all__ = ["Chunk", "DEFAULT_MODEL", "Decoder", "GenerationOutput", "KVCache", "ModelConfig", "ModelLoadError",
           "Sampler", "Trace", "default_device", "generate", "generate_ids", "is_quick", "load_pretrained", "pick",
           "random_decoder"]
