"""Authority gate: the principal's authority compiled into the tool-call grammar, quotas in the carried state, the
action-boundary check. Random rollouts on a tiny vocabulary, rows with different principals in one batch.

The helpers here (`ToyTokenizer`, `rollout`) are shared by the other part-2 gate tests."""

import functools
import json
import pathlib
import string

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gate import authority as A
from gate.core import NO_RULE, NO_TOKEN, Verdict
from gate.policy import Policy, compile_policy, load_policy

ROOT = pathlib.Path(__file__).resolve().parents[1]
BANK = ROOT / "policies" / "bank.yaml"


class ToyTokenizer:
    """Greedy longest-match tokenizer over given pieces; id 0 is the special '<eos>'."""

    def __init__(self, pieces):
        self.pieces = ["<eos>"] + [p for p in dict.fromkeys(pieces) if p and p != "<eos>"]
        self.vocab_size = len(self.pieces)
        self.eos_id = 0
        self.special_ids = frozenset({0})
        self.stop_ids = (0,)
        self.chat_template = None
        self._ids = {p: i for i, p in enumerate(self.pieces)}
        self._longest = max(map(len, self.pieces))

    def token_bytes(self):
        return [b"" if i in self.special_ids else p.encode() for i, p in enumerate(self.pieces)]

    def encode(self, text, *, add_bos=False, parse_special=True):
        out, i = [], 0
        while i < len(text):
            for n in range(min(self._longest, len(text) - i), 0, -1):
                j = self._ids.get(text[i : i + n])
                if j is not None and (j not in self.special_ids or parse_special):
                    out.append(j)
                    i += n
                    break
            else:
                raise ValueError(f"cannot tokenize {text[i]!r}")
        return out

    def decode(self, ids, skip_special=False):
        return "".join("" if (i in self.special_ids or i < 0) else self.pieces[i] for i in ids)

    def apply_chat_template(self, messages, add_generation_prompt=True, **kw):
        text = "".join(f"<{m['role']}>{m['content']}\n" for m in messages)
        return text + ("<assistant>" if add_generation_prompt else "")


TOY_PIECES = list(string.ascii_letters + string.digits + " .,:;!?'\"{}[]<>/_-$%\n()=+*#@&|~^`\\") + [
    "<tool_call>", "</tool_call>", '{"name": "', '", "arguments": {', '"}}', "}}", "transfer", "get_balance",
    '"to": "', '"amount": ', "savings", "landlord", "checking", '"account": "', "12", "120", "00", "50", "4,2",
    "0.", " 1", ".\n", ", ", "the", " the", "ing", "tion", " secret", " pass", "word",
]


@functools.cache
def toy() -> ToyTokenizer:
    return ToyTokenizer(TOY_PIECES)


def rollout(gate, policy, state, key, *, steps: int, eos: int = 0, logits=None, vocab: int | None = None):
    """Samples uniformly among each row's admissible tokens (forced tokens first) for `steps` steps, as the decode
    loop would: stop before sampling (`stop`, or an empty mask), after a token that stops, and at EOS.

    Returns (tokens [steps, B] with -1 where nothing was emitted, final state, max verdict [B], last rule [B]).
    """
    V = toy().vocab_size if vocab is None else vocab
    return _rollout(gate, policy, state, key, steps=steps, eos=eos, logits=logits, vocab=V)


@functools.partial(jax.jit, static_argnames=("gate", "steps", "eos", "vocab"))
def _rollout(gate, policy, state, key, *, steps, eos, logits, vocab):
    B = jax.tree.leaves(state)[0].shape[0]
    base = jnp.zeros((B, vocab)) if logits is None else logits

    def body(carry, k):
        state, done, verdict, rule = carry
        d = gate.evaluate(policy, state, base)
        gs = state if d.state is None else d.state
        noise = jax.random.gumbel(k, (B, vocab))
        masked = jnp.where(d.mask, base + noise, -jnp.inf)
        has_forced = d.forced != NO_TOKEN
        empty = ~jnp.any(d.mask, axis=-1) & ~has_forced
        tok = jnp.where(has_forced, d.forced, jnp.argmax(masked, axis=-1)).astype(jnp.int32)
        o = gate.check(policy, gs, tok)
        pre = d.stop | empty
        emitted = ~done & ~pre & (o.token != eos)
        new = gate.advance(policy, gs, o.token, emitted, tok)
        now = jnp.where(pre, d.verdict, jnp.maximum(d.verdict, o.verdict))
        v = jnp.where(done, verdict, jnp.maximum(verdict, now))
        r = jnp.where(~done & (o.rule >= 0), o.rule, jnp.where(~done & (d.rule >= 0), d.rule, rule))
        done2 = done | pre | (o.token == eos) | (emitted & o.stop)
        return (new, done2, v, r), jnp.where(emitted, o.token, -1)

    init = (state, jnp.zeros((B,), bool), jnp.zeros((B,), jnp.int32), jnp.full((B,), -1, jnp.int32))
    (state, _, verdict, rule), toks = jax.lax.scan(body, init, jax.random.split(key, steps))
    return toks, state, verdict, rule


def each_row(fn):
    """fn applied to every row alone (a batch of one), stacked: batched rows must equal rows alone."""

    def one(*args):
        out = fn(*jax.tree.map(lambda a: a[None], args))
        return jax.tree.map(lambda a: a[0], out)

    return jax.vmap(one)


def texts(tok, toks) -> list[str]:
    toks = np.asarray(toks)
    return [tok.decode([int(t) for t in toks[:, b] if t >= 0]) for b in range(toks.shape[1])]


@functools.cache
def bank():
    return compile_policy(load_policy(BANK), toy())


def authority_of(cp):
    k = cp.kinds.index("authority")
    return cp.arrays[k], A.authority_gate(cp.vocab_size)


ALICE, BOB, CAROL = 0, 1, 2
TRANSFER, BALANCE = 1, 0  # tool indices in bank.yaml order (get_balance, transfer)


# ------------------------------------------------------------------------------------------ host side


def test_effective_authority_is_the_union_of_roles():
    policy = load_policy(BANK)
    assert list(A.effective_authority(policy, "alice")) == ["get_balance"]
    bob = A.effective_authority(policy, "bob")
    assert bob["transfer"].max_calls == 2 and bob["transfer"].max_total == 500
    assert bob["transfer"].limits["amount"] == {"minimum": 1, "maximum": 300}
    assert A.effective_authority(policy, "carol")["get_balance"].max_calls is None
    # a tool granted by two roles: the looser limits win
    doc = policy.to_dict()
    doc["roles"]["auditor"]["tools"] = {"get_balance": {}, "transfer": {"max_calls": 5, "max_total": 100,
                                                                        "arguments": {"to": {"enum": ["utility"]}}}}
    doc["principals"]["dave"] = {"roles": ["payments", "auditor"]}
    dave = A.effective_authority(Policy.from_dict(doc), "dave")["transfer"]
    assert (dave.max_calls, dave.max_total) == (5, 500)
    assert dave.limits["to"]["enum"] == ["savings", "landlord", "utility"]
    assert dave.limits["amount"]["maximum"] == 10000  # the auditor's grant does not narrow the amount


def test_parse_and_check_call():
    policy = load_policy(BANK)
    good = A.parse_call('<tool_call>{"name": "transfer", "arguments": {"to": "savings", "amount": 120}}</tool_call>')
    assert good == A.ToolCall("transfer", {"to": "savings", "amount": 120})
    assert A.check_call(policy, "bob", good) is None
    assert "not granted" in A.check_call(policy, "alice", good)
    assert "forbidden" in A.check_call(policy, "bob", good, forbidden=("transfer",))
    assert "required a call of" in A.check_call(policy, "bob", good, named="get_balance")
    big = A.ToolCall("transfer", {"to": "savings", "amount": 301})
    assert "outside [1, 300]" in A.check_call(policy, "bob", big)
    assert "not one of" in A.check_call(policy, "bob", A.ToolCall("transfer", {"to": "casino", "amount": 5}))
    assert "quota" in A.check_call(policy, "bob", good, calls_used={"transfer": 2})
    assert "would total 620 > 500" in A.check_call(policy, "bob", good, total_used={"transfer": 500})
    assert "unknown tool" in A.check_call(policy, "bob", A.ToolCall("rm_rf", {}))
    assert "do not match" in A.check_call(policy, "bob", A.ToolCall("transfer", {"to": "savings"}))
    for bad in ('{"name": "transfer", "arguments": {}}', "<tool_call>{oops}</tool_call>", "hello",
                '<tool_call>{"name": "x", "arguments": {}}</tool_call> and more'):
        assert A.parse_call(bad) is None
    assert "not one well-formed" in A.check_call(policy, "bob", None)


def test_call_regex_and_tool_prompt():
    rx = A.call_regex([("transfer", [("to", {"type": "string", "enum": ["a.b", "c"]}),
                                     ("n", {"type": "integer", "minimum": 1})])])
    assert rx.startswith("<tool_call>") and r"a\.b" in rx and "[1-9][0-9]*" in rx
    prompt = A.tool_prompt(load_policy(BANK), "alice")
    assert "get_balance" in prompt and "transfer" not in prompt.split("Tools:")[1]
    assert "amount: integer 1..300" in A.tool_prompt(load_policy(BANK), "bob")
    (spec,) = A.tool_specs(load_policy(BANK), "bob", only="transfer")
    assert spec["function"]["name"] == "transfer"
    assert spec["function"]["parameters"]["properties"]["amount"]["maximum"] == 300  # narrowed to the grant
    assert [s["function"]["name"] for s in A.tool_specs(load_policy(BANK), "alice")] == ["get_balance"]


def test_compiled_tables():
    cp = bank()
    pol, _ = authority_of(cp)
    assert cp.kinds[:3] == ("phrases", "authority", "escalation")
    assert np.asarray(pol.granted)[:3, :2].tolist() == [[True, False], [True, True], [True, False]]
    assert int(pol.max_calls[BOB, TRANSFER]) == 2 and int(pol.max_total[BOB, TRANSFER]) == 500
    assert int(pol.quota_min[BOB, TRANSFER]) == 1
    # two grammars (alice and carol share one authority set), distinct start states
    init = np.asarray(pol.initial)
    assert init[ALICE] == init[CAROL] != init[BOB]
    info = {r.kind for r in cp.rules.values()}
    assert {"authority", "quota", "tool_call", "escalation", "disclosure", "grounding", "evidence"} <= info


# ------------------------------------------------------------------------------------------ in the loop


def _start(pol, B, principals, mode, named=-1, forbidden=0, calls=None, spent=None):
    gate = A.authority_gate(toy().vocab_size)
    s = gate.init(pol, B)
    if calls is not None:
        s = s.replace(calls=jnp.asarray(calls, jnp.int32), spent=jnp.asarray(spent, jnp.int32))
    return A.begin_turn(pol, s, principal=principals, mode=mode, named=named, forbidden=forbidden)


def test_required_tool_not_granted_is_refused_at_once():
    pol, gate = authority_of(bank())
    s = _start(pol, 3, [ALICE, BOB, CAROL], A.REQUIRED, named=TRANSFER)
    toks, end, verdict, rule = rollout(gate, pol, s, jax.random.key(0), steps=80)
    out = texts(toy(), toks)
    assert out[ALICE] == out[CAROL] == "I can't do that."
    assert verdict.tolist() == [Verdict.REFUSE, Verdict.ADMIT, Verdict.REFUSE]
    rules = bank().rules
    assert rules[int(rule[ALICE])].text.startswith("tool transfer: not granted")
    call = A.parse_call(out[BOB])
    assert call.name == "transfer" and A.check_call(load_policy(BANK), "bob", call) is None
    assert np.asarray(end.boundary).tolist() == [False, True, False]
    assert np.asarray(end.msg_pos).tolist() == [-1, -1, -1]  # a finished refusal leaves the queue empty


class AuthorityVariantsTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    def test_rows_with_different_principals_and_quotas_in_one_batch(self):
        pol, gate = authority_of(bank())
        ev = self.variant(lambda s, x: gate.evaluate(pol, s, x))
        adv = self.variant(lambda s, t, e: gate.advance(pol, s, t, e))
        walk = jax.jit(lambda s, t: gate.advance(pol, s, t, jnp.ones((4,), bool)))
        # row 0: bob, fresh; row 1: bob, calls spent; row 2: bob with 450 of 500 spent; row 3: alice
        s = _start(pol, 4, [BOB, BOB, BOB, ALICE], A.REQUIRED, calls=[[0, 0], [0, 2], [0, 1], [0, 0]],
                   spent=[[0, 0], [0, 200], [0, 450], [0, 0]])
        logits = jnp.zeros((4, toy().vocab_size))
        d = ev(s, logits)
        assert np.asarray(d.verdict).tolist() == [Verdict.ADMIT] * 4
        # walk each row to the tool name: the name tokens left depend on the row's authority and quotas
        for t in toy().encode('<tool_call>{"name": "'):
            s = walk(s, jnp.full((4,), t))
        d = ev(s, logits)
        chex.assert_trees_all_equal(jax.jit(each_row(lambda s, x: gate.evaluate(pol, s, x)))(s, logits), d)
        tr, gb = toy().encode("transfer")[0], toy().encode("get_balance")[0]
        m = np.asarray(d.mask)
        assert m[:, tr].tolist() == [True, False, True, False]
        assert m[:, gb].tolist() == [True, True, True, True]
        # row 2 writes an amount: the ceiling is min(300, 500 - 450) = 50
        for t in toy().encode('transfer", "arguments": {"to": "savings", "amount": '):
            s = walk(s, jnp.full((4,), t))
        digits = {c: toy().encode(c)[0] for c in "0123456789"}
        pieces = {c: toy().encode(c)[0] for c in ("12", "50", "120")}
        m = np.asarray(ev(s, logits).mask)
        assert [c for c, t in digits.items() if m[2, t]] == list("123456789")  # no leading zero
        assert [c for c, t in pieces.items() if m[2, t]] == ["12", "50"]  # 120 > 50
        assert [c for c, t in pieces.items() if m[0, t]] == ["12", "50", "120"]  # <= 300
        five = jnp.full((4,), digits["5"])
        new = adv(s, five, jnp.array([True, True, True, False]))
        chex.assert_trees_all_equal(jax.jit(each_row(lambda s, t, e: gate.advance(pol, s, t, e)))(
            s, five, jnp.array([True, True, True, False])), new)
        chex.assert_trees_all_equal(jax.tree.map(lambda a: a[3], new), jax.tree.map(lambda a: a[3], s))
        m = np.asarray(ev(new, logits).mask)
        assert [c for c, t in digits.items() if m[2, t]] == ["0"]  # 50 fits, 51.. do not
        assert [c for c, t in digits.items() if m[0, t]] == list("0123456789")  # 50..59 <= 300


def test_forbidden_tool_and_auto_mode():
    pol, gate = authority_of(bank())
    # bob with transfer forbidden by escalation, REQUIRED transfer: refused with the authority rule
    s = _start(pol, 3, [BOB, BOB, BOB], [A.REQUIRED, A.AUTO, A.AUTO], named=[TRANSFER, -1, -1],
               forbidden=[1 << TRANSFER, 0, 0])
    toks, end, verdict, rule = rollout(gate, pol, s, jax.random.key(3), steps=80)
    out = texts(toy(), toks)
    assert out[0] == "I can't do that." and int(verdict[0]) == Verdict.REFUSE
    assert bank().rules[int(rule[0])].kind == "authority"
    # AUTO: either free text (the first token cannot start a call) or one complete call
    for b in (1, 2):
        if np.asarray(end.boundary)[b]:
            assert A.parse_call(out[b]) is not None
        else:
            assert not out[b].startswith("<")


def test_a_tool_masked_only_by_tool_choice_is_not_a_blocked_attempt():
    # The audit's block rule (what escalation's "blocked" counter counts) names authority that masked the model's
    # top token; a tool the caller's tool_choice ruled out is masked too, but is no attempt against authority.
    pol, gate = authority_of(bank())
    cp = bank()
    s = _start(pol, 2, [BOB, ALICE], [A.REQUIRED, A.AUTO], named=[TRANSFER, -1])
    walk = jax.jit(lambda s, t: gate.advance(pol, s, t, jnp.ones((2,), bool)))
    for t in toy().encode('<tool_call>{"name": "'):
        s = walk(s, jnp.full((2,), t))
    tr, gb = toy().encode("transfer")[0], toy().encode("get_balance")[0]
    V = toy().vocab_size
    # row 0 (bob, must call transfer) wants get_balance; row 1 (alice, may not transfer) wants transfer
    logits = jnp.zeros((2, V)).at[0, gb].set(50.0).at[1, tr].set(50.0)
    d = jax.jit(lambda s, x: gate.evaluate(pol, s, x))(s, logits)
    m = np.asarray(d.mask)
    assert not m[0, gb] and m[0, tr] and not m[1, tr] and m[1, gb]
    block = np.asarray(d.block_rule)
    assert int(block[0]) == NO_RULE
    assert cp.rules[int(block[1])].kind == "authority" and "transfer" in cp.rules[int(block[1])].text


SEQ = st.lists(st.tuples(st.sampled_from(["transfer", "get_balance", "any"]), st.integers(0, 2**31 - 1)),
               min_size=1, max_size=6)


@settings(max_examples=20, deadline=None)
@given(seq=SEQ)
def test_quotas_never_exceeded_and_unauthorized_tools_never_appear(seq):
    policy = load_policy(BANK)
    cp = bank()
    pol, gate = authority_of(cp)
    names = ["get_balance", "transfer"]
    principals = ["alice", "bob", "carol"]
    state = gate.init(pol, 3)
    ledger = {p: [] for p in principals}
    for choice, seed in seq:
        named = -1 if choice == "any" else names.index(choice)
        state = A.begin_turn(pol, state, principal=[0, 1, 2], mode=A.REQUIRED, named=named)
        toks, state, verdict, _ = rollout(gate, pol, state, jax.random.key(seed), steps=128)  # a call is up to ~90 single-character tokens
        for b, (p, text) in enumerate(zip(principals, texts(toy(), toks), strict=True)):
            used = {t: sum(1 for n, _ in ledger[p] if n == t) for t in names}
            total = {t: sum(a for n, a in ledger[p] if n == t) for t in names}
            if bool(state.boundary[b]):
                call = A.parse_call(text)
                # the gate never proposes what the action-boundary check would refuse
                assert A.check_call(policy, p, call, calls_used=used, total_used=total,
                                    named=None if named < 0 else names[named]) is None, (p, text)
                amount = call.arguments.get("amount", 0)
                ledger[p].append((call.name, amount))
                state = A.record_call(state, b, names.index(call.name), amount)
            else:
                assert int(verdict[b]) == Verdict.REFUSE and text == "I can't do that.", (p, text)
                # it refused only because no admissible call existed
                want = names if named < 0 else [names[named]]
                for t in want:
                    probe = A.ToolCall(t, {"account": "checking"} if t == "get_balance" else {"to": "savings",
                                                                                             "amount": 1})
                    assert A.check_call(policy, p, probe, calls_used=used, total_used=total) is not None
    assert all(n == "get_balance" for p in ("alice", "carol") for n, _ in ledger[p])
    transfers = [a for n, a in ledger["bob"] if n == "transfer"]
    assert len(transfers) <= 2 and sum(transfers) <= 500 and all(1 <= a <= 300 for a in transfers)
    assert np.asarray(state.calls)[1].tolist() == [sum(n == t for n, _ in ledger["bob"]) for t in names]


def test_total_quota_shrinks_the_ceiling_over_many_calls():
    doc = load_policy(BANK).to_dict()
    doc["roles"]["payments"]["tools"]["transfer"] = {"max_calls": 50, "max_total": 500}
    policy = Policy.from_dict(doc)
    cp = compile_policy(policy, toy())
    pol, gate = authority_of(cp)
    state = gate.init(pol, 3)
    total = np.zeros(3, int)
    for seed in range(12):
        state = A.begin_turn(pol, state, principal=BOB, mode=A.REQUIRED, named=TRANSFER)
        toks, state, verdict, _ = rollout(gate, pol, state, jax.random.key(seed), steps=128)
        for b, text in enumerate(texts(toy(), toks)):
            if bool(state.boundary[b]):
                amount = A.parse_call(text).arguments["amount"]
                total[b] += amount
                state = A.record_call(state, b, TRANSFER, amount)
            else:
                assert total[b] == 500 and int(verdict[b]) == Verdict.REFUSE  # refused only when nothing is left
    assert (total <= 500).all() and (np.asarray(state.spent)[:, TRANSFER] == total).all()


def test_defence_in_depth_boundary_refuses_what_the_arrays_would_allow():
    # a state whose quota counters were lost (e.g. restored from elsewhere) lets the grammar propose a call;
    # the host check against the session's ledger still refuses it
    policy = load_policy(BANK)
    pol, gate = authority_of(bank())
    s = _start(pol, 3, [BOB, BOB, BOB], A.REQUIRED, named=TRANSFER)
    toks, s, _, _ = rollout(gate, pol, s, jax.random.key(1), steps=80)
    call = A.parse_call(texts(toy(), toks)[0])
    assert bool(s.boundary[0]) and call is not None
    assert "quota" in A.check_call(policy, "bob", call, calls_used={"transfer": 2})


# ------------------------------------------------------------------------------------------ policy format

_HEAD = """\
aqjax_policy: 1
name: t
tools:
  transfer:
    parameters:
      type: object
      properties:
        to: {type: string, enum: [savings, landlord]}
        amount: {type: integer, minimum: 1, maximum: 1000}
      required: [to, amount]
    quota_argument: amount
classification:
  public: {}
  secret: {action: refuse}
"""

AUTHORITY_ERRORS = [
    ("roles:\n  r: {tools: {wire: {}}}\nprincipals:\n  p: {roles: [r]}\n", 16, "roles.r.tools.wire",
     "unknown tool 'wire'"),
    ("roles:\n  r: {tools: {transfer: {max_total: -1}}}\nprincipals:\n  p: {roles: [r]}\n", 16,
     "roles.r.tools.transfer.max_total", "out of range"),
    ("roles:\n  r:\n    tools:\n      transfer: {arguments: {amount: {maximum: 5000}}}\n"
     "principals:\n  p: {roles: [r]}\n",
     18, "roles.r.tools.transfer.arguments.amount.maximum", "a role can only narrow a tool's schema"),
    ("roles:\n  r:\n    tools:\n      transfer: {arguments: {to: {enum: [casino]}}}\nprincipals:\n  p: {roles: [r]}\n",
     18, "roles.r.tools.transfer.arguments.to.enum[0]", "unknown enum value 'casino'"),
    ("roles:\n  r: {clearances: [top]}\nprincipals:\n  p: {roles: [r]}\n", 16, "roles.r.clearances[0]",
     "unknown label 'top'"),
    ("roles:\n  r: {}\nprincipals:\n  p: {roles: [admin]}\n", 18, "principals.p.roles[0]", "unknown role 'admin'"),
    ("roles:\n  r: {tools: [transfer], allow: [x]}\nprincipals:\n  p: {roles: [r]}\n", 16, "roles.r.allow",
     "unknown key 'allow'"),
    ("roles:\n  r: {}\n", 16, "roles", "no principal holds one"),
]


@pytest.mark.parametrize("tail,line,path,reason", AUTHORITY_ERRORS)
def test_authority_errors_name_file_line_and_key_path(tail, line, path, reason):
    from gate.policy import PolicyError, parse_policy

    with pytest.raises(PolicyError) as ei:
        parse_policy(_HEAD + tail, source="bank.yaml")
    assert str(ei.value).startswith(f"bank.yaml:{line}: {path}: ") and reason in str(ei.value), str(ei.value)


@pytest.mark.parametrize("tool,path,reason", [
    ("{parameters: {type: object, properties: {x: {type: number}}}}", "tools.t.parameters.properties.x.type",
     "write amounts as integers"),
    ("{parameters: {type: object, properties: {x: {type: string}, y: {type: boolean}}, required: [x]}}",
     "tools.t.parameters.required", "optional arguments are not supported"),
    ("{parameters: {type: object, properties: {x: {type: string}}}, quota_argument: x}", "tools.t.quota_argument",
     "not an integer argument"),
    ("{parameters: {type: array}}", "tools.t.parameters.type", "must be of type 'object'"),
])
def test_tool_schema_errors(tool, path, reason):
    from gate.policy import PolicyError, parse_policy

    with pytest.raises(PolicyError) as ei:
        parse_policy(f"aqjax_policy: 1\nname: t\ntools:\n  t: {tool}\n", source="p.yaml")
    assert str(ei.value).startswith(f"p.yaml:4: {path}: ") and reason in str(ei.value), str(ei.value)


def test_part2_sections_round_trip_hash_and_schema():
    policy = load_policy(BANK)
    assert Policy.from_dict(policy.to_dict()) == policy and Policy.from_dict(policy.to_dict()).hash == policy.hash
    doc = policy.to_dict()
    doc["roles"]["payments"]["tools"]["transfer"]["max_calls"] = 3
    assert Policy.from_dict(doc).hash != policy.hash  # a quota is part of the policy's identity
    # levels cannot touch the sections, but merging keeps them
    child = policy.merge_child("session", {"phrases": [{"phrase": "wire transfer", "action": "refuse"}]})
    assert child.tools == policy.tools and child.principals == policy.principals and child.hash != policy.hash
    schema = json.loads((ROOT / "gate" / "policy_schema.json").read_text())
    for key in ("tools", "roles", "principals", "classification", "evidence", "grounding", "escalation"):
        assert key in schema["properties"]
    assert set(schema["$defs"]["grant"]["properties"]) == {"max_calls", "max_total", "arguments"}
    assert set(schema["$defs"]["escalation_rule"]["properties"]["tighten"]["properties"]) == {
        "budget_scale", "forbid_tools", "refuse_topics"}
