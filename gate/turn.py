"""Governed turns: run the compiled loop under a compiled policy and turn what it carried into audit records.

The decode loop keeps, per row, the gate's state, the verdict, the confidence and an event log of every step
where the gate acted. After a turn the host reads those once and builds, per row, a `TurnResult` and (when
an `AuditLog` is given) one hash-chained `AuditRecord`.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Iterator, Sequence

import jax
import numpy as np

from aqjax.engine import GenerationResult, Generator
from gate.audit import AuditLog, AuditRecord, state_hash
from gate.core import Action, Verdict
from gate.policy import CompiledPolicy

# how a turn ended, from the loop's finish reason and the verdict
_GATE_FINISH = {Verdict.REFUSE: "refused", Verdict.DEFER: "deferred", Verdict.CLARIFY: "clarify",
                Verdict.DOWNGRADE: "gate", Verdict.ADMIT: "gate"}


@dataclasses.dataclass(frozen=True)
class TurnResult:
    """One governed answer.

    Attributes:
      tokens / text: what was emitted (everything here passed the gate).
      finish_reason: "stop", "length", "refused", "deferred", "clarify" or "gate".
      verdict: the turn's verdict name (ADMIT, DOWNGRADE, CLARIFY, DEFER, REFUSE).
      confidence: the turn's confidence in [0, 1].
      events: audit events (dicts with the keys of gate.audit.EVENT_FIELDS).
      structure_report: for a length stop inside an unfinished structure, what is missing; else None.
      gate_state: this row's gate state after the turn (to carry into the next turn).
      record: the audit record, when an audit log was given.
    """

    tokens: list[int]
    text: str
    finish_reason: str
    verdict: str
    confidence: float
    events: tuple[dict, ...]
    structure_report: str | None
    gate_state: Any
    record: AuditRecord | None = None


def _row(tree, i):
    return jax.tree.map(lambda x: np.asarray(x)[i:i + 1], tree)


def _action(compiled: CompiledPolicy, rule: int, kind: str) -> str | None:
    info = compiled.rules.get(int(rule))
    if info is not None and info.action.upper() in Action.__members__:
        return info.action.upper()
    return "SUPPRESS" if kind == "block" else None


def audit_events(compiled: CompiledPolicy, tokenizer, result: GenerationResult) -> tuple[dict, ...]:
    return tuple(
        {
            "step": e.step,
            "token": e.token,
            "token_text": tokenizer.decode([e.token]) if e.token >= 0 else "",
            "action": _action(compiled, e.rule, e.kind),
            "rule": e.rule,
            "rule_text": compiled.rule_text(e.rule),
            "verdict": Verdict(e.verdict).name,
            "entropy": e.entropy,
            "admissible_mass": e.mass,
        }
        for e in result.events
    )


def _structure_report(compiled: CompiledPolicy, final_state, row: int) -> str | None:
    if "structure" not in compiled.kinds:
        return None
    from gate.structure import length_stop_report

    k = compiled.kinds.index("structure")
    return length_stop_report(compiled.arrays[k], final_state.gate_state[k], row=row)


def finish_turn(
    gen: Generator,
    tokenizer,
    compiled: CompiledPolicy,
    final_state,
    n: int,
    prompt_lengths: Sequence[int],
    states_before: Any,
    *,
    audit: AuditLog | None = None,
    principal: str | None = None,
    session: str | None = None,
) -> list[TurnResult]:
    """Builds the turn results (and audit records) from the loop's final state."""
    results = gen.results(final_state, n, prompt_lengths)
    out = []
    for i, r in enumerate(results):
        verdict = Verdict(r.verdict)
        finish = _GATE_FINISH[verdict] if r.finish_reason == "gate" else (r.finish_reason or "length")
        report = _structure_report(compiled, final_state, i) if r.finish_reason == "length" else None
        events = audit_events(compiled, tokenizer, r)
        after = _row(final_state.gate_state, i)
        record = None
        if audit is not None:
            record = audit.append({
                "policy_hash": compiled.policy_hash,
                "state_hash_before": state_hash(_row(states_before, i)),
                "state_hash_after": state_hash(after),
                "principal": principal,
                "session": session,
                "events": list(events),
                "final_verdict": verdict.name,
                "confidence": r.confidence,
                "finish_reason": finish,
            })
        out.append(TurnResult(tokens=r.tokens, text=tokenizer.decode(r.tokens, skip_special=True),
                              finish_reason=finish, verdict=verdict.name, confidence=r.confidence, events=events,
                              structure_report=report, gate_state=after, record=record))
    return out


def _initial_states(compiled: CompiledPolicy, n: int, gate_states):
    if gate_states is not None:
        return gate_states
    return compiled.gate.init(compiled.arrays, n)


def governed_generate(
    gen: Generator,
    tokenizer,
    compiled: CompiledPolicy,
    prompts: Sequence[Sequence[int]],
    sampling=None,
    max_new_tokens: int | Sequence[int] = 128,
    *,
    gate_states: Any = None,
    audit: AuditLog | None = None,
    principal: str | None = None,
    session: str | None = None,
) -> list[TurnResult]:
    """Generates under `compiled` (every token gated inside the compiled loop) and audits each row.

    `gate_states` (leading axis = len(prompts)) carries the rows' gate state over from an earlier turn.
    """
    before = _initial_states(compiled, len(prompts), gate_states)
    results, state = gen.generate(prompts, sampling, max_new_tokens, gate=compiled.gate, policy=compiled.arrays,
                                  gate_state=before, return_state=True)
    del results
    return finish_turn(gen, tokenizer, compiled, state, len(prompts), [len(p) for p in prompts], before,
                       audit=audit, principal=principal, session=session)


def governed_stream(
    gen: Generator,
    tokenizer,
    compiled: CompiledPolicy,
    prompt: Sequence[int],
    sampling=None,
    max_new_tokens: int = 128,
    *,
    gate_state: Any = None,
    audit: AuditLog | None = None,
    principal: str | None = None,
    session: str | None = None,
    chunk_size: int | None = None,
) -> Iterator[list[int] | TurnResult]:
    """Streams one governed answer: yields lists of new (admitted) token ids, then the final TurnResult."""
    before = _initial_states(compiled, 1, gate_state)
    state = None
    for new, state in gen.stream([prompt], sampling, max_new_tokens, gate=compiled.gate, policy=compiled.arrays,
                                 gate_state=before, chunk_size=chunk_size):
        yield new[0]
    yield finish_turn(gen, tokenizer, compiled, state, 1, [len(prompt)], before, audit=audit, principal=principal,
                      session=session)[0]
