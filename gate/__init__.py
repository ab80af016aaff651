"""The admissibility gate: pure gate functions over a carried semantic state, composed into the decode loop.

Public API (see each module's docstring):
  gate.core       Gate, Decision, Outcome, Verdict, Action, chain, merge_decisions
  gate.phrases    banned phrases under normalization (Aho-Corasick over token character classes)
  gate.structure  regex / JSON-schema output (outlines-core automata as packed arrays)
  gate.policy     the YAML policy format, its hierarchy, compile_policy
  gate.audit      hash-chained audit records, `python -m gate.audit verify FILE`
  gate.turn       governed_generate / governed_stream: run a turn under a compiled policy and audit it
"""

from gate.core import ACTION_VERDICT, NO_RULE, NO_TOKEN, Action, Decision, Gate, Outcome, Verdict, chain, merge_decisions
from gate.normalize import Normalization
from gate.phrases import CompiledPhrases, PhraseError, PhraseRule, PhraseState, compile_phrases, contains_banned, phrase_gate
from gate.policy import CompiledPolicy, Policy, PolicyError, compile_policy, load_compiled, load_policy, parse_policy
from gate.structure import CompiledStructure, StructureError, compile_json_schema, compile_regex, structure_gate

__all__ = [
    "ACTION_VERDICT", "NO_RULE", "NO_TOKEN", "Action", "CompiledPhrases", "CompiledPolicy", "CompiledStructure",
    "Decision", "Gate", "Normalization", "Outcome", "PhraseError", "PhraseRule", "PhraseState", "Policy", "PolicyError",
    "StructureError", "Verdict", "chain", "compile_json_schema", "compile_phrases", "compile_policy", "compile_regex",
    "contains_banned", "load_compiled", "load_policy", "merge_decisions", "parse_policy", "phrase_gate",
    "structure_gate",
]
