"""The relaxation (per-position SVD LoRA) against the public reference code.

raymin0223/mixture_of_recursions (commit 82c97f2): ``model/relaxation/lora/config.py`` (get_lora_config:
alpha_pattern, target_modules), ``model/relaxation/lora/svd_init.py`` (svd_init_lora_weights),
``conf/pretrain/example.yaml`` (target_modules [q_proj, v_proj]), and PEFT's LoRA forward that it runs
(``result = base(x) + lora_B(lora_A(dropout(x))) * scaling``, ``scaling = lora_alpha / r``).
"""
import copy

import pytest
import torch

import mor_lab
from mor_lab.recursive import PROJECTIONS, RelaxConfig, convert, relax
from mor_lab.recursive.relax import linear


def tiny(num_layers=6, seed=0):
    config = mor_lab.ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=num_layers,
                                 num_heads=4, num_kv_heads=2, max_position_embeddings=64)
    return mor_lab.random_decoder(config, seed=seed, std=0.1)


def reference_lora_projection(x, W_shared, residual, r, alpha_pattern):
    """svd_init.py: u, s, v = svd(R); lora_A = v[:r], lora_B = u[:, :r] diag(s[:r]).
    config.py: alpha = r * alpha_pattern, so PEFT's scaling = alpha / r = alpha_pattern."""
    u, s, v = torch.linalg.svd(residual.double(), full_matrices=False)
    lora_A, lora_B = v[:r, :], u[:, :r] @ torch.diag(s[:r])
    scaling = (r * alpha_pattern) / r
    return x @ W_shared.T + (x @ lora_A.T) @ lora_B.T * scaling


@pytest.mark.parametrize("scale", [1.0, 2.0])
def test_lora_scale_is_pefts_alpha_over_rank(scale):
    model = tiny()
    conversion = convert(model, strategy="cycle", num_recursions=2, init="average")
    relaxed = relax(conversion.model, model, conversion.sharing, attn_rank=3, mlp_rank=3, lora_scale=scale)
    x = torch.randn(7, 32, dtype=torch.float64)
    for s in conversion.sharing.steps:
        delta = relaxed.delta(s.step)
        for name in ("q_proj", "down_proj"):
            shared = linear(relaxed.layers[s.layer], name).weight.double()
            residual = linear(model.layers[s.original], name).weight.double() - shared
            xin = x if name == "q_proj" else torch.randn(7, 48, dtype=torch.float64)
            ours = xin @ shared.T + copy.deepcopy(delta.lora[name]).double()(xin)
            torch.testing.assert_close(ours, reference_lora_projection(xin, shared, residual, 3, scale),
                                       rtol=1e-5, atol=1e-5)  # the LoRA is stored in float32


def test_reference_scale_two_overshoots_at_full_rank():
    """With alpha = 2 r the SVD-initialised LoRA adds the residual twice: only scale 1 is exact."""
    model = tiny()
    conversion = convert(model, strategy="cycle", num_recursions=2, init="average")
    ids = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        exact = relax(conversion.model, model, conversion.sharing, attn_rank=None, mlp_rank=None)(ids)
        torch.testing.assert_close(exact, model(ids), rtol=0, atol=1e-5)
        doubled = relax(conversion.model, model, conversion.sharing, attn_rank=None, mlp_rank=None, lora_scale=2.0)
        assert (doubled(ids) - model(ids)).abs().max() > 1e-2
    assert RelaxConfig().lora_scale == 1.0


def test_lora_targets_list():
    model = tiny()
    conversion = convert(model, strategy="middle_cycle", num_recursions=2, init="average")
    # example.yaml: target_modules ['q_proj', 'v_proj']; config.py skips modules whose names are not listed
    relax(conversion.model, model, conversion.sharing, attn_rank=4, mlp_rank=4, targets=["q_proj", "v_proj"])
    for s in conversion.sharing.steps:
        if s.loop is not None:
            assert sorted(conversion.model.delta(s.step).lora) == ["q_proj", "v_proj"]
    relax(conversion.model, model, conversion.sharing, attn_rank=4, mlp_rank=4)
    for s in conversion.sharing.steps:
        if s.loop is not None:  # mor_lab's default: every projection (the paper's "each weight matrix")
            assert sorted(conversion.model.delta(s.step).lora) == sorted(PROJECTIONS)
    assert RelaxConfig().targets == PROJECTIONS
    with pytest.raises(ValueError, match="RelaxConfig.targets"):
        RelaxConfig(targets=("q_proj", "qkv"))
    with pytest.raises(ValueError, match="RelaxConfig.lora_scale"):
        RelaxConfig(lora_scale=0)
    assert RelaxConfig.from_dict(RelaxConfig(targets=["v_proj"]).to_dict()).targets == ("v_proj",)
