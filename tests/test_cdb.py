"""Continuous depth-wise batching: exact against static batching and against each sequence alone."""
import pytest

import mor_lab
from mor_lab.engine.cdb import cdb_generate
from mor_lab.engine.loops import FixedLoops, LoopedExit, LoopStructure

STRUCTURE = LoopStructure(prelude=1, block=2, loops=3, coda=1)  # MIDDLE_CYCLE-like: 1 + 3 x 2 + 1 steps
PROMPTS = [[1, 2, 3], [4, 5, 6, 7, 8, 9], [10], [11, 12, 13, 14], [15, 16], [17, 18, 19, 20, 21], [22, 23, 24]]


@pytest.fixture(scope="module")
def model():
    m = mor_lab.random_decoder(num_layers=4, vocab_size=64, hidden_size=32, num_heads=4, num_kv_heads=2, seed=11,
                               std=0.3)
    m.plan = STRUCTURE.plan()
    return m


def test_structure_plan_and_validation(model):
    assert STRUCTURE.plan() == [0, 1, 2, 1, 2, 1, 2, 3]
    assert STRUCTURE.steps_for(1) == [0, 1, 2, 7] and STRUCTURE.steps_for(3) == list(range(8))
    assert LoopStructure.middle_cycle(30, 4) == LoopStructure(1, 7, 4, 1)
    with pytest.raises(ValueError, match="steps"):
        LoopStructure(1, 2, 2, 1).check(model)


@pytest.mark.parametrize("slots", [1, 3, 8])
def test_cdb_equals_static_batching_and_each_sequence_alone(model, slots):
    rule = FixedLoops([0.4, 0.3, 0.3], seed=2)
    cdb, trace = cdb_generate(model, STRUCTURE, PROMPTS, 6, slots, rule)
    static, _ = mor_lab.generate_ids(model, PROMPTS, 6, eos_token_ids=[], policy=LoopedExit(STRUCTURE, rule))
    assert cdb == static
    for i, prompt in enumerate(PROMPTS):
        alone, _ = cdb_generate(model, STRUCTURE, [prompt], 6, 1, rule, request_ids=[i])
        assert alone[0] == cdb[i]
    assert all(len(o) == 6 for o in cdb)  # every request served once, completely
    depths = [len(t.steps) for seq in trace.tokens for t in seq[1:]]
    assert set(depths) == {4, 6, 8}  # tokens really left after 1, 2 and 3 loops


def test_full_depth_rule_equals_the_plain_engine(model):
    full, _ = mor_lab.generate_ids(model, PROMPTS, 5, eos_token_ids=[])
    cdb, _ = cdb_generate(model, STRUCTURE, PROMPTS, 5, 4, FixedLoops([0, 0, 1]))
    assert cdb == full


def test_slots_stay_full_while_requests_wait(model):
    rule = FixedLoops([0.4, 0.3, 0.3], seed=0)
    prompts = PROMPTS * 3
    _, trace = cdb_generate(model, STRUCTURE, prompts, 8, 4, rule)
    loop_steps = [s for s in trace.engine_steps if s.kind == "loop"]
    served = sum(len(p) for p in prompts)
    assert served
    # Until the queue drains (the last admission), every loop step has all 4 slots busy.
    last_prefill = max(i for i, s in enumerate(trace.engine_steps) if s.kind == "prefill")
    before = [s for s in trace.engine_steps[:last_prefill] if s.kind == "loop"]
    assert before and all("idle" not in s.activity for s in before)
    assert trace.utilization(("loop",)) > 0.8 and len(loop_steps) > 0


def test_eos_frees_the_slot_and_nothing_is_lost(model):
    rule = FixedLoops([0.5, 0.5, 0.0], seed=1)
    free_run, _ = cdb_generate(model, STRUCTURE, PROMPTS, 8, 3, rule)
    eos = free_run[0][1]
    with_eos, _ = cdb_generate(model, STRUCTURE, PROMPTS, 8, 3, rule, eos_token_ids=[eos])
    for got, ref in zip(with_eos, free_run):
        cut = ref.index(eos) + 1 if eos in ref else len(ref)
        assert got == ref[:cut]
