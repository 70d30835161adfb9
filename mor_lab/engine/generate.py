"""Generation through the one engine: ``generate`` (text in, text out) and ``generate_ids`` (ids in, ids out).

Both are thin front ends of :class:`~mor_lab.engine.scheduler.Scheduler` with one set of arguments and
defaults everywhere: EOS from the model's config (and the tokenizer's), ``max_new_tokens``, greedy or
seeded sampling, a depth ``policy`` (default: the full model), ``slots`` / ``mode`` / ``head_rule`` for
the batching, teacher forcing (``forced=``), ``record_predictions`` (the logit lens of every token, for
every policy), and the trace of what the engine did.
"""
from __future__ import annotations

from dataclasses import dataclass

from .policies.base import DepthPolicy
from .sampling import Sampler
from .scheduler import Scheduler, check_prompts  # noqa: F401 (check_prompts re-exported)
from .trace import Trace


@dataclass
class GenerationOutput:
    texts: list[str]  # generated text per prompt (prompt excluded)
    token_ids: list[list[int]]  # generated ids per prompt (prompt excluded)
    trace: Trace
    prompt_ids: list[list[int]]


def chat_prompt(tokenizer, prompt, system: str | None = None) -> str:
    """Wrap a user message (or a list of chat messages) in the tokenizer's chat template."""
    if getattr(tokenizer, "chat_template", None) is None:
        raise ValueError("this tokenizer has no chat template; pass chat=False and plain prompts")
    messages = prompt if isinstance(prompt, list) else [{"role": "user", "content": prompt}]
    if system is not None and isinstance(prompt, str):
        messages = [{"role": "system", "content": system}] + messages
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


def encode_prompts(tokenizer, prompts, chat: bool = False) -> list[list[int]]:
    if isinstance(prompts, str):
        raise ValueError("prompts must be a list of strings; wrap a single prompt as [prompt]")
    if not prompts:
        raise ValueError("the prompt list is empty; pass at least one prompt")
    encoded = []
    for i, prompt in enumerate(prompts):
        if chat:
            ids = tokenizer(chat_prompt(tokenizer, prompt), add_special_tokens=False).input_ids
        elif isinstance(prompt, str):
            ids = tokenizer(prompt).input_ids
        else:
            ids = list(prompt)
        if not ids:
            raise ValueError(f"prompt {i} is empty (no tokens); give every prompt some text")
        encoded.append(ids)
    return encoded


def generate_ids(model, prompt_ids: list[list[int]], max_new_tokens: int = 64, sampler: Sampler | None = None,
                 eos_token_ids: list[int] | None = None, record_predictions: bool = False,
                 policy: DepthPolicy | None = None, forced: list[list[int]] | None = None, *,
                 slots: int | None = None, mode: str = "static", head_rule: str = "every-step",
                 in_flight: int | None = None, exact: bool = False, request_ids: list[int] | None = None,
                 cost=None) -> tuple[list[list[int]], Trace]:
    """Token ids in, (generated ids per prompt, Trace) out: the engine with every option.

    ``policy`` decides the depth of every token (default: the full model). ``slots``: batch slots B
    (default: every prompt at once in static mode). ``mode``: ``static`` (groups of B, a finished row's
    slot idles) or ``continuous`` (a freed slot takes the next token or request at once; continuous
    depth-wise batching on a recursive model). ``head_rule`` (continuous): ``every-step`` or ``cost``.
    ``eos_token_ids``: None means the model config's EOS ids; ``[]`` disables stopping.
    ``forced`` (teacher forcing): feed these continuations instead of sampling; each TokenTrace then
    records the policy's own ``predicted`` token and the ``logprob`` of the forced one.
    """
    engine = Scheduler(model, policy, slots=slots, mode=mode, head_rule=head_rule, in_flight=in_flight,
                       sampler=sampler, eos_token_ids=eos_token_ids, record_predictions=record_predictions,
                       exact=exact, cost=cost)
    return engine.run(prompt_ids, max_new_tokens, forced=forced, request_ids=request_ids)


def generate(model, tokenizer, prompts, max_new_tokens: int = 64, do_sample: bool = False,
             temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
             seed: int | None = None, chat: bool = False, eos_token_id: int | list[int] | None = None,
             record_predictions: bool = False, policy: DepthPolicy | None = None, **engine) -> GenerationOutput:
    """Generate for a batch of prompts (strings, chat messages with ``chat=True``, or token-id lists).

    Mirrors ``transformers``' ``generate`` arguments. ``record_predictions`` adds the per-step
    logit-lens top-1 token and confidence of every generated token to the trace. ``policy`` picks the
    depth of each token (default: full depth; see ``mor_lab.engine.policies``); the other engine
    options (``slots``, ``mode``, ``head_rule``, ``in_flight``, ``exact``) pass through to ``generate_ids``.
    """
    sampler = Sampler(do_sample, temperature, top_k, top_p, seed)
    prompt_ids = encode_prompts(tokenizer, prompts, chat)
    if eos_token_id is None:
        eos_token_id = tokenizer.eos_token_id
    eos = list(eos_token_id) if isinstance(eos_token_id, (list, tuple)) else [eos_token_id]
    eos = sorted({e for e in eos + model.config.eos_token_ids if e is not None})
    token_ids, trace = generate_ids(model, prompt_ids, max_new_tokens, sampler, eos, record_predictions, policy,
                                    **engine)
    texts = [tokenizer.decode(ids, skip_special_tokens=True) for ids in token_ids]
    return GenerationOutput(texts, token_ids, trace, prompt_ids)
