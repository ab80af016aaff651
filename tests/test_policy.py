"""The policy format: parse errors with file/line/key path, the tightening-only hierarchy, hashing, and the
compiler on two different tokenizers (SmolLM2's and a byte-level BPE trained here)."""

import json
import pathlib
import textwrap

import chex
import jax
import jax.numpy as jnp
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gate import policy as P
from gate.core import NO_RULE
from gate.policy import (
    ACTION_STRENGTH,
    LEVELS,
    Policy,
    PolicyError,
    compile_policy,
    load_compiled,
    load_policy,
    parse_policy,
    tokenizer_fingerprint,
)

ROOT = pathlib.Path(__file__).resolve().parents[1]
DEFAULT = ROOT / "policies" / "default.yaml"
EXAMPLE_JSON = ROOT / "policies" / "example_json.yaml"


def doc(text: str) -> str:
    return textwrap.dedent(text).lstrip("\n")


# ---------------------------------------------------------------------------------------------- parse errors

# (id, YAML, line, key path, part of the reason)
BROKEN = [
    ("unknown-action", """
        aqjax_policy: 1
        name: t
        levels:
          deployment:
            phrases:
              - {phrase: a b, action: suppress}
              - {phrase: c d, action: refuse}
              - {phrase: e f, action: supress}
        """, 8, "levels.deployment.phrases[2].action",
     "unknown action 'supress' (expected one of suppress, substitute, refuse)"),
    ("unknown-top-key", """
        aqjax_policy: 1
        name: t
        level: {}
        """, 3, "level", "unknown key 'level'"),
    ("unknown-level", """
        aqjax_policy: 1
        name: t
        levels:
          global: {}
        """, 4, "levels.global", "unknown key 'global' (expected one of deployment, agent, session, turn)"),
    ("allow-key", """
        aqjax_policy: 1
        name: t
        levels:
          session:
            allow: [secret]
        """, 5, "levels.session.allow", "nothing can allow or remove a rule"),
    ("unset-in-phrase", """
        aqjax_policy: 1
        name: t
        levels:
          turn:
            phrases:
              - {phrase: x, action: suppress, unset: true}
        """, 6, "levels.turn.phrases[0].unset", "unknown key 'unset'"),
    ("phrases-not-list", """
        aqjax_policy: 1
        name: t
        levels:
          deployment:
            phrases: {phrase: x, action: suppress}
        """, 5, "levels.deployment.phrases", "expected a list, got a mapping"),
    ("phrase-int", """
        aqjax_policy: 1
        name: t
        levels:
          deployment:
            phrases:
              - {phrase: 123, action: suppress}
        """, 6, "levels.deployment.phrases[0].phrase", "expected a string, got the integer 123 (quote it)"),
    ("flag-not-bool", """
        aqjax_policy: 1
        name: t
        normalization:
          casefold: maybe
        """, 4, "normalization.casefold", "expected true or false, got a string"),
    ("unknown-flag", """
        aqjax_policy: 1
        name: t
        normalization: {casefold: true, leetspeak: true}
        """, 3, "normalization.leetspeak", "unknown key 'leetspeak'"),
    ("duplicate-top-key", """
        aqjax_policy: 1
        name: t
        name: u
        """, 3, "name", "duplicate key (first at line 2)"),
    ("duplicate-phrase-key", """
        aqjax_policy: 1
        name: t
        levels:
          deployment:
            phrases:
              - phrase: a
                action: refuse
                phrase: b
        """, 8, "levels.deployment.phrases[0].phrase", "duplicate key (first at line 6)"),
    ("unknown-message", """
        aqjax_policy: 1
        name: t
        levels:
          deployment:
            phrases:
              - {phrase: x, action: substitute, message: redactoin}
        """, 6, "levels.deployment.phrases[0].message", "unknown message 'redactoin'"),
    ("message-on-suppress", """
        aqjax_policy: 1
        name: t
        levels:
          deployment:
            phrases:
              - {phrase: x, action: suppress, message: redaction}
        """, 6, "levels.deployment.phrases[0].message", "action 'suppress' emits no message"),
    ("version-2", """
        aqjax_policy: 2
        name: t
        """, 1, "aqjax_policy", "unsupported version 2 (this aqjax reads version 1)"),
    ("version-string", """
        name: t
        aqjax_policy: "1"
        """, 2, "aqjax_policy", "unsupported version"),
    ("missing-version", """
        name: t
        """, 1, "aqjax_policy", "required key is missing"),
    ("missing-action", """
        aqjax_policy: 1
        name: t
        levels:
          agent:
            phrases:
              - {phrase: x}
        """, 6, "levels.agent.phrases[0].action", "required key is missing"),
    ("structure-two-kinds", """
        aqjax_policy: 1
        name: t
        levels:
          turn:
            structure: {regex: "a+", json_schema: {type: string}}
        """, 5, "levels.turn.structure", "give exactly one of json_schema, regex"),
    ("structure-replaced", """
        aqjax_policy: 1
        name: t
        levels:
          agent:
            structure: {regex: "(yes|no)"}
          turn:
            structure:
              regex: "[0-9]+"
        """, 8, "levels.turn.structure", "cannot intersect two automata yet"),
    ("loosening", """
        aqjax_policy: 1
        name: t
        levels:
          deployment:
            phrases:
              - {phrase: launch code, action: refuse}
          session:
            phrases:
              - {phrase: "Launch  Code", action: suppress}
        """, 9, "levels.session.phrases[0].action", "'suppress' is weaker than 'refuse'"),
    ("preempting", """
        aqjax_policy: 1
        name: t
        levels:
          deployment:
            phrases:
              - {phrase: bomb recipe, action: refuse}
          agent:
            phrases:
              - {phrase: bomb, action: substitute}
        """, 9, "levels.agent.phrases[0].action", "would be matched first and preempt it"),
    ("changed-message", """
        aqjax_policy: 1
        name: t
        messages: {other: "[x]"}
        levels:
          deployment:
            phrases:
              - {phrase: a b, action: substitute}
          turn:
            phrases:
              - {phrase: a b, action: substitute, message: other}
        """, 10, "levels.turn.phrases[0].message", "already gives it 'redaction'"),
    ("reworded-message", """
        aqjax_policy: 1
        name: t
        levels:
          agent:
            messages:
              refusal: "Sure, here you go:"
        """, 6, "levels.agent.messages.refusal", "never reword one"),
    ("bad-message-name", """
        aqjax_policy: 1
        name: t
        messages:
          "not a name": "x"
        """, 4, "messages.not a name", "message names must be identifiers"),
    ("schema-keyword", """
        aqjax_policy: 1
        name: t
        levels:
          turn:
            structure:
              json_schema:
                type: object
                properties:
                  a:
                    type: string
                    pattern: "[a-z]+"
        """, 11, "levels.turn.structure.json_schema.properties.a.pattern", "unsupported keyword 'pattern'"),
    ("schema-not-json", """
        aqjax_policy: 1
        name: t
        levels:
          turn:
            structure:
              json_schema: {type: object, default: 2024-01-01}
        """, 6, "levels.turn.structure.json_schema.default", "is not a JSON value"),
    ("empty-after-normalization", """
        aqjax_policy: 1
        name: t
        levels:
          deployment:
            phrases:
              - {phrase: "...", action: suppress}
        """, 6, "levels.deployment.phrases[0].phrase", "empty once normalized"),
    ("listed-twice", """
        aqjax_policy: 1
        name: t
        levels:
          deployment:
            phrases:
              - {phrase: secret, action: suppress}
              - {phrase: SECRET, action: refuse}
        """, 7, "levels.deployment.phrases[1]", "listed twice at this level (also policies/x.yaml:6"),
    ("merge-key", """
        aqjax_policy: 1
        name: t
        base: &b {phrase: x, action: refuse}
        """, 3, "base", "unknown key 'base'"),
    ("yaml-merge", """
        aqjax_policy: 1
        name: t
        levels:
          deployment:
            phrases:
              - &p {phrase: x, action: refuse}
              - {<<: *p, phrase: y}
        """, 7, "levels.deployment.phrases[1]", "merge keys (<<) are not supported"),
    ("empty-name", """
        aqjax_policy: 1
        name: "  "
        """, 2, "name", "got an empty string"),
]


@pytest.mark.parametrize("text,line,path,reason", [b[1:] for b in BROKEN], ids=[b[0] for b in BROKEN])
def test_errors_name_file_line_and_key_path(text, line, path, reason):
    with pytest.raises(PolicyError) as ei:
        parse_policy(doc(text), source="policies/x.yaml")
    msg = str(ei.value)
    assert msg.startswith(f"policies/x.yaml:{line}: {path}: "), msg
    assert reason in msg, msg
    assert (ei.value.line, ei.value.path) == (line, path)


def test_error_names_the_file_it_was_loaded_from(tmp_path):
    f = tmp_path / "broken.yaml"
    f.write_text(doc(BROKEN[0][1]))
    with pytest.raises(PolicyError, match=rf"^{f}:8: levels\.deployment\.phrases\[2\]\.action: unknown action"):
        load_policy(f)


def test_yaml_syntax_and_empty_documents():
    with pytest.raises(PolicyError, match=r"^p\.yaml:3: not valid YAML"):
        parse_policy("aqjax_policy: 1\nname: t\n  bad: indent\n", source="p.yaml")
    with pytest.raises(PolicyError, match=r"^p\.yaml: the policy is empty"):
        parse_policy("# nothing\n", source="p.yaml")
    with pytest.raises(PolicyError, match=r"^p\.yaml:1: expected a mapping, got a list"):
        parse_policy("- a\n- b\n", source="p.yaml")


def test_dict_documents_have_key_paths_but_no_lines():
    with pytest.raises(PolicyError) as ei:
        Policy.from_dict({"aqjax_policy": 1, "name": "t",
                          "levels": {"turn": {"phrases": [{"phrase": "x", "action": "allow"}]}}})
    assert str(ei.value).startswith("<dict>: levels.turn.phrases[0].action: unknown action 'allow'")
    assert ei.value.line is None


# ---------------------------------------------------------------------------------------------- documents


def test_shipped_policies_parse():
    p = load_policy(DEFAULT)
    assert p.name == "default" and p.levels == ("deployment",)
    assert {e.action for e in p.phrases} == set(ACTION_STRENGTH)
    assert p.structure is None
    q = load_policy(EXAMPLE_JSON)
    assert q.structure is not None and q.structure.kind == "json_schema" and q.structure.level == "turn"
    assert q.structure.spec["required"] == ["answer", "verdict"]


def test_schema_file_matches_the_parser():
    schema = json.loads((ROOT / "gate" / "policy_schema.json").read_text())
    assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    assert set(schema["properties"]) == set(P._TOP_KEYS)
    assert set(schema["required"]) == {"aqjax_policy", "name"}
    assert set(schema["properties"]["normalization"]["properties"]) == set(P.NORMALIZATION_FLAGS)
    assert set(schema["properties"]["levels"]["properties"]) == set(LEVELS)
    defs = schema["$defs"]
    assert set(defs["level"]["properties"]) == set(P._LEVEL_KEYS)
    assert set(defs["phrase"]["properties"]) == set(P._PHRASE_KEYS)
    assert defs["phrase"]["properties"]["action"]["enum"] == list(ACTION_STRENGTH)
    assert {next(iter(alt["properties"])) for alt in defs["structure"]["oneOf"]} == set(P.STRUCTURE_KINDS)


def test_hash_ignores_key_order_whitespace_comments_and_spelled_out_defaults():
    a = parse_policy(doc("""
        aqjax_policy: 1
        name: h
        levels:
          deployment:
            phrases:
              - {phrase: secret password, action: suppress}
              - {phrase: launch code, action: substitute}
          turn:
            structure: {json_schema: {type: object, properties: {a: {type: string}}, required: [a]}}
        """))
    b = parse_policy(doc("""
        # the same policy, written differently
        levels:
          turn:
            structure:
              json_schema:
                required: [a]
                properties:
                  a:   {type: string}
                type: object
          deployment:
            phrases:
              - action: suppress
                phrase: secret password
              - message: redaction        # the default, spelled out
                action: substitute
                phrase: launch code
        normalization: {lookalikes: true, casefold: true}
        messages: {redaction: "[REDACTED]"}
        name: h
        aqjax_policy: 1
        """))
    assert a == b and a.hash == b.hash
    assert Policy.from_dict(json.loads(json.dumps(a.to_dict()))).hash == a.hash
    # A change of meaning changes the hash.
    assert parse_policy(doc("""
        aqjax_policy: 1
        name: h
        normalization: {lookalikes: false}
        """)).hash != parse_policy("aqjax_policy: 1\nname: h\n").hash
    c = a.merge_child("session", {"phrases": [{"phrase": "bomb recipe", "action": "refuse"}]})
    assert c.hash != a.hash and Policy.from_dict(c.to_dict()) == c


# ---------------------------------------------------------------------------------------------- merging


@pytest.fixture(scope="module")
def base() -> Policy:
    return load_policy(DEFAULT)


def by_key(policy: Policy) -> dict:
    return {policy.phrase_key(p.phrase): p for p in policy.phrases}


def test_merge_stronger_action_replaces_the_rule(base):
    child = base.merge_child("agent", {"phrases": [{"phrase": "Secret  PASSWORD", "action": "refuse"}]})
    rule = by_key(child)[base.phrase_key("secret password")]
    assert (rule.phrase, rule.action, rule.level, rule.message) == ("Secret  PASSWORD", "refuse", "agent", "refusal")
    assert len(child.phrases) == len(base.phrases)
    assert child.levels == ("deployment", "agent")


def test_merge_equal_action_is_kept_once(base):
    child = base.merge_child("session", {"phrases": [{"phrase": "bomb recipe", "action": "refuse"}]})
    assert child.phrases == base.phrases


def test_merge_weaker_action_is_loosening(base):
    # Lookalikes and separators make this the same phrase as the deployment's "launch code".
    with pytest.raises(PolicyError) as ei:
        base.merge_child("turn", "phrases:\n  - {phrase: 'l4unch-c0de', action: suppress}\n", source="request")
    msg = str(ei.value)
    assert msg.startswith("request:2: levels.turn.phrases[0].action: loosens the rule for 'launch code'")
    assert f"{DEFAULT}:" in msg  # names where the parent's rule was written


def test_merge_may_not_preempt_but_a_dead_rule_is_allowed(base):
    with pytest.raises(PolicyError, match="occurs inside 'nerve agent synthesis'"):
        base.merge_child("session", {"phrases": [{"phrase": "nerve agent", "action": "suppress"}]})
    # The other way round the parent's rule fires first: the child's rule can never fire, but nothing loosens.
    child = base.merge_child("session", {"phrases": [{"phrase": "the secret password list", "action": "refuse"}]})
    assert len(child.phrases) == len(base.phrases) + 1


def test_structure_is_set_at_most_once(base):
    s = {"structure": {"regex": "(yes|no)"}}
    one = base.merge_child("agent", s)
    assert one.structure.level == "agent"
    assert one.merge_child("turn", s).structure == one.structure  # the identical constraint: a no-op
    with pytest.raises(PolicyError, match=r"levels\.turn\.structure: a structure constraint is already set at level "
                                          r"'agent'.*cannot intersect two automata yet"):
        one.merge_child("turn", {"structure": {"regex": "(yes|no|maybe)"}})


def test_messages_can_be_added_not_reworded(base):
    child = base.merge_child("agent", {"messages": {"billing": "[withheld]"},
                                       "phrases": [{"phrase": "account number", "action": "substitute",
                                                    "message": "billing"}]})
    assert child.messages["billing"] == "[withheld]"
    assert Policy.from_dict(child.to_dict()) == child
    with pytest.raises(PolicyError, match=r"levels\.session\.messages\.billing: message 'billing' is already set "
                                          r"at level 'agent'"):
        child.merge_child("session", {"messages": {"billing": "sure: 1234"}})
    with pytest.raises(PolicyError, match="unknown message 'billing'"):
        base.merge_child("agent", {"phrases": [{"phrase": "iban", "action": "substitute", "message": "billing"}]})


def test_merge_rejects_unknown_levels_and_allow_keys(base):
    with pytest.raises(PolicyError, match="unknown level 'global'"):
        base.merge_child("global", {})
    with pytest.raises(PolicyError, match=r"levels\.turn\.remove: unknown key 'remove'.*can only tighten"):
        base.merge_child("turn", {"remove": ["secret password"]})
    assert base.merge_child("turn", None).levels == ("deployment", "turn")


def test_merge_above_a_level_the_document_already_has():
    doc_ = load_policy(EXAMPLE_JSON)  # deployment + turn
    child = doc_.merge_child("agent", {"phrases": [{"phrase": "internal ticket", "action": "substitute"}]})
    assert child.levels == ("deployment", "agent", "turn")
    assert [p.level for p in child.phrases] == ["deployment", "deployment", "agent"]
    assert Policy.from_dict(child.to_dict()) == child
    # A new rule above an existing lower-level rule for the same phrase: the stronger one wins.
    low = doc_.merge_child("turn", {"phrases": [{"phrase": "wire transfer", "action": "suppress"}]})
    high = low.merge_child("agent", {"phrases": [{"phrase": "Wire Transfer", "action": "refuse"}]})
    assert [(p.phrase, p.level) for p in high.phrases if "ire" in p.phrase] == [("Wire Transfer", "agent")]
    # An equal one: kept once, by the highest level that says it.
    same = low.merge_child("agent", {"phrases": [{"phrase": "wire transfer", "action": "suppress"}]})
    assert [(p.action, p.level) for p in same.phrases if "ire" in p.phrase] == [("suppress", "agent")]


# Phrases chosen so that keys collide under normalization ("a b" ~ "A-B" ~ "ab") and contain each other.
_WORDS = ["ab", "A-B", "a b", "abc", "b", "bc", "x y", "XY", "xyz", "q"]
_rule = st.fixed_dictionaries({"phrase": st.sampled_from(_WORDS), "action": st.sampled_from(list(ACTION_STRENGTH))})
_fragment = st.fixed_dictionaries({}, optional={"phrases": st.lists(_rule, max_size=4),
                                                "structure": st.sampled_from([{"regex": "a+"}, {"regex": "b+"}])})


@settings(max_examples=300, deadline=None)
@given(parent_levels=st.dictionaries(st.sampled_from(LEVELS), _fragment, max_size=3),
       children=st.lists(st.tuples(st.sampled_from(LEVELS), _fragment), min_size=1, max_size=3))
def test_merging_never_loosens(parent_levels, children):
    try:
        policy = Policy.from_dict({"aqjax_policy": 1, "name": "h", "levels": parent_levels})
    except PolicyError:
        return  # an inconsistent random parent (e.g. the same phrase twice at one level)
    for level, fragment in children:
        try:
            child = policy.merge_child(level, fragment)
        except PolicyError:
            continue
        old, new = by_key(policy), by_key(child)
        for key, rule in old.items():
            # Every parent rule is still there, with an action at least as strong ...
            assert key in new and ACTION_STRENGTH[new[key].action] >= ACTION_STRENGTH[rule.action]
            # ... and no new, weaker rule would be matched before it.
            for k2, r2 in new.items():
                if k2 != key and k2 in key and k2 not in old:
                    assert ACTION_STRENGTH[r2.action] >= ACTION_STRENGTH[rule.action]
        if policy.structure is not None:
            assert child.structure is not None and child.structure.spec == policy.structure.spec
        assert Policy.from_dict(child.to_dict()) == child  # the effective policy is a valid document
        policy = child


# ---------------------------------------------------------------------------------------------- compiling


@pytest.fixture(params=["smollm2", "bpe"])
def tokenizer(request):
    if request.param == "smollm2":
        return request.getfixturevalue("smollm2").tokenizer
    return request.getfixturevalue("bpe")


def run(cp, tokenizer, text: str):
    """The gate state after emitting every token of `text` but the last, and that last token."""
    ids = tokenizer.encode(text)
    state = cp.gate.init(cp.arrays, 1)
    for t in ids[:-1]:
        t = jnp.array([t])
        state = cp.gate.advance(cp.arrays, state, t, jnp.array([True]), t)  # seen = t: no gate rewrote it
    return state, ids[-1]


def test_the_same_policy_compiles_for_either_tokenizer(tokenizer):
    cp = compile_policy(load_policy(EXAMPLE_JSON), tokenizer)
    assert cp.kinds == ("phrases", "structure") and len(cp.arrays) == 2
    assert cp.vocab_size == tokenizer.vocab_size and cp.eos_id == tokenizer.eos_id
    assert cp.tokenizer_fingerprint == tokenizer_fingerprint(tokenizer)
    assert [(r.id, r.kind, r.level, r.action) for r in cp.rules.values()] == [
        (0, "phrase", "deployment", "suppress"), (1, "phrase", "deployment", "refuse"),
        (2, "structure", "turn", "constrain")]
    assert int(cp.arrays[1].rule) == 2  # the structure reports its global id

    # The structure: the answer must open with "{".
    V = cp.vocab_size
    state = cp.gate.init(cp.arrays, 1)
    d = jax.jit(cp.gate.evaluate)(cp.arrays, state, jnp.zeros((1, V)))
    assert bool(d.mask[0, tokenizer.encode("{")[0]]) and not bool(d.mask[0, tokenizer.encode("hello")[0]])


def test_phrase_rules_fire_with_global_ids(tokenizer):
    cp = compile_policy(load_policy(DEFAULT), tokenizer)
    V = cp.vocab_size
    # suppress: the token that would complete "secret password" is masked.
    state, last = run(cp, tokenizer, "the secret password")
    assert not bool(cp.gate.evaluate(cp.arrays, state, jnp.zeros((1, V))).mask[0, last])
    # substitute: the token completing "launch code" is replaced, and the rule is named by its global id.
    state, last = run(cp, tokenizer, "a launch code")
    out = cp.gate.check(cp.arrays, state, jnp.array([last]))
    assert int(out.rule[0]) != NO_RULE and int(out.token[0]) != last
    info = cp.rules[int(out.rule[0])]
    assert (info.text, info.action, info.message) == ("launch code", "substitute", "[REDACTED]")


def test_fingerprints_differ_and_compilation_is_cached(smollm2, bpe):
    assert tokenizer_fingerprint(smollm2.tokenizer) != tokenizer_fingerprint(bpe)
    policy = load_policy(DEFAULT)
    a, b = compile_policy(policy, bpe), compile_policy(load_policy(DEFAULT), bpe)
    assert a is b  # same (policy hash, fingerprint)
    assert compile_policy(policy, bpe, cache=False) is not a
    assert compile_policy(policy, smollm2.tokenizer).arrays[0].tok_chars.shape[0] != a.arrays[0].tok_chars.shape[0]
    # Policies of one shape share one Gate object, so the jitted loop is reused.
    other = policy.merge_child("turn", {"phrases": [{"phrase": "zebra crossing", "action": "suppress"}]})
    assert compile_policy(other, bpe).gate is a.gate


def test_no_rules_gives_the_null_gate(bpe):
    cp = compile_policy(parse_policy("aqjax_policy: 1\nname: empty\n"), bpe)
    assert cp.kinds == () and cp.arrays == () and cp.rules == {}
    state = cp.gate.init(cp.arrays, 2)
    d = jax.jit(cp.gate.evaluate)(cp.arrays, state, jnp.zeros((2, 7)))
    assert bool(d.mask.all()) and not bool(d.stop.any()) and d.mask.shape == (2, 7)
    out = cp.gate.check(cp.arrays, state, jnp.array([3, 4]))
    assert out.token.tolist() == [3, 4] and out.rule.tolist() == [NO_RULE, NO_RULE]
    assert cp.gate.advance(cp.arrays, state, out.token, jnp.array([True, True]), out.token) == state


def test_compile_errors_point_at_the_rule(bpe):
    policy = parse_policy(doc("""
        aqjax_policy: 1
        name: t
        levels:
          turn:
            structure: {regex: "(unclosed"}
        """), source="r.yaml")
    with pytest.raises(PolicyError, match=r"^r\.yaml:5: levels\.turn\.structure\.regex: cannot compile"):
        compile_policy(policy, bpe)


def test_save_load_round_trip(tmp_path, smollm2, bpe):
    cp = compile_policy(load_policy(EXAMPLE_JSON), bpe)
    cp.save(tmp_path / "c")
    assert sorted(p.name for p in (tmp_path / "c").iterdir()) == ["arrays.npz", "manifest.json"]
    back = load_compiled(tmp_path / "c", bpe, cache=False)
    chex.assert_trees_all_equal(back.arrays, cp.arrays)
    assert jax.tree.structure(back.arrays) == jax.tree.structure(cp.arrays)
    assert back.policy == cp.policy and back.policy_hash == cp.policy_hash
    assert dict(back.rules) == dict(cp.rules) and back.kinds == cp.kinds and back.gate is cp.gate
    assert back.normalization == cp.normalization

    with pytest.raises(PolicyError, match="compiled for another tokenizer.*Recompile the policy"):
        load_compiled(tmp_path / "c", smollm2.tokenizer)

    manifest = tmp_path / "c" / "manifest.json"
    m = json.loads(manifest.read_text())
    m["policy"]["levels"]["deployment"]["phrases"][0]["phrase"] = "public password"
    manifest.write_text(json.dumps(m))
    with pytest.raises(PolicyError, match="does not match policy_hash"):
        load_compiled(tmp_path / "c", bpe)
