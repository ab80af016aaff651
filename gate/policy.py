"""Policies: the human-readable format (YAML), its hierarchy rules, and the compiler to gate arrays.

A policy file (format version 1; the JSON Schema is `gate/policy_schema.json`):

    aqjax_policy: 1                      # required: the format version
    name: default                        # required
    normalization:                       # optional; every flag defaults to true (see gate/normalize.py)
      casefold: true                     # "Secret" matches "secret"
      nfkc: true                         # fullwidth letters, ligatures ... fold to plain ones
      skip_separators: true              # "s.e c-r e t" matches "secret" (word boundaries vanish too)
      lookalikes: true                   # "s3cr3t" matches "secret"
    messages:                            # optional; named texts that rules emit
      refusal: "I can't help with that."        # what `refuse` rules emit (built in; may be reworded here)
      redaction: "[REDACTED]"                   # what `substitute` rules emit (built in; may be reworded here)
      clarification: "Could you say more?"      # built in, for the server's clarify verdicts
      internal: "[internal]"                    # any other name: a rule picks it with `message:`
    levels:                              # optional; each level optional: deployment ⊇ agent ⊇ session ⊇ turn
      deployment:
        phrases:
          - {phrase: "secret password", action: suppress}
          - {phrase: "launch code", action: substitute, message: internal}
          - {phrase: "bomb recipe", action: refuse}
      agent:
        messages: {billing: "[account number withheld]"}   # a level may add messages, never reword one
        phrases:
          - {phrase: "account number", action: substitute, message: billing}
      turn:
        structure: {json_schema: {type: object, properties: {answer: {type: string}}, required: [answer]}}
        # or: structure: {regex: "(yes|no)"}

Actions (those the phrase gate enforces), weakest to strongest (`ACTION_STRENGTH`):

    suppress < substitute < refuse

`suppress` masks the phrase and the model silently writes something else. `substitute` keeps the phrase out
too, and in addition makes the intervention visible: its marker is in the output and the rule in the audit,
so the user learns that something was withheld. `refuse` ends the turn (verdict REFUSE). `substitute` and
`refuse` emit a message, by default `redaction` and `refusal`; `message:` names another key of `messages`.
`suppress` emits nothing and takes no `message`.

A lower level can only tighten, never loosen:

* Phrases accumulate. Two phrases are "the same" when the phrase gate would match the same text, i.e. their
  normalized forms (`Normalization.normalize`) are equal. A lower level repeating a phrase must give an action
  at least as strong: a stronger one replaces the rule (the effective rule then belongs to the lower level),
  an equal one is redundant (kept once, and it may not change the message), a weaker one is rejected.
* The gate matches a shorter phrase as soon as it appears, so a phrase occurring inside another one preempts
  it. A lower-level phrase inside a higher-level phrase that has a stronger action is rejected (it would
  preempt the stronger rule); the other way round the lower rule merely never fires, which is allowed, and
  phrases listed together at one level are the author's business.
* A structure constraint may be set at most once along the chain (repeating the identical one is a no-op):
  aqjax cannot intersect two automata yet, and replacing one could loosen it.
* Messages can be added at any level but never reworded once set (a rule above relies on its text).
* No key means "allow", "unset" or "remove": such a key is an unknown-key error, like any other.

`Policy.merge_child(level, fragment)` applies the same rules and returns the effective policy (the server
composes deployment ∧ principal ∧ session ∧ request this way). A fragment is one level's body (`phrases`,
`structure`, `messages`) as a mapping or YAML text. It may name any level, even one above a level already
present (a deployment file may carry turn-level defaults): all rules are replayed in hierarchy order, a new
rule may not loosen or preempt any existing rule, and an existing rule that a new, stronger rule for the same
phrase covers is superseded (see `_fold_phrases`).

Authority, evidence, disclosure and escalation (document-level sections; see `policies/bank.yaml`):

    tools:                               # what the model may call (gate/authority.py: the call format)
      transfer:
        description: Move money to a payee.
        parameters:                      # object; every property listed in `required`, written in that order
          type: object
          properties:
            to: {type: string, enum: [savings, landlord]}      # string (optionally an enum)
            amount: {type: integer, minimum: 1, maximum: 10000} # non-negative integer; or boolean
          required: [to, amount]
        quota_argument: amount           # the integer a role's max_total sums per session
    classification:                      # labels of documents / tool results
      public: {action: none}
      confidential: {action: substitute, message: withheld, match_chars: 12}   # or refuse; match_chars optional
    roles:
      payments:
        tools:                           # a list of names, or name -> grant
          transfer: {max_calls: 3, max_total: 500, arguments: {amount: {maximum: 300}, to: {enum: [savings]}}}
        data_classes: [public, confidential]   # labels it may have in context (absent: all)
        clearances: [public]             # labels whose protected spans may be repeated to it
        limits: {evidence_budget: 20}    # nats its authority adds to the evidence budget
    principals:
      bob: {roles: [payments]}           # authority = union of the roles (the looser limits win)
    evidence:                            # gate/evidence.py
      base_budget: 16                    # nats per turn without evidence
      per_evidence_token: 2.0
      max_budget: 400
      thresholds: {downgrade: 0.5, clarify: 0.8, refuse: 1.0}   # fractions of the budget, increasing
    grounding: {figures: true, free_integers_below: 0}          # gate/grounding.py
    escalation:                          # gate/escalation.py; fires once the counter reaches `at`
      - {counter: refusals, at: 2, tighten: {budget_scale: 0.5}}
      - {counter: blocked, at: 3, tighten: {forbid_tools: [transfer]}}
      - {counter: violations, at: 3, tighten: {refuse_topics: ["wire transfer"]}}

A grant can only narrow a tool's schema (enum subsets, tighter bounds); cross-references (a role's tools, a
principal's roles, labels, message names) are checked with file, line and key path like everything else.
These sections cannot be changed by levels (`merge_child` keeps them as they are). Their rules are numbered
after the phrases and the structure (`_part2_rule_ids`), and each section adds its gate to the chain, in the
order phrases, structure, authority, escalation, disclosure, grounding, evidence.

Every parse error names the file, the line and the key path:

    policies/x.yaml:12: levels.deployment.phrases[2].action: unknown action 'supress' (expected one of ...)

`compile_policy(policy, tokenizer)` numbers every rule globally (phrases in hierarchy order, then the
structure, then the part-2 rules), compiles the gates that have rules for that tokenizer and chains them
(`null_gate` when there is no rule). The same policy compiles for any tokenizer; compiled policies are
cached in-process by (policy hash, tokenizer fingerprint, vocabulary width), and `CompiledPolicy.save` /
`CompiledPolicy.load` (= `load_compiled`) store them as `arrays.npz` + `manifest.json` (no pickle).
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import hashlib
import json
import os
import re
import threading
import types
import weakref
from collections.abc import Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import yaml

from gate.core import NO_RULE, Action, Decision, Gate, Outcome, chain
from gate.normalize import Normalization

__all__ = [
    "ACTION_STRENGTH",
    "DEFAULT_MESSAGES",
    "LEVELS",
    "CompiledPolicy",
    "Origin",
    "PhraseEntry",
    "Policy",
    "PolicyError",
    "RuleInfo",
    "StructureEntry",
    "compile_policy",
    "load_compiled",
    "load_policy",
    "null_gate",
    "parse_policy",
    "tokenizer_fingerprint",
]

FORMAT_VERSION = 1
LEVELS = ("deployment", "agent", "session", "turn")
ACTION_STRENGTH = {"suppress": 0, "substitute": 1, "refuse": 2}
_ORDER = " < ".join(ACTION_STRENGTH)
NORMALIZATION_FLAGS = ("casefold", "nfkc", "skip_separators", "lookalikes")
DEFAULT_MESSAGES = {
    "refusal": "I can't help with that.",
    "clarification": "Could you say more about what you need?",
    "redaction": "[REDACTED]",
}
# The message an action emits when its rule names none; actions missing here emit nothing.
DEFAULT_MESSAGE_KEY = {"substitute": "redaction", "refuse": "refusal"}
STRUCTURE_KINDS = ("json_schema", "regex")
MAX_PHRASE_CHARS = 1024

_TOP_KEYS = ("aqjax_policy", "name", "normalization", "messages", "levels", "tools", "roles", "principals",
             "classification", "evidence", "grounding", "escalation")
_LEVEL_KEYS = ("phrases", "structure", "messages")
_PHRASE_KEYS = ("phrase", "action", "message")
# Keys someone might write to relax a parent's rule; none exists, and the error says why.
_LOOSENING_WORDS = {"allow", "allowed", "unset", "remove", "override", "disable", "disabled", "except", "exempt"}
_MESSAGE_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")

_T_STR, _T_INT, _T_FLOAT = "tag:yaml.org,2002:str", "tag:yaml.org,2002:int", "tag:yaml.org,2002:float"
_T_BOOL, _T_NULL = "tag:yaml.org,2002:bool", "tag:yaml.org,2002:null"
_T_MAP, _T_SEQ, _T_MERGE = "tag:yaml.org,2002:map", "tag:yaml.org,2002:seq", "tag:yaml.org,2002:merge"
_JSON_SCALAR_TAGS = (_T_STR, _T_INT, _T_FLOAT, _T_BOOL, _T_NULL)
_MAX_DEPTH = 64
_MAX_NODES = 100_000


# --------------------------------------------------------------------------------------------------------------
# Errors and locations.


class PolicyError(ValueError):
    """A policy that cannot be parsed, merged, compiled or loaded.

    Attributes:
      source: the file (or "<string>", "<fragment>" ...).
      line: 1-based line, or None when unknown (a policy built from a dict).
      path: the key path, e.g. "levels.deployment.phrases[2].action" ("" for the whole document).
      reason: what is wrong.
    """

    def __init__(self, source: str, line: int | None, path: str, reason: str):
        self.source, self.line, self.path, self.reason = source, line, path, reason
        where = f"{source}:{line}" if line is not None else source
        super().__init__(f"{where}: {path}: {reason}" if path else f"{where}: {reason}")

    def __reduce__(self):
        return type(self), (self.source, self.line, self.path, self.reason)


class Origin(NamedTuple):
    """Where a rule was written: file, line (None when unknown) and key path."""

    source: str
    line: int | None
    path: str

    def __str__(self) -> str:
        return f"{self.source}:{self.line} {self.path}" if self.line is not None else f"{self.source} {self.path}"


def _path_str(path: tuple) -> str:
    out = ""
    for p in path:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else str(p))
    return out


def _line(node) -> int | None:
    mark = getattr(node, "start_mark", None)
    return None if mark is None else mark.line + 1


class _Ctx:
    """The source name plus a node budget (aliases can make a small file expand into a huge tree)."""

    def __init__(self, source: str):
        self.source = source
        self.nodes = 0

    def error(self, node, path: tuple, reason: str) -> PolicyError:
        return PolicyError(self.source, _line(node), _path_str(path), reason)

    def origin(self, node, path: tuple) -> Origin:
        return Origin(self.source, _line(node), _path_str(path))


# --------------------------------------------------------------------------------------------------------------
# Reading nodes: YAML from a file keeps line marks; plain Python values become mark-less nodes, so one
# validator serves both.


def _compose(text: str, source: str):
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    try:
        return yaml.compose(text, Loader=loader)
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        line = None if mark is None else mark.line + 1
        raise PolicyError(source, line, "", f"not valid YAML: {e.problem or e}") from None
    except yaml.YAMLError as e:
        raise PolicyError(source, None, "", f"not valid YAML: {e}") from None


def _to_node(value, path: tuple = (), source: str = "<dict>"):
    """A mark-less YAML node for a plain Python value (dicts, lists, tuples, str, int, float, bool, None)."""
    if isinstance(value, Mapping):
        return yaml.MappingNode(_T_MAP, [(_to_node(k, path, source), _to_node(v, path + (str(k),), source))
                                         for k, v in value.items()])
    if isinstance(value, (list, tuple)):
        return yaml.SequenceNode(_T_SEQ, [_to_node(v, path + (i,), source) for i, v in enumerate(value)])
    if isinstance(value, str):
        return yaml.ScalarNode(_T_STR, value)
    if isinstance(value, bool):
        return yaml.ScalarNode(_T_BOOL, "true" if value else "false")
    if isinstance(value, (int, np.integer)):
        return yaml.ScalarNode(_T_INT, str(int(value)))
    if isinstance(value, (float, np.floating)):
        return yaml.ScalarNode(_T_FLOAT, repr(float(value)))
    if value is None:
        return yaml.ScalarNode(_T_NULL, "null")
    raise PolicyError(source, None, _path_str(path), f"{type(value).__name__} is not a YAML/JSON value")


def _describe(node) -> str:
    if isinstance(node, yaml.MappingNode):
        return "a mapping"
    if isinstance(node, yaml.SequenceNode):
        return "a list"
    names = {_T_INT: "the integer", _T_FLOAT: "the number", _T_BOOL: "the boolean"}
    if node.tag == _T_NULL:
        return "null"
    if node.tag in names:
        return f"{names[node.tag]} {node.value}"
    if node.tag == _T_STR:
        return "a string"
    return f"a value tagged {node.tag}"


def _scalar(node):
    # A fresh constructor per scalar: SafeConstructor caches every node it has built.
    return yaml.constructor.SafeConstructor().construct_object(node)


def _absent(fields: dict, key: str) -> bool:
    """An optional section that is missing or written empty (`levels:` with nothing after it)."""
    return key not in fields or (isinstance(fields[key][1], yaml.ScalarNode) and fields[key][1].tag == _T_NULL)


def _mapping(ctx: _Ctx, node, path: tuple) -> dict[str, tuple[Any, Any]]:
    """key -> (key node, value node); rejects non-mappings, non-string keys, duplicates and merge keys."""
    if not isinstance(node, yaml.MappingNode):
        raise ctx.error(node, path, f"expected a mapping, got {_describe(node)}")
    out: dict[str, tuple[Any, Any]] = {}
    for k, v in node.value:
        if k.tag == _T_MERGE:
            raise ctx.error(k, path, "YAML merge keys (<<) are not supported; write the keys out")
        if not isinstance(k, yaml.ScalarNode) or k.tag != _T_STR:
            raise ctx.error(k, path, f"keys must be strings, got {_describe(k)}")
        if k.value in out:
            first = _line(out[k.value][0])
            also = f" (first at line {first})" if first is not None else ""
            raise ctx.error(k, path + (k.value,), f"duplicate key{also}")
        out[k.value] = (k, v)
    return out


def _check_keys(ctx: _Ctx, node, fields: dict, path: tuple, allowed, required=()) -> None:
    for key, (knode, _) in fields.items():
        if key not in allowed:
            hint = ""
            if key.lower() in _LOOSENING_WORDS:
                hint = "; a lower level can only tighten a policy, so nothing can allow or remove a rule"
            raise ctx.error(knode, path + (key,), f"unknown key {key!r} (expected one of {', '.join(allowed)}){hint}")
    for key in required:
        if key not in fields:
            raise ctx.error(node, path + (key,), "required key is missing")


def _string(ctx: _Ctx, node, path: tuple, *, what: str = "a string") -> str:
    if not isinstance(node, yaml.ScalarNode) or node.tag != _T_STR:
        hint = " (quote it)" if isinstance(node, yaml.ScalarNode) else ""
        raise ctx.error(node, path, f"expected {what}, got {_describe(node)}{hint}")
    if not node.value.strip():
        raise ctx.error(node, path, f"expected {what}, got an empty string")
    return node.value


def _bool(ctx: _Ctx, node, path: tuple) -> bool:
    if not isinstance(node, yaml.ScalarNode) or node.tag != _T_BOOL:
        raise ctx.error(node, path, f"expected true or false, got {_describe(node)}")
    return bool(_scalar(node))


def _json_value(ctx: _Ctx, node, path: tuple, depth: int = 0):
    """A free-form JSON value (a JSON schema): plain scalars, lists and string-keyed mappings only."""
    ctx.nodes += 1
    if depth > _MAX_DEPTH or ctx.nodes > _MAX_NODES:
        raise ctx.error(node, path, "nested too deeply or too large")
    if isinstance(node, yaml.MappingNode):
        return {k: _json_value(ctx, v, path + (k,), depth + 1) for k, (_, v) in _mapping(ctx, node, path).items()}
    if isinstance(node, yaml.SequenceNode):
        return [_json_value(ctx, v, path + (i,), depth + 1) for i, v in enumerate(node.value)]
    if node.tag not in _JSON_SCALAR_TAGS:
        raise ctx.error(node, path, f"{_describe(node)} is not a JSON value")
    value = _scalar(node)
    if isinstance(value, float) and not np.isfinite(value):
        raise ctx.error(node, path, f"{node.value} is not a JSON number")
    return value


def _walk_json_path(node, json_path: str):
    """The deepest YAML node along a structure-gate JSON path like `$.properties.age.type[0]`."""
    for m in re.finditer(r'\.([A-Za-z_][A-Za-z0-9_$]*)|\[("(?:[^"\\]|\\.)*")\]|\[(\d+)\]', json_path):
        ident, quoted, index = m.groups()
        if index is not None:
            if not isinstance(node, yaml.SequenceNode) or int(index) >= len(node.value):
                break
            node = node.value[int(index)]
            continue
        key = ident if ident is not None else json.loads(quoted)
        if not isinstance(node, yaml.MappingNode):
            break
        nxt = next((v for k, v in node.value if isinstance(k, yaml.ScalarNode) and k.value == key), None)
        if nxt is None:
            break
        node = nxt
    return node


# --------------------------------------------------------------------------------------------------------------
# The parsed policy.


@dataclasses.dataclass(frozen=True)
class PhraseEntry:
    """One phrase rule.

    Attributes:
      phrase: the text to match (normalized per the policy when compiled).
      action: a key of ACTION_STRENGTH.
      message: the key of the message it emits (resolved to the action's default), or None.
      level: the level that set it.
      origin: where it was written (not part of equality or the hash).
    """

    phrase: str
    action: str
    message: str | None
    level: str
    origin: Origin | None = dataclasses.field(default=None, compare=False)

    def to_dict(self) -> dict:
        d = {"phrase": self.phrase, "action": self.action}
        if self.message is not None:
            d["message"] = self.message
        return d


@dataclasses.dataclass(frozen=True)
class StructureEntry:
    """The output structure: a JSON schema (kept as canonical JSON) or a regex."""

    kind: str
    spec_json: str
    level: str
    origin: Origin | None = dataclasses.field(default=None, compare=False)

    @property
    def spec(self):
        return json.loads(self.spec_json)

    def to_dict(self) -> dict:
        return {self.kind: self.spec}

    def describe(self, limit: int = 200) -> str:
        text = f"{self.kind}: {self.spec if self.kind == 'regex' else self.spec_json}"
        return text if len(text) <= limit else text[: limit - 3] + "..."


def canonical_json(value) -> str:
    """Sorted keys, no whitespace, UTF-8 text: the form policies are hashed in."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


@dataclasses.dataclass(frozen=True, eq=True)
class Policy:
    """An effective policy: one document, or a document with lower-level fragments merged in.

    Attributes:
      name: the policy's name.
      normalization: the `gate.normalize.Normalization` phrases are matched under.
      messages: key -> text, the built-in ones included.
      phrases: the effective phrase rules, in level order.
      structure: the structure constraint, or None.
      levels: the levels present, in hierarchy order.
      message_levels: key -> the level that added the message (None: the document's top-level `messages`).
      source: where the document came from (not part of equality or the hash).
      tools / roles / principals: the authority taxonomy (`tools:`, `roles:`, `principals:`), in file order.
      labels: the classification labels (`classification:`), in file order.
      evidence: the evidence budget (`evidence:`), or None.
      grounding: grounding of figures (`grounding:`), or None.
      escalation: the escalation rules (`escalation:`), in file order.
    """

    name: str
    normalization: Normalization
    messages: Mapping[str, str]
    phrases: tuple[PhraseEntry, ...] = ()
    structure: StructureEntry | None = None
    levels: tuple[str, ...] = ()
    message_levels: Mapping[str, str | None] = dataclasses.field(default_factory=dict)
    source: str = dataclasses.field(default="<string>", compare=False)
    # Part 2 (document-level; see "Authority, evidence, disclosure and escalation" in the module docstring).
    tools: tuple[ToolSpec, ...] = ()
    roles: tuple[RoleSpec, ...] = ()
    principals: tuple[PrincipalSpec, ...] = ()
    labels: tuple[LabelSpec, ...] = ()
    evidence: EvidenceSpec | None = None
    grounding: GroundingSpec | None = None
    escalation: tuple[EscalationRule, ...] = ()

    __hash__ = None  # mappings inside; use `.hash`

    # ---------------------------------------------------------------------------------------------- reading

    @classmethod
    def from_dict(cls, document: Mapping, *, source: str = "<dict>") -> Policy:
        """Parses an already-loaded document (e.g. from JSON). Errors name the key path but no line."""
        return _parse_document(_to_node(document, (), source), _Ctx(source))

    def to_dict(self) -> dict:
        """The policy as a version-1 document (defaults filled in); parsing it gives an equal policy."""
        levels = {}
        for lvl in self.levels:
            body: dict[str, Any] = {}
            phrases = [p.to_dict() for p in self.phrases if p.level == lvl]
            if phrases:
                body["phrases"] = phrases
            if self.structure is not None and self.structure.level == lvl:
                body["structure"] = self.structure.to_dict()
            added = {k: self.messages[k] for k, at in self.message_levels.items() if at == lvl}
            if added:
                body["messages"] = added
            levels[lvl] = body
        top = {k: self.messages[k] for k, at in self.message_levels.items() if at is None}
        doc: dict[str, Any] = {
            "aqjax_policy": FORMAT_VERSION,
            "name": self.name,
            "normalization": dataclasses.asdict(self.normalization),
            "messages": top,
        }
        if levels:
            doc["levels"] = levels
        doc.update(_part2_to_dict(self))
        return doc

    @functools.cached_property
    def hash(self) -> str:
        """sha256 (hex) of the canonical JSON of `to_dict()`: key order, whitespace and defaults don't matter."""
        return hashlib.sha256(canonical_json(self.to_dict()).encode("utf-8")).hexdigest()

    # ---------------------------------------------------------------------------------------------- merging

    def merge_child(self, level: str, fragment: Mapping | str | None, *, source: str = "<fragment>") -> Policy:
        """The effective policy after a lower level's rules.

        Args:
          level: one of LEVELS, not above the lowest level already present.
          fragment: the level's body ({phrases, structure, messages}) as a mapping or YAML text; None or empty
            adds the level with no rules.
          source: names the fragment in errors.

        Raises:
          PolicyError: the fragment is malformed, or it would loosen the policy (naming both rules).
        """
        ctx = _Ctx(source)
        path = ("levels", level)
        if level not in LEVELS:
            raise ctx.error(None, ("levels",), f"unknown level {level!r} (expected one of {', '.join(LEVELS)})")
        if isinstance(fragment, str):
            node = _compose(fragment, source) if fragment.strip() else None
        else:
            node = None if fragment is None else _to_node(fragment, path, source)
        if node is None or (isinstance(node, yaml.ScalarNode) and node.tag == _T_NULL):
            node = yaml.MappingNode(_T_MAP, [])
        return _add_level(self, level, node, path, ctx)

    # ---------------------------------------------------------------------------------------------- helpers

    def phrase_key(self, phrase: str) -> str:
        """The normalized text the phrase gate matches; the hierarchy rules compare phrases in this form."""
        return self.normalization.normalize(phrase)



def _parse_document(root, ctx: _Ctx) -> Policy:
    if root is None:
        raise PolicyError(ctx.source, None, "", "the policy is empty")
    fields = _mapping(ctx, root, ())
    _check_keys(ctx, root, fields, (), _TOP_KEYS, required=("aqjax_policy", "name"))

    vnode = fields["aqjax_policy"][1]
    if not (isinstance(vnode, yaml.ScalarNode) and vnode.tag == _T_INT and _scalar(vnode) == FORMAT_VERSION):
        shown = vnode.value if isinstance(vnode, yaml.ScalarNode) else _describe(vnode)
        raise ctx.error(vnode, ("aqjax_policy",),
                        f"unsupported version {shown} (this aqjax reads version {FORMAT_VERSION})")
    name = _string(ctx, fields["name"][1], ("name",))

    normalization = dict.fromkeys(NORMALIZATION_FLAGS, True)
    if not _absent(fields, "normalization"):
        nnode = fields["normalization"][1]
        nfields = _mapping(ctx, nnode, ("normalization",))
        _check_keys(ctx, nnode, nfields, ("normalization",), NORMALIZATION_FLAGS)
        for flag, (_, v) in nfields.items():
            normalization[flag] = _bool(ctx, v, ("normalization", flag))

    messages = dict(DEFAULT_MESSAGES)
    message_levels: dict[str, str | None] = dict.fromkeys(DEFAULT_MESSAGES)
    if not _absent(fields, "messages"):
        for key, text in _messages(ctx, fields["messages"][1], ("messages",)).items():
            messages[key] = text[0]
            message_levels[key] = None

    policy = Policy(
        name=name,
        normalization=Normalization(**normalization),
        messages=types.MappingProxyType(messages),
        message_levels=types.MappingProxyType(message_levels),
        source=ctx.source,
    )
    if not _absent(fields, "levels"):
        lnode = fields["levels"][1]
        lfields = _mapping(ctx, lnode, ("levels",))
        _check_keys(ctx, lnode, lfields, ("levels",), LEVELS)
        for level in LEVELS:  # hierarchy order, whatever the order in the file
            if level in lfields:
                body = lfields[level][1]
                if isinstance(body, yaml.ScalarNode) and body.tag == _T_NULL:
                    body = yaml.MappingNode(_T_MAP, [])
                policy = _add_level(policy, level, body, ("levels", level), ctx)
    return _parse_part2(policy, fields, ctx)


def _messages(ctx: _Ctx, node, path: tuple) -> dict[str, tuple[str, Any]]:
    out = {}
    for key, (knode, vnode) in _mapping(ctx, node, path).items():
        if not _MESSAGE_NAME.fullmatch(key):
            raise ctx.error(knode, path + (key,), "message names must be identifiers (letters, digits, _)")
        out[key] = (_string(ctx, vnode, path + (key,), what="a message text"), vnode)
    return out


def _add_level(parent: Policy, level: str, node, path: tuple, ctx: _Ctx) -> Policy:
    """`parent` with one level's body merged in, enforcing "a lower level can only tighten"."""
    fields = _mapping(ctx, node, path)
    _check_keys(ctx, node, fields, path, _LEVEL_KEYS)

    messages, message_levels = dict(parent.messages), dict(parent.message_levels)
    if not _absent(fields, "messages"):
        for key, (text, vnode) in _messages(ctx, fields["messages"][1], path + ("messages",)).items():
            if key in messages:
                at = message_levels[key]
                by = "built in or set by the policy's messages" if at is None else f"set at level {at!r}"
                raise ctx.error(vnode, path + ("messages", key),
                                f"message {key!r} is already {by}; a level may add messages, never reword one")
            messages[key], message_levels[key] = text, level

    new: list[PhraseEntry] = []
    if not _absent(fields, "phrases"):
        pnode = fields["phrases"][1]
        if not isinstance(pnode, yaml.SequenceNode):
            raise ctx.error(pnode, path + ("phrases",), f"expected a list, got {_describe(pnode)}")
        seen: dict[str, PhraseEntry] = {}
        for i, item in enumerate(pnode.value):
            ipath = path + ("phrases", i)
            entry = _phrase_entry(ctx, item, ipath, level, messages)
            key = parent.phrase_key(entry.phrase)
            if not key:
                raise ctx.error(item, ipath + ("phrase",),
                                f"{entry.phrase!r} is empty once normalized ({_flags(parent)})")
            if key in seen:
                raise ctx.error(item, ipath, f"phrase {entry.phrase!r} is listed twice at this level "
                                             f"(also {seen[key].origin})")
            seen[key] = entry
            new.append(entry)

    structure = parent.structure
    if "structure" in fields:
        snode = fields["structure"][1]
        s = _structure_entry(ctx, snode, path + ("structure",), level)
        if structure is not None and (structure.kind, structure.spec_json) != (s.kind, s.spec_json):
            raise ctx.error(snode, path + ("structure",),
                            f"a structure constraint is already set at level {structure.level!r} ({structure.origin}); "
                            "a policy has at most one along deployment ⊇ agent ⊇ session ⊇ turn: aqjax cannot "
                            "intersect two automata yet, and replacing one could loosen it")
        if structure is None or LEVELS.index(level) < LEVELS.index(structure.level):
            structure = s  # the identical constraint: it belongs to the highest level that sets it

    return dataclasses.replace(
        parent,
        messages=types.MappingProxyType(messages),
        message_levels=types.MappingProxyType(message_levels),
        phrases=_fold_phrases(parent, level, new),
        structure=structure,
        levels=tuple(lvl for lvl in LEVELS if lvl in parent.levels or lvl == level),
    )


def _flags(policy: Policy) -> str:
    on = [k for k, v in dataclasses.asdict(policy.normalization).items() if v]
    return "normalization: " + (", ".join(on) if on else "none")


def _rule_error(entry: PhraseEntry, field: str, reason: str) -> PolicyError:
    o = entry.origin or Origin("<policy>", None, f"levels.{entry.level}.phrases")
    return PolicyError(o.source, o.line, f"{o.path}.{field}", reason)


def _fold_phrases(parent: Policy, level: str, new: list[PhraseEntry]) -> tuple[PhraseEntry, ...]:
    """The effective phrase rules after adding `new` at `level` (the parent's rules are already consistent).

    All rules are replayed in hierarchy order (a fragment may name a level above one already present).

    Same phrase: the strongest action wins and belongs to the highest level that gives it. A new weaker action
    is loosening (an error); an existing weaker rule is superseded by a new stronger one.

    Different phrases, the shorter occurring inside the longer with a weaker action: the gate matches the
    shorter first, so it preempts the longer. That is an error when the shorter is new and the longer is an
    existing rule, or a new rule that took over an existing one stronger than the shorter (it would loosen
    the parent); and when the shorter is an existing rule at a lower level than the new longer one (the
    document would read as a lower level loosening a higher one). It is allowed between rules that arrive
    together at one level (the author's choice), and when the shorter is an existing rule at or above the new
    one's level (the new rule merely never fires).
    """
    key = parent.phrase_key
    fresh = {id(e) for e in new}
    before = {key(p.phrase): p for p in parent.phrases}
    ordered = [p for lvl in LEVELS for p in (*[q for q in parent.phrases if q.level == lvl],
                                                 *(new if lvl == level else ()))]
    out: dict[str, PhraseEntry] = {}  # key -> rule, in hierarchy order
    for b in ordered:
        kb, sb = key(b.phrase), ACTION_STRENGTH[b.action]
        a = out.get(kb)
        if a is None:
            out[kb] = b
            continue
        sa = ACTION_STRENGTH[a.action]
        if sb < sa and id(b) in fresh:
            raise _rule_error(b, "action", f"loosens the rule for {a.phrase!r} set at level {a.level!r} ({a.origin}): "
                                           f"{b.action!r} is weaker than {a.action!r} (a lower level can only "
                                           f"tighten; strength order: {_ORDER})")
        if sb == sa and a.message != b.message:
            n, e = (b, a) if id(b) in fresh else (a, b)
            raise _rule_error(n, "message", f"gives {e.phrase!r} the message {n.message!r}, but level {e.level!r} "
                                            f"({e.origin}) already gives it {e.message!r}")
        if sb > sa:
            del out[kb]
            out[kb] = b  # b tightens a
        # else: redundant, or an existing rule already tightened by a new one above it

    rules = list(out.values())
    for n in rules:
        if id(n) not in fresh:
            continue
        kn, sn = key(n.phrase), ACTION_STRENGTH[n.action]
        for o in rules:
            ko, so = key(o.phrase), ACTION_STRENGTH[o.action]
            if ko != kn and kn in ko and sn < so:
                short, long_ = n, o
            elif ko != kn and ko in kn and so < sn:
                short, long_ = o, n
            else:
                continue
            if id(short) in fresh:
                # What the shorter rule would preempt: the longer one if it existed, else the rule it took over.
                victim = long_ if id(long_) not in fresh else before.get(key(long_.phrase))
                if victim is not None and ACTION_STRENGTH[short.action] < ACTION_STRENGTH[victim.action]:
                    raise _rule_error(short, "action", f"{short.phrase!r} occurs inside {victim.phrase!r}, which level "
                                                       f"{victim.level!r} gives the stronger action {victim.action!r} "
                                                       f"({victim.origin}); this rule would be matched first and "
                                                       f"preempt it (give it at least {victim.action!r})")
            elif LEVELS.index(short.level) > LEVELS.index(long_.level):
                raise _rule_error(long_, "action", f"{long_.phrase!r} contains {short.phrase!r}, which the lower level "
                                                   f"{short.level!r} already gives the weaker action {short.action!r} "
                                                   f"({short.origin}); that rule would be matched first and preempt "
                                                   "this one")
    return tuple(rules)


def _phrase_entry(ctx: _Ctx, node, path: tuple, level: str, messages: Mapping[str, str]) -> PhraseEntry:
    fields = _mapping(ctx, node, path)
    _check_keys(ctx, node, fields, path, _PHRASE_KEYS, required=("phrase", "action"))
    phrase = _string(ctx, fields["phrase"][1], path + ("phrase",))
    if len(phrase) > MAX_PHRASE_CHARS:
        raise ctx.error(fields["phrase"][1], path + ("phrase",), f"longer than {MAX_PHRASE_CHARS} characters")
    anode = fields["action"][1]
    action = _string(ctx, anode, path + ("action",), what="an action")
    if action not in ACTION_STRENGTH:
        raise ctx.error(anode, path + ("action",),
                        f"unknown action {action!r} (expected one of {', '.join(ACTION_STRENGTH)})")
    message = DEFAULT_MESSAGE_KEY.get(action)
    if "message" in fields:
        mnode = fields["message"][1]
        if action not in DEFAULT_MESSAGE_KEY:
            raise ctx.error(mnode, path + ("message",), f"action {action!r} emits no message "
                                                        f"(only {', '.join(DEFAULT_MESSAGE_KEY)} do)")
        message = _string(ctx, mnode, path + ("message",), what="a message name")
        if message not in messages:
            raise ctx.error(mnode, path + ("message",),
                            f"unknown message {message!r} (defined: {', '.join(sorted(messages))})")
    return PhraseEntry(phrase, action, message, level, ctx.origin(node, path))


def _structure_entry(ctx: _Ctx, node, path: tuple, level: str) -> StructureEntry:
    fields = _mapping(ctx, node, path)
    _check_keys(ctx, node, fields, path, STRUCTURE_KINDS)
    if len(fields) != 1:
        raise ctx.error(node, path, f"give exactly one of {', '.join(STRUCTURE_KINDS)}")
    ((kind, (_, vnode)),) = fields.items()
    if kind == "regex":
        spec = _string(ctx, vnode, path + ("regex",), what="a regex")
    else:
        if not isinstance(vnode, yaml.MappingNode):
            raise ctx.error(vnode, path + (kind,), f"expected a JSON schema (a mapping), got {_describe(vnode)}")
        spec = _json_value(ctx, vnode, path + (kind,))
        _check_schema(ctx, vnode, path + (kind,), spec)
    return StructureEntry(kind, canonical_json(spec), level, ctx.origin(vnode, path + (kind,)))


def _check_schema(ctx: _Ctx, node, path: tuple, schema: dict) -> None:
    """Early check against the structure gate's JSON-schema subset, so errors carry a line."""
    try:
        from gate.structure import StructureError, json_schema_regex
    except ImportError:  # the structure gate is not available: compile_policy will say so
        return
    try:
        json_schema_regex(schema)
    except StructureError as e:
        json_path, _, reason = str(e).partition(": ")
        at = _walk_json_path(node, json_path)
        rest = json_path[1:].lstrip(".") if json_path.startswith("$") else json_path
        full = _path_str(path) + ("" if not rest else ("" if rest.startswith("[") else ".") + rest)
        raise PolicyError(ctx.source, _line(at), full, reason or str(e)) from None
    except ImportError:
        return


# --------------------------------------------------------------------------------------------------------------
# Part 2: authority (tools, roles, principals), classification labels, evidence budget, grounding, escalation.
# These sections are document-level: levels cannot change them (a lower level cannot grant, and tightening them
# per level is not supported yet). They are part of `to_dict()` and so of the policy hash.

COUNTERS = ("violations", "refusals", "blocked")
LABEL_ACTIONS = ("none", "substitute", "refuse")
THRESHOLDS = ("downgrade", "clarify", "refuse")
DEFAULT_THRESHOLDS = {"downgrade": 0.5, "clarify": 0.85, "refuse": 1.0}
MAX_INT_ARG = 10**9 - 1  # integer arguments, quotas and totals: the gate does int32 arithmetic on them
_TOOL_KEYS = ("description", "parameters", "quota_argument")
_PARAM_KEYS = ("type", "properties", "required", "additionalProperties", "description")
_ARG_KEYS = ("type", "enum", "minimum", "maximum", "description")
_ARG_TYPES = ("string", "integer", "boolean")
_GRANT_KEYS = ("max_calls", "max_total", "arguments")
_LIMIT_KEYS = ("enum", "minimum", "maximum")
_ROLE_KEYS = ("tools", "data_classes", "clearances", "limits")
_ROLE_LIMIT_KEYS = ("evidence_budget",)
_PRINCIPAL_KEYS = ("roles",)
_LABEL_KEYS = ("action", "message", "match_chars")
_EVIDENCE_KEYS = ("base_budget", "per_evidence_token", "max_budget", "thresholds")
_GROUNDING_KEYS = ("figures", "free_integers_below")
_ESCALATION_KEYS = ("counter", "at", "tighten")
_TIGHTEN_KEYS = ("budget_scale", "forbid_tools", "refuse_topics")
_IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


@dataclasses.dataclass(frozen=True)
class ToolSpec:
    """A tool the model may call (`tools.<name>`).

    Attributes:
      name: the tool's name (an identifier).
      description: what the tool does (shown to the model).
      parameters_json: canonical JSON of its arguments schema: an object whose properties are all required and
        each a string (optionally an enum), a non-negative integer (optionally with minimum / maximum) or a boolean.
      quota_argument: the integer argument that roles' `max_total` sums over a session, or None.
      origin: where it was written (not part of equality or the hash).
    """

    name: str
    description: str
    parameters_json: str
    quota_argument: str | None = None
    origin: Origin | None = dataclasses.field(default=None, compare=False)

    @property
    def parameters(self) -> dict:
        return json.loads(self.parameters_json)

    def arguments(self) -> list[tuple[str, dict]]:
        """(name, schema) of every argument, in the order the call writes them (that of `required`)."""
        params = self.parameters
        return [(a, params["properties"][a]) for a in params["required"]]

    def to_dict(self) -> dict:
        d = {"description": self.description, "parameters": self.parameters}
        if self.quota_argument is not None:
            d["quota_argument"] = self.quota_argument
        return d


@dataclasses.dataclass(frozen=True)
class ToolGrant:
    """A role's grant of one tool (`roles.<role>.tools.<tool>`).

    Attributes:
      tool: the tool's name.
      max_calls: calls per session, or None (unlimited).
      max_total: the sum of the tool's quota argument per session, or None (unlimited).
      limits_json: canonical JSON {argument: {enum | minimum | maximum}}: the role's narrowing of the schema.
    """

    tool: str
    max_calls: int | None = None
    max_total: int | None = None
    limits_json: str = "{}"
    origin: Origin | None = dataclasses.field(default=None, compare=False)

    @property
    def limits(self) -> dict:
        return json.loads(self.limits_json)

    def to_dict(self) -> dict:
        d: dict[str, Any] = {}
        if self.max_calls is not None:
            d["max_calls"] = self.max_calls
        if self.max_total is not None:
            d["max_total"] = self.max_total
        if self.limits:
            d["arguments"] = self.limits
        return d


@dataclasses.dataclass(frozen=True)
class RoleSpec:
    """A role (`roles.<name>`): the tools it grants, the data classes it may read and the labels it is cleared for.

    Attributes:
      name: the role's name.
      tools: its tool grants, in file order.
      data_classes: labels of documents it may have in its context (None: every label).
      clearances: labels whose protected spans may be repeated to it.
      evidence_budget: extra nats of evidence budget its authority adds to every turn.
    """

    name: str
    tools: tuple[ToolGrant, ...] = ()
    data_classes: tuple[str, ...] | None = None
    clearances: tuple[str, ...] = ()
    evidence_budget: float = 0.0
    origin: Origin | None = dataclasses.field(default=None, compare=False)

    def to_dict(self) -> dict:
        d: dict[str, Any] = {"tools": {g.tool: g.to_dict() for g in self.tools}, "clearances": list(self.clearances)}
        if self.data_classes is not None:
            d["data_classes"] = list(self.data_classes)
        if self.evidence_budget:
            d["limits"] = {"evidence_budget": self.evidence_budget}
        return d


@dataclasses.dataclass(frozen=True)
class PrincipalSpec:
    """Who may ask (`principals.<name>`) and the roles they hold."""

    name: str
    roles: tuple[str, ...]
    origin: Origin | None = dataclasses.field(default=None, compare=False)

    def to_dict(self) -> dict:
        return {"roles": list(self.roles)}


@dataclasses.dataclass(frozen=True)
class LabelSpec:
    """A classification label (`classification.<name>`).

    Attributes:
      name: the label.
      action: what happens when an uncleared principal's output would repeat a protected span: "none" (the
        label protects nothing), "substitute" (the message replaces the token that would complete the span) or
        "refuse" (the refusal message ends the turn).
      message: the message key (default: redaction for substitute, refusal for refuse), None for "none".
      match_chars: protect a span by its first N normalized characters (0: the whole span).
    """

    name: str
    action: str = "none"
    message: str | None = None
    match_chars: int = 0
    origin: Origin | None = dataclasses.field(default=None, compare=False)

    def to_dict(self) -> dict:
        d: dict[str, Any] = {"action": self.action}
        if self.message is not None:
            d["message"] = self.message
        if self.match_chars:
            d["match_chars"] = self.match_chars
        return d


@dataclasses.dataclass(frozen=True)
class EvidenceSpec:
    """The evidence budget (`evidence:`): nats of model entropy a turn may spend, and where verdicts escalate.

    budget = min(max_budget, base_budget + per_evidence_token * (evidence tokens in the context) + the roles'
    evidence_budget) * (the escalation rules' budget_scale). The thresholds are fractions of the budget.
    """

    base_budget: float
    per_evidence_token: float = 0.0
    max_budget: float = 1e9
    downgrade: float = DEFAULT_THRESHOLDS["downgrade"]
    clarify: float = DEFAULT_THRESHOLDS["clarify"]
    refuse: float = DEFAULT_THRESHOLDS["refuse"]
    origin: Origin | None = dataclasses.field(default=None, compare=False)

    def to_dict(self) -> dict:
        return {"base_budget": self.base_budget, "per_evidence_token": self.per_evidence_token,
                "max_budget": self.max_budget,
                "thresholds": {"downgrade": self.downgrade, "clarify": self.clarify, "refuse": self.refuse}}


@dataclasses.dataclass(frozen=True)
class GroundingSpec:
    """Grounding of figures (`grounding:`): every number stated must occur in the turn's evidence.

    Attributes:
      figures: the gate is on.
      free_integers_below: integers 0 .. N-1 may always be written (list numbering and the like).
    """

    figures: bool = True
    free_integers_below: int = 0
    origin: Origin | None = dataclasses.field(default=None, compare=False)

    def to_dict(self) -> dict:
        return {"figures": self.figures, "free_integers_below": self.free_integers_below}


@dataclasses.dataclass(frozen=True)
class EscalationRule:
    """One escalation rule (`escalation[i]`): once a session counter reaches `at`, tighten from then on.

    Attributes:
      counter: one of COUNTERS.
      at: the count at which the rule fires (it stays active for the rest of the session).
      budget_scale: multiplies the evidence budget (in (0, 1]), or None.
      forbid_tools: tools no longer callable.
      refuse_topics: phrases that end a turn with the refusal message.
    """

    counter: str
    at: int
    budget_scale: float | None = None
    forbid_tools: tuple[str, ...] = ()
    refuse_topics: tuple[str, ...] = ()
    origin: Origin | None = dataclasses.field(default=None, compare=False)

    def to_dict(self) -> dict:
        t: dict[str, Any] = {}
        if self.budget_scale is not None:
            t["budget_scale"] = self.budget_scale
        if self.forbid_tools:
            t["forbid_tools"] = list(self.forbid_tools)
        if self.refuse_topics:
            t["refuse_topics"] = list(self.refuse_topics)
        return {"counter": self.counter, "at": self.at, "tighten": t}

    def describe(self) -> str:
        return f"escalation: {self.counter} >= {self.at} -> {canonical_json(self.to_dict()['tighten'])}"


def _part2_to_dict(policy: Policy) -> dict:
    d: dict[str, Any] = {}
    if policy.tools:
        d["tools"] = {t.name: t.to_dict() for t in policy.tools}
    if policy.roles:
        d["roles"] = {r.name: r.to_dict() for r in policy.roles}
    if policy.principals:
        d["principals"] = {p.name: p.to_dict() for p in policy.principals}
    if policy.labels:
        d["classification"] = {lb.name: lb.to_dict() for lb in policy.labels}
    if policy.evidence is not None:
        d["evidence"] = policy.evidence.to_dict()
    if policy.grounding is not None:
        d["grounding"] = policy.grounding.to_dict()
    if policy.escalation:
        d["escalation"] = [e.to_dict() for e in policy.escalation]
    return d


def _int_value(ctx: _Ctx, node, path: tuple, lo: int, hi: int) -> int:
    if not isinstance(node, yaml.ScalarNode) or node.tag != _T_INT:
        raise ctx.error(node, path, f"expected an integer, got {_describe(node)}")
    v = int(_scalar(node))
    if not lo <= v <= hi:
        raise ctx.error(node, path, f"{v} is out of range [{lo}, {hi}]")
    return v


def _float_value(ctx: _Ctx, node, path: tuple, lo: float, hi: float, *, open_lo: bool = False) -> float:
    if not isinstance(node, yaml.ScalarNode) or node.tag not in (_T_INT, _T_FLOAT):
        raise ctx.error(node, path, f"expected a number, got {_describe(node)}")
    v = float(_scalar(node))
    if not np.isfinite(v) or v > hi or v < lo or (open_lo and v == lo):
        bound = f"({lo}, {hi}]" if open_lo else f"[{lo}, {hi}]"
        raise ctx.error(node, path, f"{_scalar(node)} is out of range {bound}")
    return v


def _ident(ctx: _Ctx, node, path: tuple, what: str) -> str:
    name = _string(ctx, node, path, what=what)
    if not _IDENT.fullmatch(name):
        raise ctx.error(node, path, f"{what} {name!r} must be an identifier (letters, digits, _)")
    return name


def _key_ident(ctx: _Ctx, knode, path: tuple, key: str, what: str) -> str:
    if not _IDENT.fullmatch(key):
        raise ctx.error(knode, path + (key,), f"{what} {key!r} must be an identifier (letters, digits, _)")
    return key


def _name_list(ctx: _Ctx, node, path: tuple, known, what: str) -> tuple[str, ...]:
    """A list of names, each in `known` (a dict name -> anything), without repeats."""
    if not isinstance(node, yaml.SequenceNode):
        raise ctx.error(node, path, f"expected a list of {what}s, got {_describe(node)}")
    out: list[str] = []
    for i, item in enumerate(node.value):
        name = _string(ctx, item, path + (i,), what=f"a {what} name")
        if known is not None and name not in known:
            have = ", ".join(known) or "none"
            raise ctx.error(item, path + (i,), f"unknown {what} {name!r} (defined: {have})")
        if name in out:
            raise ctx.error(item, path + (i,), f"{what} {name!r} is listed twice")
        out.append(name)
    return tuple(out)


def _tool_argument(ctx: _Ctx, node, path: tuple) -> dict:
    fields = _mapping(ctx, node, path)
    _check_keys(ctx, node, fields, path, _ARG_KEYS)
    out: dict[str, Any] = {}
    if "type" in fields:
        tnode = fields["type"][1]
        kind = _string(ctx, tnode, path + ("type",), what="a type")
        if kind not in _ARG_TYPES:
            hint = " (write amounts as integers, e.g. cents)" if kind == "number" else ""
            raise ctx.error(tnode, path + ("type",),
                            f"unsupported argument type {kind!r} (expected one of {', '.join(_ARG_TYPES)}){hint}")
    elif "enum" in fields:
        kind = "string"
    else:
        raise ctx.error(node, path + ("type",), "required key is missing (or give an enum of strings)")
    out["type"] = kind
    if "enum" in fields:
        enode = fields["enum"][1]
        if kind != "string":
            raise ctx.error(enode, path + ("enum",), "enum is supported for string arguments only")
        values = _name_list(ctx, enode, path + ("enum",), None, "enum value") if isinstance(
            enode, yaml.SequenceNode) else None
        if not values:
            raise ctx.error(enode, path + ("enum",), "expected a non-empty list of strings")
        for i, v in enumerate(values):
            if re.search(r'["\\\x00-\x1f]', v):
                raise ctx.error(enode.value[i], path + ("enum", i), "enum values may not hold quotes, backslashes "
                                                                    "or control characters")
        out["enum"] = list(values)
    for bound in ("minimum", "maximum"):
        if bound in fields:
            if kind != "integer":
                raise ctx.error(fields[bound][1], path + (bound,), f"{bound} is supported for integer arguments only")
            out[bound] = _int_value(ctx, fields[bound][1], path + (bound,), 0, MAX_INT_ARG)
    if kind == "integer":
        out.setdefault("minimum", 0)
        out.setdefault("maximum", MAX_INT_ARG)
        if out["minimum"] > out["maximum"]:
            raise ctx.error(node, path, f"minimum {out['minimum']} exceeds maximum {out['maximum']}")
    if "description" in fields:
        out["description"] = _string(ctx, fields["description"][1], path + ("description",), what="a description")
    return out


def _tool_spec(ctx: _Ctx, name: str, node, path: tuple) -> ToolSpec:
    fields = _mapping(ctx, node, path)
    _check_keys(ctx, node, fields, path, _TOOL_KEYS, required=("parameters",))
    description = ""
    if "description" in fields:
        description = _string(ctx, fields["description"][1], path + ("description",), what="a description")
    pnode, ppath = fields["parameters"][1], path + ("parameters",)
    pfields = _mapping(ctx, pnode, ppath)
    _check_keys(ctx, pnode, pfields, ppath, _PARAM_KEYS, required=("type",))
    if _string(ctx, pfields["type"][1], ppath + ("type",), what="a type") != "object":
        raise ctx.error(pfields["type"][1], ppath + ("type",), "a tool's parameters must be of type 'object'")
    props: dict[str, dict] = {}
    if "properties" in pfields:
        prnode = pfields["properties"][1]
        for arg, (knode, anode) in _mapping(ctx, prnode, ppath + ("properties",)).items():
            _key_ident(ctx, knode, ppath + ("properties",), arg, "argument name")
            props[arg] = _tool_argument(ctx, anode, ppath + ("properties", arg))
    order = list(props)
    if "required" in pfields:
        required = _name_list(ctx, pfields["required"][1], ppath + ("required",), props, "property")
        missing = [a for a in props if a not in required]
        if missing:
            raise ctx.error(pfields["required"][1], ppath + ("required",),
                            f"optional arguments are not supported: list every property ({', '.join(missing)} "
                            "missing); the call always writes every argument, in the order of `required`")
        order = list(required)  # canonical JSON sorts mapping keys; this list keeps the argument order
    if "additionalProperties" in pfields:
        anode = pfields["additionalProperties"][1]
        if not isinstance(anode, yaml.ScalarNode) or anode.tag != _T_BOOL or _scalar(anode) is not False:
            raise ctx.error(anode, ppath + ("additionalProperties",), "only false is supported")
    schema: dict[str, Any] = {"type": "object", "properties": props, "required": order,
                              "additionalProperties": False}
    if "description" in pfields:
        schema["description"] = _string(ctx, pfields["description"][1], ppath + ("description",),
                                        what="a description")
    quota = None
    if "quota_argument" in fields:
        qnode = fields["quota_argument"][1]
        quota = _string(ctx, qnode, path + ("quota_argument",), what="an argument name")
        if props.get(quota, {}).get("type") != "integer":
            raise ctx.error(qnode, path + ("quota_argument",), f"{quota!r} is not an integer argument of {name!r}")
    return ToolSpec(name, description, canonical_json(schema), quota, ctx.origin(node, path))


def _grant(ctx: _Ctx, tool: ToolSpec, node, path: tuple) -> ToolGrant:
    if isinstance(node, yaml.ScalarNode) and node.tag == _T_NULL:
        node = yaml.MappingNode(_T_MAP, [])
    fields = _mapping(ctx, node, path)
    _check_keys(ctx, node, fields, path, _GRANT_KEYS)
    max_calls = max_total = None
    if "max_calls" in fields:
        max_calls = _int_value(ctx, fields["max_calls"][1], path + ("max_calls",), 0, MAX_INT_ARG)
    if "max_total" in fields:
        if tool.quota_argument is None:
            raise ctx.error(fields["max_total"][1], path + ("max_total",),
                            f"tool {tool.name!r} has no quota_argument to total")
        max_total = _int_value(ctx, fields["max_total"][1], path + ("max_total",), 0, MAX_INT_ARG)
    limits: dict[str, dict] = {}
    if "arguments" in fields:
        anode = fields["arguments"][1]
        args = dict(tool.arguments())
        for arg, (knode, lnode) in _mapping(ctx, anode, path + ("arguments",)).items():
            lpath = path + ("arguments", arg)
            if arg not in args:
                raise ctx.error(knode, lpath, f"{tool.name!r} has no argument {arg!r} (it has {', '.join(args)})")
            spec = args[arg]
            lfields = _mapping(ctx, lnode, lpath)
            _check_keys(ctx, lnode, lfields, lpath, _LIMIT_KEYS)
            lim: dict[str, Any] = {}
            if "enum" in lfields:
                enode = lfields["enum"][1]
                if "enum" not in spec:
                    raise ctx.error(enode, lpath + ("enum",), f"{arg!r} is not an enum argument")
                values = _name_list(ctx, enode, lpath + ("enum",), dict.fromkeys(spec["enum"]), "enum value")
                if not values:
                    raise ctx.error(enode, lpath + ("enum",), "expected a non-empty list")
                lim["enum"] = list(values)
            for bound in ("minimum", "maximum"):
                if bound in lfields:
                    bnode = lfields[bound][1]
                    if spec["type"] != "integer":
                        raise ctx.error(bnode, lpath + (bound,), f"{arg!r} is not an integer argument")
                    v = _int_value(ctx, bnode, lpath + (bound,), 0, MAX_INT_ARG)
                    if (bound == "maximum" and v > spec["maximum"]) or (bound == "minimum" and v < spec["minimum"]):
                        raise ctx.error(bnode, lpath + (bound,), f"a role can only narrow a tool's schema: {v} is "
                                                                 f"outside the tool's {bound} {spec[bound]}")
                    lim[bound] = v
            limits[arg] = lim
    return ToolGrant(tool.name, max_calls, max_total, canonical_json(limits), ctx.origin(node, path))


def _parse_part2(policy: Policy, fields: dict, ctx: _Ctx) -> Policy:
    """Parses the document-level part-2 sections into `policy` (cross-references checked, in a fixed order)."""
    tools: dict[str, ToolSpec] = {}
    if not _absent(fields, "tools"):
        tnode = fields["tools"][1]
        for name, (knode, node) in _mapping(ctx, tnode, ("tools",)).items():
            _key_ident(ctx, knode, ("tools",), name, "tool name")
            tools[name] = _tool_spec(ctx, name, node, ("tools", name))

    labels: dict[str, LabelSpec] = {}
    if not _absent(fields, "classification"):
        cnode = fields["classification"][1]
        for name, (knode, node) in _mapping(ctx, cnode, ("classification",)).items():
            path = ("classification", _key_ident(ctx, knode, ("classification",), name, "label"))
            if isinstance(node, yaml.ScalarNode) and node.tag == _T_NULL:
                node = yaml.MappingNode(_T_MAP, [])
            lfields = _mapping(ctx, node, path)
            _check_keys(ctx, node, lfields, path, _LABEL_KEYS)
            action = "none"
            if "action" in lfields:
                anode = lfields["action"][1]
                action = _string(ctx, anode, path + ("action",), what="an action")
                if action not in LABEL_ACTIONS:
                    raise ctx.error(anode, path + ("action",),
                                    f"unknown action {action!r} (expected one of {', '.join(LABEL_ACTIONS)})")
            message = DEFAULT_MESSAGE_KEY.get(action)
            if "message" in lfields:
                mnode = lfields["message"][1]
                if action == "none":
                    raise ctx.error(mnode, path + ("message",), "action 'none' emits no message")
                message = _string(ctx, mnode, path + ("message",), what="a message name")
                if message not in policy.messages:
                    raise ctx.error(mnode, path + ("message",),
                                    f"unknown message {message!r} (defined: {', '.join(sorted(policy.messages))})")
            match_chars = 0
            if "match_chars" in lfields:
                match_chars = _int_value(ctx, lfields["match_chars"][1], path + ("match_chars",), 1, 1024)
            labels[name] = LabelSpec(name, action, message, match_chars, ctx.origin(node, path))

    roles: dict[str, RoleSpec] = {}
    if not _absent(fields, "roles"):
        rnode = fields["roles"][1]
        for name, (knode, node) in _mapping(ctx, rnode, ("roles",)).items():
            path = ("roles", _key_ident(ctx, knode, ("roles",), name, "role name"))
            if isinstance(node, yaml.ScalarNode) and node.tag == _T_NULL:
                node = yaml.MappingNode(_T_MAP, [])
            rfields = _mapping(ctx, node, path)
            _check_keys(ctx, node, rfields, path, _ROLE_KEYS)
            grants: list[ToolGrant] = []
            if not _absent(rfields, "tools"):
                gnode = rfields["tools"][1]
                if isinstance(gnode, yaml.SequenceNode):  # a plain list of tool names: no limits
                    for tname in _name_list(ctx, gnode, path + ("tools",), tools, "tool"):
                        grants.append(ToolGrant(tname, origin=ctx.origin(gnode, path + ("tools",))))
                else:
                    for tname, (tk, tv) in _mapping(ctx, gnode, path + ("tools",)).items():
                        if tname not in tools:
                            have = ", ".join(tools) or "none"
                            raise ctx.error(tk, path + ("tools", tname), f"unknown tool {tname!r} (defined: {have})")
                        grants.append(_grant(ctx, tools[tname], tv, path + ("tools", tname)))
            named: dict[str, tuple[str, ...] | None] = {"data_classes": None, "clearances": None}
            for key in named:
                if not _absent(rfields, key):
                    if not labels:
                        raise ctx.error(rfields[key][1], path + (key,), "no classification section defines labels")
                    named[key] = _name_list(ctx, rfields[key][1], path + (key,), labels, "label")
            data_classes, clearances = named["data_classes"], named["clearances"]
            budget = 0.0
            if not _absent(rfields, "limits"):
                lnode = rfields["limits"][1]
                lfields = _mapping(ctx, lnode, path + ("limits",))
                _check_keys(ctx, lnode, lfields, path + ("limits",), _ROLE_LIMIT_KEYS)
                if "evidence_budget" in lfields:
                    budget = _float_value(ctx, lfields["evidence_budget"][1], path + ("limits", "evidence_budget"),
                                          0.0, 1e9)
            roles[name] = RoleSpec(name, tuple(grants), data_classes, clearances or (), budget,
                                   ctx.origin(node, path))

    principals: dict[str, PrincipalSpec] = {}
    if not _absent(fields, "principals"):
        pnode = fields["principals"][1]
        for name, (knode, node) in _mapping(ctx, pnode, ("principals",)).items():
            path = ("principals", name)
            if not name.strip():
                raise ctx.error(knode, path, "principal names may not be empty")
            pfields = _mapping(ctx, node, path)
            _check_keys(ctx, node, pfields, path, _PRINCIPAL_KEYS, required=("roles",))
            principals[name] = PrincipalSpec(name, _name_list(ctx, pfields["roles"][1], path + ("roles",), roles,
                                                              "role"), ctx.origin(node, path))
    if roles and not principals:
        raise ctx.error(fields["roles"][1], ("roles",), "roles are defined but no principal holds one "
                                                        "(add a principals section)")

    evidence = None
    if not _absent(fields, "evidence"):
        enode = fields["evidence"][1]
        efields = _mapping(ctx, enode, ("evidence",))
        _check_keys(ctx, enode, efields, ("evidence",), _EVIDENCE_KEYS, required=("base_budget",))
        kw: dict[str, Any] = {"base_budget": _float_value(ctx, efields["base_budget"][1], ("evidence", "base_budget"),
                                                          0.0, 1e9, open_lo=True)}
        if "per_evidence_token" in efields:
            kw["per_evidence_token"] = _float_value(ctx, efields["per_evidence_token"][1],
                                                    ("evidence", "per_evidence_token"), 0.0, 1e6)
        if "max_budget" in efields:
            kw["max_budget"] = _float_value(ctx, efields["max_budget"][1], ("evidence", "max_budget"), 0.0, 1e9,
                                            open_lo=True)
        if "thresholds" in efields:
            tnode = efields["thresholds"][1]
            tfields = _mapping(ctx, tnode, ("evidence", "thresholds"))
            _check_keys(ctx, tnode, tfields, ("evidence", "thresholds"), THRESHOLDS)
            for key, (_, v) in tfields.items():
                kw[key] = _float_value(ctx, v, ("evidence", "thresholds", key), 0.0, 100.0, open_lo=True)
        spec = EvidenceSpec(**kw, origin=ctx.origin(enode, ("evidence",)))
        if not spec.downgrade < spec.clarify < spec.refuse:
            raise ctx.error(efields.get("thresholds", (None, enode))[1], ("evidence", "thresholds"),
                            f"thresholds must increase: downgrade {spec.downgrade} < clarify {spec.clarify} < "
                            f"refuse {spec.refuse}")
        evidence = spec

    grounding = None
    if not _absent(fields, "grounding"):
        gnode = fields["grounding"][1]
        gfields = _mapping(ctx, gnode, ("grounding",))
        _check_keys(ctx, gnode, gfields, ("grounding",), _GROUNDING_KEYS)
        figures = _bool(ctx, gfields["figures"][1], ("grounding", "figures")) if "figures" in gfields else True
        free = 0
        if "free_integers_below" in gfields:
            free = _int_value(ctx, gfields["free_integers_below"][1], ("grounding", "free_integers_below"), 0, 1000)
        grounding = GroundingSpec(figures, free, ctx.origin(gnode, ("grounding",)))

    escalation: list[EscalationRule] = []
    if not _absent(fields, "escalation"):
        enode = fields["escalation"][1]
        if not isinstance(enode, yaml.SequenceNode):
            raise ctx.error(enode, ("escalation",), f"expected a list, got {_describe(enode)}")
        for i, item in enumerate(enode.value):
            path = ("escalation", i)
            efields = _mapping(ctx, item, path)
            _check_keys(ctx, item, efields, path, _ESCALATION_KEYS, required=("counter", "at", "tighten"))
            cnode = efields["counter"][1]
            counter = _string(ctx, cnode, path + ("counter",), what="a counter")
            if counter not in COUNTERS:
                raise ctx.error(cnode, path + ("counter",),
                                f"unknown counter {counter!r} (expected one of {', '.join(COUNTERS)})")
            at = _int_value(ctx, efields["at"][1], path + ("at",), 1, 1_000_000)
            tnode = efields["tighten"][1]
            tfields = _mapping(ctx, tnode, path + ("tighten",))
            _check_keys(ctx, tnode, tfields, path + ("tighten",), _TIGHTEN_KEYS)
            if not tfields:
                raise ctx.error(tnode, path + ("tighten",), f"give at least one of {', '.join(_TIGHTEN_KEYS)}")
            scale = forbid = topics = None
            if "budget_scale" in tfields:
                if evidence is None:
                    raise ctx.error(tfields["budget_scale"][1], path + ("tighten", "budget_scale"),
                                    "there is no evidence section to scale")
                scale = _float_value(ctx, tfields["budget_scale"][1], path + ("tighten", "budget_scale"), 0.0, 1.0,
                                     open_lo=True)
            if "forbid_tools" in tfields:
                forbid = _name_list(ctx, tfields["forbid_tools"][1], path + ("tighten", "forbid_tools"), tools, "tool")
            if "refuse_topics" in tfields:
                topics = _name_list(ctx, tfields["refuse_topics"][1], path + ("tighten", "refuse_topics"), None,
                                    "topic")
                for j, t in enumerate(topics):
                    if not policy.phrase_key(t):
                        raise ctx.error(tfields["refuse_topics"][1].value[j], path + ("tighten", "refuse_topics", j),
                                        f"{t!r} is empty once normalized ({_flags(policy)})")
            escalation.append(EscalationRule(counter, at, scale, forbid or (), topics or (), ctx.origin(item, path)))

    return dataclasses.replace(policy, tools=tuple(tools.values()), roles=tuple(roles.values()),
                               principals=tuple(principals.values()), labels=tuple(labels.values()),
                               evidence=evidence, grounding=grounding, escalation=tuple(escalation))


# --------------------------------------------------------------------------------------------------------------
# Loading.


def parse_policy(text: str, *, source: str = "<string>") -> Policy:
    """Parses a policy document from YAML text.

    Raises:
      PolicyError: naming `source`, the line and the key path.
    """
    return _parse_document(_compose(text, source), _Ctx(source))


def load_policy(path: str | os.PathLike) -> Policy:
    """Reads and parses a policy file (errors are named by `path` as given)."""
    source = os.fspath(path)
    try:
        with open(source, encoding="utf-8") as f:
            text = f.read()
    except (OSError, UnicodeDecodeError) as e:
        raise PolicyError(source, None, "", f"cannot read: {e}") from None
    return parse_policy(text, source=source)


# --------------------------------------------------------------------------------------------------------------
# Compiling.


def tokenizer_fingerprint(tokenizer) -> str:
    """sha256 (hex) of what compiled gate arrays depend on: every id's bytes, the EOS id and the special ids."""
    try:
        cached = _FINGERPRINTS.get(tokenizer)
    except TypeError:  # not weak-referenceable
        cached = None
    if cached is not None:
        return cached
    tb = tokenizer.token_bytes()
    h = hashlib.sha256(b"aqjax-vocabulary-v1\0")
    h.update(np.asarray([len(tb), int(tokenizer.eos_id)], np.int64).tobytes())
    h.update(np.asarray(sorted(getattr(tokenizer, "special_ids", ())), np.int64).tobytes())
    h.update(np.asarray([len(b) for b in tb], np.int64).tobytes())
    h.update(b"".join(tb))
    fp = h.hexdigest()
    try:
        _FINGERPRINTS[tokenizer] = fp
    except TypeError:
        pass
    return fp


_FINGERPRINTS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


@dataclasses.dataclass(frozen=True)
class RuleInfo:
    """One row of a compiled policy's rules table.

    Attributes:
      id: the global rule id (what gates report).
      level: the level that set the rule.
      kind: "phrase" or "structure".
      text: the phrase, or a description of the structure.
      action: the phrase's action, or "constrain" for the structure.
      message: the text the rule emits, or None.
    """

    id: int
    level: str
    kind: str
    text: str
    action: str
    message: str | None = None


def null_gate(vocab_size: int) -> Gate:
    """A gate with no rules: admits every token, never stops. Its policy and state are empty tuples."""

    def init(policy, batch):
        del policy, batch
        return ()

    def evaluate(policy, state, logits):
        del policy, state
        decision = Decision.admit_all(logits.shape[0], logits.shape[-1])
        return decision

    def check(policy, state, token):
        del policy, state
        return Outcome.unchanged(token)

    def advance(policy, state, token, emitted, seen=None):
        del policy, token, emitted, seen
        return state

    del vocab_size  # the mask follows the logits' width
    return Gate(init, evaluate, check, advance)


@functools.lru_cache(maxsize=32)
def _gate(kinds: tuple[str, ...], vocab_size: int, eos_id: int) -> Gate:
    # One Gate object per (gates present, vocabulary): policies of the same shape bucket reuse the jitted loop.
    if not kinds:
        return null_gate(vocab_size)
    gates = []
    for kind in kinds:
        if kind == "phrases":
            from gate.phrases import phrase_gate

            gates.append(phrase_gate(vocab_size))
        elif kind == "structure":
            from gate.structure import structure_gate

            gates.append(structure_gate(vocab_size, eos_id))
        else:
            gates.append(_PART2_GATES[kind](vocab_size))
    return chain(*gates)


def _authority_gate(vocab_size):
    from gate.authority import authority_gate

    return authority_gate(vocab_size)


def _escalation_gate(vocab_size):
    from gate.escalation import escalation_gate

    return escalation_gate(vocab_size)


def _disclosure_gate(vocab_size):
    from gate.disclosure import disclosure_gate

    return disclosure_gate(vocab_size)


def _grounding_gate(vocab_size):
    from gate.grounding import grounding_gate

    return grounding_gate(vocab_size)


def _evidence_gate(vocab_size):
    from gate.evidence import evidence_gate

    return evidence_gate(vocab_size)


# Part-2 gates in chain order (after phrases and structure): a forced token of an earlier gate wins.
_PART2_GATES = {"authority": _authority_gate, "escalation": _escalation_gate, "disclosure": _disclosure_gate,
                "grounding": _grounding_gate, "evidence": _evidence_gate}


@dataclasses.dataclass(frozen=True, eq=False)
class CompiledPolicy:
    """A policy compiled for one tokenizer.

    Attributes:
      policy: the effective `Policy`.
      gate: the `Gate` (a chain of the phrase and structure gates that have rules, or `null_gate`).
      arrays: the gate's policy pytree: a tuple with one compiled entry per chained gate (empty for the null
        gate). Pass it into the compiled loop as an argument.
      kinds: which gates, in chain order ("phrases", "structure").
      rules: rule id -> RuleInfo.
      policy_hash: `policy.hash`.
      normalization: the policy's `gate.normalize.Normalization` (what phrases are matched under).
      tokenizer_fingerprint: `tokenizer_fingerprint(tokenizer)`.
      vocab_size: the logits width the gates were built for (the tokenizer's vocabulary unless padded).
      eos_id: the tokenizer's end-of-sequence id.
    """

    policy: Policy
    gate: Gate
    arrays: tuple
    kinds: tuple[str, ...]
    rules: Mapping[int, RuleInfo]
    policy_hash: str
    normalization: Normalization
    tokenizer_fingerprint: str
    vocab_size: int
    eos_id: int

    def rule_text(self, rule: int) -> str | None:
        info = self.rules.get(int(rule))
        return None if info is None else info.text

    def save(self, path: str | os.PathLike) -> None:
        """Writes `path/` (a directory): `arrays.npz` and `manifest.json`."""
        _save(self, os.fspath(path))

    @staticmethod
    def load(path: str | os.PathLike, tokenizer, *, cache: bool = True) -> CompiledPolicy:
        """`load_compiled`."""
        return load_compiled(path, tokenizer, cache=cache)


def _rules_table(policy: Policy) -> dict[int, RuleInfo]:
    rules = {}
    for i, p in enumerate(policy.phrases):
        rules[i] = RuleInfo(i, p.level, "phrase", p.phrase, p.action,
                            None if p.message is None else policy.messages[p.message])
    if policy.structure is not None:
        n = len(policy.phrases)
        rules[n] = RuleInfo(n, policy.structure.level, "structure", policy.structure.describe(), "constrain")
    ids = _part2_rule_ids(policy)
    doc = "document"
    for k, t in enumerate(policy.tools if "authority" in ids else ()):
        # These rules mask the tool's name where it would be chosen, and refuse a turn that requires the tool.
        rules[ids["authority"][k]] = RuleInfo(ids["authority"][k], doc, "authority",
                                              f"tool {t.name}: not granted to the principal (or forbidden)", "refuse",
                                              policy.messages["refusal"])
        rules[ids["quota"][k]] = RuleInfo(ids["quota"][k], doc, "quota", f"tool {t.name}: session quota spent",
                                          "refuse", policy.messages["refusal"])
    if "tool_call" in ids:
        rules[ids["tool_call"][0]] = RuleInfo(ids["tool_call"][0], doc, "tool_call",
                                              "tool call: no admissible call / refused at the action boundary",
                                              "refuse", policy.messages["refusal"])
    for r, e in zip(ids.get("escalation", ()), policy.escalation, strict=False):
        rules[r] = RuleInfo(r, doc, "escalation", e.describe(), "refuse" if e.refuse_topics else "tighten",
                            policy.messages["refusal"] if e.refuse_topics else None)
    for r, lb in zip(ids.get("disclosure", ()), policy.labels, strict=False):
        if r != NO_RULE:
            rules[r] = RuleInfo(r, doc, "disclosure", f"label {lb.name}: protected span (uncleared principal)",
                                lb.action, policy.messages[lb.message])
    if "grounding" in ids:
        rules[ids["grounding"][0]] = RuleInfo(ids["grounding"][0], doc, "grounding",
                                              "figures must occur in the evidence", "suppress")
    for r, (name, action, msg) in zip(ids.get("evidence", ()), (("downgrade", "downgrade", None),
                                                                 ("clarify", "clarify", "clarification"),
                                                                 ("refuse", "refuse", "refusal")), strict=False):
        rules[r] = RuleInfo(r, doc, "evidence", f"evidence budget: {name} threshold crossed", action,
                            None if msg is None else policy.messages[msg])
    return dict(sorted(rules.items()))


def _part2_kinds(policy: Policy) -> tuple[str, ...]:
    """The part-2 gates a policy needs, in chain order."""
    kinds = []
    if policy.tools and policy.principals:
        kinds.append("authority")
    if policy.escalation:
        kinds.append("escalation")
    if any(lb.action != "none" for lb in policy.labels):
        kinds.append("disclosure")
    if policy.grounding is not None and policy.grounding.figures:
        kinds.append("grounding")
    if policy.evidence is not None:
        kinds.append("evidence")
    return tuple(kinds)


def _part2_rule_ids(policy: Policy) -> dict[str, list[int]]:
    """Global rule ids of the part-2 rules, numbered after the phrases and the structure, in chain order."""
    n = len(policy.phrases) + (policy.structure is not None)
    ids: dict[str, list[int]] = {}

    def take(key, count):
        nonlocal n
        ids[key] = list(range(n, n + count))
        n += count

    kinds = _part2_kinds(policy)
    if "authority" in kinds:
        take("authority", len(policy.tools))
        take("quota", len(policy.tools))
        take("tool_call", 1)
    if "escalation" in kinds:
        take("escalation", len(policy.escalation))
    if "disclosure" in kinds:
        ids["disclosure"] = []
        for lb in policy.labels:
            ids["disclosure"].append(n if lb.action != "none" else NO_RULE)
            n += lb.action != "none"
    if "grounding" in kinds:
        take("grounding", 1)
    if "evidence" in kinds:
        take("evidence", 3)
    return ids


def _compile_part2(policy: Policy, tokenizer, V: int) -> tuple[list[str], list]:
    """Compiles the part-2 gates (kinds, arrays) for a tokenizer."""
    ids = _part2_rule_ids(policy)
    kinds, arrays = [], []
    for kind in _part2_kinds(policy):
        if kind == "authority":
            from gate.authority import compile_authority

            arrays.append(compile_authority(policy, tokenizer, vocab_size=V, tool_rules=ids["authority"],
                                            quota_rules=ids["quota"], call_rule=ids["tool_call"][0]))
        elif kind == "escalation":
            from gate.escalation import compile_escalation

            arrays.append(compile_escalation(policy, tokenizer, vocab_size=V, rules=ids["escalation"]))
        elif kind == "disclosure":
            from gate.disclosure import compile_disclosure

            arrays.append(compile_disclosure(policy, tokenizer, vocab_size=V, label_rules=ids["disclosure"]))
        elif kind == "grounding":
            from gate.grounding import compile_grounding

            arrays.append(compile_grounding(tokenizer, vocab_size=V, rule=ids["grounding"][0]))
        else:
            from gate.evidence import compile_evidence

            arrays.append(compile_evidence(policy.evidence, tokenizer, policy.messages, rules=ids["evidence"]))
        kinds.append(kind)
    return kinds, arrays


_CACHE: collections.OrderedDict[tuple[str, str, int], CompiledPolicy] = collections.OrderedDict()
_CACHE_SIZE = 32
_CACHE_LOCK = threading.Lock()


def compile_policy(policy: Policy, tokenizer, *, vocab_size: int | None = None, cache: bool = True) -> CompiledPolicy:
    """Compiles a policy for a tokenizer.

    Args:
      policy: a parsed (and possibly merged) policy.
      tokenizer: a `models.tokenizer.Tokenizer` (anything with token_bytes(), vocab_size, eos_id, special_ids and
        encode(text, parse_special=...)).
      vocab_size: the logits width when it exceeds the tokenizer's vocabulary (a padded lm head).
      cache: reuse (and remember) the result for the same (policy hash, tokenizer fingerprint, vocab_size).

    Returns:
      the `CompiledPolicy`; pass `.arrays` to `.gate`'s functions.

    Raises:
      PolicyError: a rule the gates cannot compile for this tokenizer, naming where the rule was written.
    """
    fp = tokenizer_fingerprint(tokenizer)
    V = tokenizer.vocab_size if vocab_size is None else int(vocab_size)
    if V < tokenizer.vocab_size:
        raise PolicyError(policy.source, None, "", f"vocab_size {V} is smaller than the tokenizer's "
                                                   f"({tokenizer.vocab_size})")
    key = (policy.hash, fp, V)
    if cache:
        with _CACHE_LOCK:
            hit = _CACHE.get(key)
            if hit is not None:
                _CACHE.move_to_end(key)
                return hit

    eos_id = int(tokenizer.eos_id)
    rules = _rules_table(policy)
    kinds, arrays = [], []
    if policy.phrases:
        from gate.phrases import PhraseError, PhraseRule, compile_phrases

        phrase_rules = [
            PhraseRule(phrase=p.phrase, action=Action[p.action.upper()], rule_id=i, message=rules[i].message)
            for i, p in enumerate(policy.phrases)
        ]
        try:
            arrays.append(compile_phrases(phrase_rules, tokenizer, policy.normalization, vocab_size=V))
        except PhraseError as e:
            raise _phrase_compile_error(policy, e) from e
        kinds.append("phrases")
    if policy.structure is not None:
        from gate.structure import StructureError, compile_json_schema, compile_regex

        s, rule = policy.structure, len(policy.phrases)
        try:
            compiled = (compile_regex(s.spec, tokenizer, rule=rule) if s.kind == "regex"
                        else compile_json_schema(s.spec, tokenizer, rule=rule))
        except StructureError as e:
            o = s.origin or Origin(policy.source, None, f"levels.{s.level}.structure.{s.kind}")
            raise PolicyError(o.source, o.line, o.path, f"cannot compile for this tokenizer: {e}") from e
        arrays.append(compiled)
        kinds.append("structure")
    try:
        more_kinds, more_arrays = _compile_part2(policy, tokenizer, V)
    except (ValueError, KeyError) as e:
        raise PolicyError(policy.source, None, "", f"cannot compile for this tokenizer: {e}") from e
    kinds += more_kinds
    arrays += more_arrays

    out = CompiledPolicy(
        policy=policy,
        gate=_gate(tuple(kinds), V, eos_id),
        arrays=tuple(arrays),
        kinds=tuple(kinds),
        rules=types.MappingProxyType(rules),
        policy_hash=policy.hash,
        normalization=policy.normalization,
        tokenizer_fingerprint=fp,
        vocab_size=V,
        eos_id=eos_id,
    )
    if cache:
        with _CACHE_LOCK:
            _CACHE[key] = out
            while len(_CACHE) > _CACHE_SIZE:
                _CACHE.popitem(last=False)
    return out


def _phrase_compile_error(policy: Policy, e: Exception) -> PolicyError:
    # The phrase compiler names the phrase: point at the rule that wrote it (the longest name found wins, so
    # that "bomb" does not claim an error about "bomb recipe").
    named = [p for p in policy.phrases if repr(p.phrase) in str(e)]
    if named:
        p = max(named, key=lambda q: len(q.phrase))
        o = p.origin or Origin(policy.source, None, f"levels.{p.level}.phrases")
        return PolicyError(o.source, o.line, o.path, f"cannot compile for this tokenizer: {e}")
    return PolicyError(policy.source, None, "", f"cannot compile the phrases for this tokenizer: {e}")


# --------------------------------------------------------------------------------------------------------------
# Saving and loading compiled policies: arrays.npz holds every array leaf; manifest.json holds the policy
# document, the rules, the fingerprint and a description of each compiled pytree (its class, its static fields
# as JSON, and which npz entry each array field is), so loading needs no pickle and no recompilation.

_MANIFEST_FORMAT = "aqjax-compiled-policy"
_MANIFEST_VERSION = 1


def _encode(obj, arrays: dict[str, np.ndarray]):
    if isinstance(obj, (jax.Array, np.ndarray)):
        name = f"a{len(arrays)}"
        a = np.asarray(obj)
        dtype = a.dtype.name
        if a.dtype.kind == "V" or dtype == "bfloat16":  # ml_dtypes: store the raw bits
            a = a.view(f"u{a.dtype.itemsize}")
        arrays[name] = a
        return {"array": name, "dtype": dtype}
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        cls = type(obj)
        if not cls.__module__.startswith("gate."):
            raise TypeError(f"cannot save a {cls.__module__}.{cls.__qualname__} (only gate.* types)")
        fields = {f.name: _encode(getattr(obj, f.name), arrays) for f in dataclasses.fields(obj)}
        return {"dataclass": f"{cls.__module__}:{cls.__qualname__}", "fields": fields}
    if isinstance(obj, tuple) and hasattr(obj, "_fields"):
        cls = type(obj)
        return {"namedtuple": f"{cls.__module__}:{cls.__qualname__}", "items": [_encode(v, arrays) for v in obj]}
    if isinstance(obj, (tuple, list)):
        return {"tuple" if isinstance(obj, tuple) else "list": [_encode(v, arrays) for v in obj]}
    if isinstance(obj, Mapping):
        return {"dict": {str(k): _encode(v, arrays) for k, v in obj.items()}}
    if isinstance(obj, np.generic):
        obj = obj.item()
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return {"value": obj}
    raise TypeError(f"cannot save a {type(obj).__name__}")


def _import_gate_type(name: str):
    module, _, qualname = name.partition(":")
    if not module.startswith("gate.") or not qualname:
        raise ValueError(f"refusing to load type {name!r} (only gate.* types)")
    import importlib

    obj = importlib.import_module(module)
    for part in qualname.split("."):
        obj = getattr(obj, part)
    return obj


def _decode(spec, arrays):
    if "array" in spec:
        a = arrays[spec["array"]]
        if spec["dtype"] != a.dtype.name:
            import ml_dtypes  # noqa: F401  (registers bfloat16 and friends with numpy)

            a = a.view(np.dtype(spec["dtype"]))
        return jnp.asarray(a)
    if "dataclass" in spec:
        cls = _import_gate_type(spec["dataclass"])
        return cls(**{k: _decode(v, arrays) for k, v in spec["fields"].items()})
    if "namedtuple" in spec:
        return _import_gate_type(spec["namedtuple"])(*[_decode(v, arrays) for v in spec["items"]])
    if "tuple" in spec:
        return tuple(_decode(v, arrays) for v in spec["tuple"])
    if "list" in spec:
        return [_decode(v, arrays) for v in spec["list"]]
    if "dict" in spec:
        return {k: _decode(v, arrays) for k, v in spec["dict"].items()}
    return spec["value"]


def _save(cp: CompiledPolicy, path: str) -> None:
    from gate.audit import state_hash

    os.makedirs(path, exist_ok=True)
    arrays: dict[str, np.ndarray] = {}
    tree = _encode(cp.arrays, arrays)
    manifest = {
        "format": _MANIFEST_FORMAT,
        "version": _MANIFEST_VERSION,
        "policy": cp.policy.to_dict(),
        "policy_hash": cp.policy_hash,
        "tokenizer_fingerprint": cp.tokenizer_fingerprint,
        "vocab_size": cp.vocab_size,
        "eos_id": cp.eos_id,
        "kinds": list(cp.kinds),
        "rules": [dataclasses.asdict(r) for r in cp.rules.values()],
        "tree": tree,
        "arrays_hash": state_hash(cp.arrays),
    }
    # Arrays first, manifest last: a directory with a manifest is complete.
    tmp = os.path.join(path, "arrays.npz.tmp")
    with open(tmp, "wb") as f:
        np.savez(f, **arrays)
    os.replace(tmp, os.path.join(path, "arrays.npz"))
    tmp = os.path.join(path, "manifest.json.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(manifest, f, indent=1, ensure_ascii=False)
    os.replace(tmp, os.path.join(path, "manifest.json"))


def load_compiled(path: str | os.PathLike, tokenizer, *, cache: bool = True) -> CompiledPolicy:
    """Loads a compiled policy written by `CompiledPolicy.save`, for `tokenizer`.

    Raises:
      PolicyError: the files are missing or damaged, or the policy was compiled for a different tokenizer.
    """
    from gate.audit import state_hash

    path = os.fspath(path)
    mfile = os.path.join(path, "manifest.json")
    try:
        with open(mfile, encoding="utf-8") as f:
            manifest = json.load(f)
        with np.load(os.path.join(path, "arrays.npz"), allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    except (OSError, ValueError) as e:
        raise PolicyError(path, None, "", f"cannot read a compiled policy: {e}") from None
    if manifest.get("format") != _MANIFEST_FORMAT or manifest.get("version") != _MANIFEST_VERSION:
        raise PolicyError(mfile, None, "", f"not a version-{_MANIFEST_VERSION} compiled policy")

    fp = tokenizer_fingerprint(tokenizer)
    if manifest["tokenizer_fingerprint"] != fp:
        raise PolicyError(
            mfile, None, "",
            f"compiled for another tokenizer (fingerprint {manifest['tokenizer_fingerprint'][:16]}..., vocabulary "
            f"{manifest['vocab_size']}); this tokenizer is {fp[:16]}... (vocabulary {len(tokenizer.token_bytes())}). "
            "Recompile the policy for it with compile_policy",
        )
    policy = Policy.from_dict(manifest["policy"], source=mfile)
    if policy.hash != manifest["policy_hash"]:
        raise PolicyError(mfile, None, "policy", "the policy document does not match policy_hash (edited?)")
    try:
        tree = _decode(manifest["tree"], arrays)
    except (KeyError, TypeError, ValueError, AttributeError, ImportError) as e:
        raise PolicyError(mfile, None, "tree", f"cannot rebuild the compiled arrays: {e}") from None
    if state_hash(tree) != manifest["arrays_hash"]:
        raise PolicyError(path, None, "", "arrays.npz does not match the manifest's arrays_hash (damaged or edited)")

    kinds = tuple(manifest["kinds"])
    rules = {r["id"]: RuleInfo(**r) for r in manifest["rules"]}
    out = CompiledPolicy(
        policy=policy,
        gate=_gate(kinds, int(manifest["vocab_size"]), int(manifest["eos_id"])),
        arrays=tuple(tree),
        kinds=kinds,
        rules=types.MappingProxyType(rules),
        policy_hash=policy.hash,
        normalization=policy.normalization,
        tokenizer_fingerprint=fp,
        vocab_size=int(manifest["vocab_size"]),
        eos_id=int(manifest["eos_id"]),
    )
    if cache:
        with _CACHE_LOCK:
            _CACHE.setdefault((policy.hash, fp, out.vocab_size), out)
    return out


