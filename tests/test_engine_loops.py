"""Recursive loops with exits on the one engine: continuous depth-wise batching (CDB) is exact against
static batching and against each sequence alone, keeps its slots full, and loses no request."""
import pytest

import mor_lab
from mor_lab.engine.plan import LoopStructure
from mor_lab.engine.policies import FixedLoops, LoopExit

STRUCTURE = LoopStructure(prelude=1, block=2, loops=3, coda=1)  # MIDDLE_CYCLE-like: 1 + 3 x 2 + 1 steps
PROMPTS = [[1, 2, 3], [4, 5, 6, 7, 8, 9], [10], [11, 12, 13, 14], [15, 16], [17, 18, 19, 20, 21], [22, 23, 24]]


@pytest.fixture(scope="module")
def model():
    m = mor_lab.random_decoder(num_layers=4, vocab_size=64, hidden_size=32, num_heads=4, num_kv_heads=2, seed=11,
                               std=0.3)
    m.plan = STRUCTURE.plan()
    return m


def cdb(model, prompts, n, slots, rule, **kw):
    return mor_lab.generate_ids(model, prompts, n, eos_token_ids=kw.pop("eos", []), policy=LoopExit(rule),
                                slots=slots, mode="continuous", **kw)


def test_structure_is_read_off_the_plan(model):
    assert STRUCTURE.plan() == [0, 1, 2, 1, 2, 1, 2, 3]
    assert LoopStructure.of(model) == STRUCTURE
    assert STRUCTURE.steps_for(1) == [0, 1, 2, 7] and STRUCTURE.steps_for(3) == list(range(8))
    assert LoopStructure.middle_cycle(30, 4) == LoopStructure(1, 7, 4, 1)
    assert LoopStructure.of(mor_lab.random_decoder(num_layers=3)) is None  # vanilla: no shared block
    sequence = mor_lab.random_decoder(num_layers=3)
    sequence.plan = [0, 0, 1, 1, 2, 2]  # SEQUENCE repeats layers in place: nothing to batch across loops
    assert LoopStructure.of(sequence) is None
    with pytest.raises(ValueError, match="recursive model"):
        mor_lab.generate_ids(sequence, [[1, 2]], 2, policy=LoopExit(FixedLoops([1.0])))
    with pytest.raises(TypeError, match=r"wrap it: policy=LoopExit\(FixedLoops"):  # a rule is not a policy
        mor_lab.generate_ids(sequence, [[1, 2]], 2, policy=FixedLoops([1.0]))


@pytest.mark.parametrize("slots", [1, 3, 8])
def test_cdb_equals_static_batching_and_each_sequence_alone(model, slots):
    rule = FixedLoops([0.4, 0.3, 0.3], seed=2)
    continuous, trace = cdb(model, PROMPTS, 6, slots, rule)
    static, _ = mor_lab.generate_ids(model, PROMPTS, 6, eos_token_ids=[], policy=LoopExit(rule), slots=slots)
    assert continuous == static
    for i, prompt in enumerate(PROMPTS):
        alone, _ = cdb(model, [prompt], 6, 1, rule, request_ids=[i])
        assert alone[0] == continuous[i]
    assert all(len(o) == 6 for o in continuous)  # every request served once, completely
    depths = [len(t.steps) for seq in trace.tokens for t in seq[1:]]
    assert set(depths) == {4, 6, 8}  # tokens really left after 1, 2 and 3 loops


def test_cost_head_rule_and_more_sequences_in_flight_change_nothing_but_the_schedule(model):
    rule = FixedLoops([0.4, 0.3, 0.3], seed=2)
    every, every_trace = cdb(model, PROMPTS * 2, 6, 3, rule)
    waiting, trace = cdb(model, PROMPTS * 2, 6, 3, rule, head_rule="cost", in_flight=6)
    assert waiting == every
    heads = lambda t: sum(p.kind == "head" for p in t.passes)  # noqa: E731
    assert heads(trace) < heads(every_trace)  # fewer, fuller head calls
    busy = [sum(a.startswith("loop") for a in s.activity) for s in trace.engine_steps if s.kind == "loop"]
    assert max(busy) == 3  # the shared block never runs more than B = 3 rows ...
    assert max(p.rows for p in trace.passes if p.kind == "head") > 3  # ... the head calls do: up to in_flight


def test_full_depth_rule_equals_the_plain_engine(model):
    full, _ = mor_lab.generate_ids(model, PROMPTS, 5, eos_token_ids=[])
    loops, _ = cdb(model, PROMPTS, 5, 4, FixedLoops([0, 0, 1]))
    assert loops == full


def test_slots_stay_full_while_requests_wait(model):
    rule = FixedLoops([0.4, 0.3, 0.3], seed=0)
    prompts = PROMPTS * 3
    ids, trace = cdb(model, prompts, 8, 4, rule)
    assert [len(i) for i in ids] == [8] * len(prompts)  # every request served, none lost or duplicated
    assert sum(len(t) for t in trace.tokens) == 8 * len(prompts)
    # Until the queue drains (the last request is admitted), every pass of the shared block has all 4 slots busy.
    last_admission = min(i for i, s in enumerate(trace.engine_steps) if len(prompts) - 1 in s.sequences)
    before = [s for s in trace.engine_steps[:last_admission] if s.kind == "loop"]
    assert len(before) > 5 and all(sum(a.startswith("loop") or a == "prefill" for a in s.activity) == 4
                                   for s in before)
    assert trace.utilization(("loop",)) > 0.8


def test_eos_frees_the_slot_and_nothing_is_lost(model):
    rule = FixedLoops([0.5, 0.5, 0.0], seed=1)
    free_run, _ = cdb(model, PROMPTS, 8, 3, rule)
    eos = free_run[0][1]
    with_eos, _ = cdb(model, PROMPTS, 8, 3, rule, eos=[eos])
    for got, ref in zip(with_eos, free_run):
        cut = ref.index(eos) + 1 if eos in ref else len(ref)
        assert got == ref[:cut]


def test_bad_engine_arguments_name_the_fix(model):
    with pytest.raises(ValueError, match="slots must be a positive integer"):
        cdb(model, PROMPTS, 2, 0, FixedLoops([1.0, 0, 0]))
    with pytest.raises(ValueError, match="head_rule must be one of"):
        cdb(model, PROMPTS, 2, 2, FixedLoops([1.0, 0, 0]), head_rule="sometimes")
    with pytest.raises(ValueError, match="mode must be one of"):
        mor_lab.generate_ids(model, PROMPTS, 2, mode="dynamic")
    with pytest.raises(ValueError, match="needs mode='continuous'"):
        mor_lab.generate_ids(model, PROMPTS, 2, head_rule="cost")
    with pytest.raises(ValueError, match="in_flight"):
        cdb(model, PROMPTS, 2, 4, FixedLoops([1.0, 0, 0]), in_flight=2)


def test_skipped_loops_get_the_kv_of_the_exited_state(model):
    """State propagation into the loops a token skipped: one projection per shared layer, written to each
    skipped step of that layer (the loops of a tied block compute identical K/V)."""
    import torch

    from mor_lab.engine.scheduler import Scheduler
    engine = Scheduler(model, LoopExit(FixedLoops([1.0, 0.0, 0.0])), eos_token_ids=[])
    prompt = [1, 2, 3, 4]
    ids, trace = engine.run([prompt], 2)  # token 0 from the prefill; token 0 fed back exits after loop 1
    assert trace.tokens[0][1].steps == STRUCTURE.steps_for(1)
    with torch.no_grad():
        _, hidden = model(torch.tensor([prompt + ids[0][:1]]), return_hidden=True)
        h = hidden[STRUCTURE.prelude + STRUCTURE.block][0, len(prompt):]  # its state after loop 1
        rope = model.rope(torch.tensor([len(prompt)]))
        for step in STRUCTURE.skipped_steps(1):
            layer = model.layers[model.plan[step]]
            k, v = layer.self_attn.project_kv(layer.input_layernorm(h), rope)
            page = engine.cache.pages(step)
            assert torch.allclose(engine.cache.k[page][0, :, len(prompt)], k[0], atol=1e-5), step
            assert torch.allclose(engine.cache.v[page][0, :, len(prompt)], v[0], atol=1e-5), step
