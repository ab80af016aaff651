"""The generation CLI, `python -m aqjax.generate`: arguments, errors, and speculative decoding through it."""

import pathlib

import pytest

from aqjax import generate

POLICY = pathlib.Path(__file__).resolve().parents[1] / "policies" / "default.yaml"


def _run(capsys, *argv):
    rc = generate.main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


@pytest.mark.parametrize("argv,message", [
    (["--draft-k", "0", "hi"], "--draft-k must be in [1, "),
    (["--draft-k", "99", "hi"], "--draft-k must be in [1, "),
    (["--draft", "/nowhere", "hi"], "--draft needs --speculative draft, feature or hybrid"),
    (["--max-tokens", "-1", "hi"], "--max-tokens must be >= 0"),
    (["--temperature", "-1", "hi"], "temperature"),
    (["--audit", "hi"], "--audit and --audit-log need --policy"),
    (["--compile-cache", "/tmp/x", "--no-compile-cache", "hi"], "exclude each other"),
])
def test_bad_arguments_are_rejected_before_loading(capsys, argv, message):
    rc, out, err = _run(capsys, "--model", "/no/such/model.gguf", *argv)
    assert rc == 2 and out == ""
    assert message in err


def test_unknown_drafter_is_an_argparse_error(capsys):
    with pytest.raises(SystemExit) as e:
        generate.main(["--speculative", "medusa", "hi"])
    assert e.value.code == 2
    assert "invalid choice" in capsys.readouterr().err


def test_missing_model_file_is_a_clear_error(capsys, tmp_path):
    rc, out, err = _run(capsys, "--model", str(tmp_path / "absent.gguf"), "hi")
    assert rc == 1 and out == ""
    assert "absent.gguf" in err


def test_missing_draft_model_fails_before_any_output(capsys, smollm2_gguf, tmp_path):
    rc, out, err = _run(capsys, "--model", str(smollm2_gguf), "--speculative", "draft", "--draft",
                        str(tmp_path / "nodraft"), "hi")
    assert rc == 1 and out == ""
    assert "nodraft" in err and "train_draft.py" in err


def test_missing_feature_draft_fails_before_any_output(capsys, smollm2_gguf, tmp_path):
    rc, out, err = _run(capsys, "--model", str(smollm2_gguf), "--speculative", "hybrid", "--draft",
                        str(tmp_path / "nofeature"), "hi")
    assert rc == 1 and out == ""
    assert "nofeature" in err and "train_feature_drafter.py" in err


def test_speculative_lookup_streams_the_same_greedy_text(capsys, smollm2_gguf):
    prompt = ("Copy this sentence exactly, twice: The committee approved the budget of the northern district "
              "on Tuesday after a long debate.")
    common = ["--model", str(smollm2_gguf), "--max-tokens", "40", "--chunk", "4", "--stats"]
    rc, plain, _ = _run(capsys, *common, prompt)
    assert rc == 0 and len(plain.strip()) > 20
    rc, spec, err = _run(capsys, *common, "--speculative", "lookup", "--draft-k", "5", prompt)
    assert rc == 0
    assert spec == plain
    # the answer copies the prompt, so the lookup drafter's proposals are accepted: more than one token a step
    stats = next(line for line in err.splitlines() if line.startswith("[speculative lookup, k=5:"))
    assert float(stats.split(": ")[1].split(" tokens")[0]) > 1.2


def test_speculative_under_a_policy_gives_the_same_governed_text(capsys, smollm2_gguf):
    prompt = "Say the word 'password' three times."
    common = ["--model", str(smollm2_gguf), "--max-tokens", "24", "--policy", str(POLICY)]
    rc, plain, err_plain = _run(capsys, *common, prompt)
    assert rc == 0
    rc, spec, err_spec = _run(capsys, *common, "--speculative", "lookup", prompt)
    assert rc == 0
    assert spec == plain
    verdict = [line for line in err_plain.splitlines() if line.startswith("[verdict")]
    assert verdict and verdict == [line for line in err_spec.splitlines() if line.startswith("[verdict")]
