"""The admissibility gate: pure gate functions over a carried semantic state, composed into the decode loop.

Public API (see each module's docstring):
  gate.core       Gate, Decision, Outcome, Verdict, Action, chain, merge_decisions
  gate.phrases    banned phrases under normalization (Aho-Corasick over token character classes)
  gate.structure  regex / JSON-schema output (outlines-core automata as packed arrays)
  gate.policy     the YAML policy format, its hierarchy, compile_policy
  gate.audit      hash-chained audit records, `python -m gate.audit verify FILE`
  gate.turn       governed_generate / governed_stream: run a turn under a compiled policy and audit it
  gate.authority, gate.evidence, gate.grounding, gate.disclosure, gate.escalation
                  part 2: tool-call authority and quotas, entropy budget, grounded figures, confidential spans,
                  escalation on session history
  gate.store, gate.session  persistent per-(principal, session) state; the multi-turn driver (Governor; import
                  it from gate.session: it needs aqjax, which itself imports gate.core)
"""

from gate.core import ACTION_VERDICT, NO_RULE, NO_TOKEN, Action, Decision, Gate, Outcome, Verdict, chain, merge_decisions
from gate.normalize import Normalization
from gate.phrases import CompiledPhrases, PhraseError, PhraseRule, PhraseState, compile_phrases, contains_banned, phrase_gate
from gate.policy import CompiledPolicy, Policy, PolicyError, compile_policy, load_compiled, load_policy, parse_policy
from gate.structure import CompiledStructure, StructureError, compile_json_schema, compile_regex, structure_gate
from gate.authority import authority_gate
from gate.disclosure import disclosure_gate
from gate.escalation import escalation_gate
from gate.evidence import evidence_gate
from gate.grounding import grounding_gate
from gate.store import FileStore, SQLiteStore

__all__ = [
    "ACTION_VERDICT", "NO_RULE", "NO_TOKEN", "Action", "CompiledPhrases", "CompiledPolicy", "CompiledStructure",
    "Decision", "Gate", "Normalization", "Outcome", "PhraseError", "PhraseRule", "PhraseState", "Policy", "PolicyError",
    "StructureError", "Verdict", "chain", "compile_json_schema", "compile_phrases", "compile_policy", "compile_regex",
    "contains_banned", "load_compiled", "load_policy", "merge_decisions", "parse_policy", "phrase_gate",
    "structure_gate", "authority_gate", "disclosure_gate", "escalation_gate", "evidence_gate", "grounding_gate",
    "FileStore", "SQLiteStore",
]
