"""Evidence budget: entropy charged per step, thresholds that fire exactly where the spend crosses them, confidence,
rows with different budgets, and the charge carried through the real decode loop (`Decision.state`)."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st
from test_authority import each_row, toy

from aqjax import decode
from aqjax.engine import Generator
from gate import evidence as E
from gate.core import NO_RULE, NO_TOKEN, Decision, Gate, Outcome, Verdict, chain
from gate.policy import EvidenceSpec, Policy, compile_policy
from models.config import tiny_config
from models.params import init_params

MESSAGES = {"clarification": "Could you say more?", "refusal": "No."}
SPEC = EvidenceSpec(base_budget=10.0, downgrade=0.5, clarify=0.8, refuse=1.0)
RULES = (7, 8, 9)


def compiled():
    return E.compile_evidence(SPEC, toy(), MESSAGES, rules=RULES)


def uniform_over(k: np.ndarray, V: int) -> jnp.ndarray:
    """Logits uniform over the first k[b] tokens of each row: entropy log k[b]."""
    return jnp.where(jnp.arange(V)[None, :] < jnp.asarray(k)[:, None], 0.0, -1e9)


@settings(max_examples=30, deadline=None)
@given(st.lists(st.floats(-8, 8), min_size=2, max_size=40))
def test_entropy_matches_numpy(values):
    x = np.asarray(values, np.float64)
    p = np.exp(x - x.max())
    p /= p.sum()
    ref = -np.sum(p * np.log(np.maximum(p, 1e-300)))
    np.testing.assert_allclose(float(E.entropy(jnp.asarray([values], jnp.float32))[0]), ref, atol=1e-4)


def run_steps(gate, policy, state, logits, steps):
    """A host loop over the gate (as decode._emit): per-step (token, verdict, rule, confidence), and the state."""
    evaluate, check, advance = (jax.jit(f) for f in gate[1:])
    B = logits.shape[0]
    done = np.zeros(B, bool)
    trace = []
    for _ in range(steps):
        d = evaluate(policy, state, logits)
        gs = state if d.state is None else d.state
        tok = jnp.where(d.forced != NO_TOKEN, d.forced, jnp.argmax(logits, -1)).astype(jnp.int32)
        o = check(policy, gs, tok)
        emitted = jnp.asarray(~done & ~np.asarray(d.stop))
        state = advance(policy, gs, o.token, emitted, tok)
        trace.append((np.where(done, -1, np.asarray(o.token)), np.maximum(np.asarray(d.verdict), np.asarray(o.verdict)),
                      np.asarray(jnp.where(o.rule >= 0, o.rule, d.rule)), np.asarray(d.confidence)))
        done = done | np.asarray(o.stop)
    return trace, state


def test_thresholds_fire_exactly_where_the_spend_crosses_them():
    V = toy().vocab_size
    gate = chain(E.evidence_gate(V))
    k = np.array([2, 3, 8, 2])
    budgets = [10.0, 10.0, 10.0, None]
    state = (E.begin_turn(budgets),)
    trace, state = run_steps(gate, (compiled(),), state, uniform_over(k, V), 40)
    clar = toy().encode(MESSAGES["clarification"], parse_special=False)
    for b in range(3):
        h = np.log(k[b])
        frac = h * np.arange(1, 41) / 10.0  # the spend after each step, as a fraction of the budget
        t_down = int(np.argmax(frac >= 0.5))
        t_clar = int(np.argmax(frac >= 0.8))
        verdicts = [int(v[b]) for _, v, _, _ in trace]
        assert verdicts[:t_down] == [Verdict.ADMIT] * t_down
        jumps_past_refuse = frac[t_clar] >= 1.0
        if t_down < t_clar:
            assert verdicts[t_down] == Verdict.DOWNGRADE and int(trace[t_down][2][b]) == RULES[0]
        want = Verdict.REFUSE if jumps_past_refuse else Verdict.CLARIFY
        assert verdicts[t_clar] == want and int(trace[t_clar][2][b]) == RULES[1 + jumps_past_refuse]
        # the message replaces the rest of the turn, token by token, then the row stops
        toks = [int(t[b]) for t, _, _, _ in trace if t[b] >= 0]
        msg = toy().encode(MESSAGES["refusal" if jumps_past_refuse else "clarification"], parse_special=False)
        assert toks[t_clar:] == msg and len(toks) == t_clar + len(msg)
        # confidence: 1 - spend / budget at every step (the loop keeps the minimum)
        np.testing.assert_allclose([float(c[b]) for _, _, _, c in trace[:t_clar]], np.clip(1 - frac[:t_clar], 0, 1),
                                   atol=1e-5)
        # the crossing step is charged too (its token is the message's first); message steps are not
        np.testing.assert_allclose(float(state[0].spent[b]), h * (t_clar + 1), rtol=1e-5)
    assert len(clar) > 1
    # the row without a budget is never charged
    assert all(int(v[3]) == Verdict.ADMIT for _, v, _, _ in trace) and float(state[0].spent[3]) == 0.0
    assert all(float(c[3]) == 1.0 for _, _, _, c in trace)


class EvidenceVariantsTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    def test_rows_alone_equal_rows_in_a_batch(self):
        V = toy().vocab_size
        pol = compiled()
        g = E.evidence_gate(V)
        state = E.begin_turn([3.0, 50.0, None, 1.0]).replace(spent=jnp.asarray([2.0, 1.0, 0.0, 0.0]))
        logits = uniform_over(np.array([4, 4, 4, 30]), V)
        d = self.variant(lambda s, x: g.evaluate(pol, s, x))(state, logits)
        assert np.asarray(d.verdict).tolist() == [Verdict.REFUSE, Verdict.ADMIT, Verdict.ADMIT, Verdict.REFUSE]
        assert int(d.forced[0]) == toy().encode("No.")[0] and int(d.forced[1]) == NO_TOKEN
        chex.assert_trees_all_close(d.state.charge, jnp.asarray([np.log(4)] * 2 + [0.0, np.log(30)]), atol=1e-5)
        chex.assert_trees_all_equal(jax.jit(each_row(lambda s, x: g.evaluate(pol, s, x)))(state, logits), d)
        tok = jnp.where(d.forced >= 0, d.forced, 1)
        o = self.variant(lambda s, t: g.check(pol, s, t))(d.state, tok)
        new = self.variant(lambda s, t, e: g.advance(pol, s, t, e))(d.state, o.token, jnp.array([1, 1, 1, 0], bool))
        chex.assert_trees_all_close(new.spent, jnp.asarray([2 + np.log(4), 1 + np.log(4), 0.0, 0.0]), atol=1e-5)
        assert np.asarray(new.msg_level).tolist() == [3, -1, -1, -1] and int(new.msg_pos[0]) == 1
        assert float(new.charge.sum()) == 0.0  # the per-step charge is consumed


def test_a_message_that_loses_the_forced_slot_is_not_garbled():
    V = toy().vocab_size
    x = toy().encode("X")[0]

    def forcing(step_to_force):
        # a gate that forces "X" at one step (and counts steps in its state)
        def init(policy, batch):
            return jnp.zeros((batch,), jnp.int32)

        def evaluate(policy, state, logits):
            B = state.shape[0]
            return Decision.admit_all(B, logits.shape[-1]).replace(
                forced=jnp.where(state == step_to_force, x, NO_TOKEN))

        def check(policy, state, token):
            return Outcome.unchanged(token)

        def advance(policy, state, token, emitted, seen=None):
            return jnp.where(emitted, state + 1, state)

        return Gate(init, evaluate, check, advance)

    spec = EvidenceSpec(base_budget=1.0, downgrade=0.5, clarify=0.8, refuse=100.0)
    pol = (None, E.compile_evidence(spec, toy(), MESSAGES, rules=RULES))
    gate = chain(forcing(0), E.evidence_gate(V))
    state = (jnp.zeros((1,), jnp.int32), E.begin_turn([1.0]))
    trace, _ = run_steps(gate, pol, state, uniform_over(np.array([8]), V), 20)
    toks = [int(t[0]) for t, _, _, _ in trace if t[0] >= 0]
    assert toy().decode(toks) == "X" + MESSAGES["clarification"]


def test_the_decode_loop_carries_the_charge():
    """Through aqjax.decode (tiny random model): spent = the entropies of the emitted steps, teacher-forced."""
    tok = toy()
    cfg = tiny_config(vocab_size=tok.vocab_size, max_seq_len=128, eos_id=0)
    gen = Generator(cfg, init_params(cfg, jax.random.key(0)), stop_ids=[])
    policy = Policy.from_dict({"aqjax_policy": 1, "name": "budget",
                               "evidence": {"base_budget": 1000.0, "thresholds": {"downgrade": 0.9, "clarify": 0.95,
                                                                                   "refuse": 1.0}}})
    cp = compile_policy(policy, tok)
    assert cp.kinds == ("evidence",)
    prompts = [[5, 6, 7, 8], [9, 10, 11]]
    state = (E.begin_turn([1000.0, None]),)
    results, final = gen.generate(prompts, max_new_tokens=8, gate=cp.gate, policy=cp.arrays, gate_state=state,
                                  return_state=True)
    spent = np.asarray(final.gate_state[0].spent)
    logits = decode.score(gen.params, jnp.asarray([prompts[0] + results[0].tokens]), cfg=cfg)[0]
    steps = logits[len(prompts[0]) - 1: len(prompts[0]) - 1 + len(results[0].tokens)]
    np.testing.assert_allclose(spent[0], float(jnp.sum(E.entropy(steps))), rtol=1e-4)
    assert spent[1] == 0.0
    np.testing.assert_allclose(results[0].confidence, 1 - spent[0] / 1000.0, rtol=1e-5)
    assert results[1].confidence == 1.0 and results[0].verdict == Verdict.ADMIT


def test_turn_budget():
    spec = EvidenceSpec(base_budget=16, per_evidence_token=2.0, max_budget=100)
    assert E.turn_budget(spec, 10) == 36 and E.turn_budget(spec, 10, role_budget=20, scale=0.5) == 28
    assert E.turn_budget(spec, 1000) == 100
    assert NO_RULE == -1


def test_evidence_section_errors():
    import pytest

    from gate.policy import PolicyError, parse_policy

    for body, path, reason in [
        ("evidence: {per_evidence_token: 1}", "evidence.base_budget", "required key is missing"),
        ("evidence: {base_budget: 0}", "evidence.base_budget", "out of range"),
        ("evidence:\n  base_budget: 5\n  thresholds: {downgrade: 0.9, clarify: 0.8}", "evidence.thresholds",
         "thresholds must increase"),
        ("evidence: {base_budget: 5, thresholds: {panic: 2}}", "evidence.thresholds.panic", "unknown key"),
    ]:
        with pytest.raises(PolicyError) as ei:
            parse_policy(f"aqjax_policy: 1\nname: t\n{body}\n", source="e.yaml")
        assert str(ei.value).startswith("e.yaml:") and f": {path}: " in str(ei.value) and reason in str(ei.value)
