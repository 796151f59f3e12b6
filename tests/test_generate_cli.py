"""`ascend-v4 generate` (the main job) and its options, on presets and on a checkpoint with a tokenizer."""

from __future__ import annotations

import json

import pytest

import ascend_v4
from ascend_v4.checkpoint import save_model
from ascend_v4.cli import main


def _run(capsys, *argv):
    rc = main(["generate", *argv])
    out = capsys.readouterr()
    return rc, out.out, out.err


def _tokens(stdout: str) -> list[str]:
    line = next(l for l in stdout.splitlines() if l.startswith("output: "))
    return line[len("output: "):].split()


def test_default_run_states_random_weights_and_reports_speed(capsys):
    rc, out, _ = _run(capsys, "--max-new-tokens", "4")
    assert rc == 0
    assert "small preset with RANDOM weights" in out
    assert len(_tokens(out)) == 4
    last = out.strip().splitlines()[-1]
    assert "prefill" in last and "decode" in last and "tok/s" in last and "peak memory" in last


def test_prompt_ids_greedy_is_deterministic_and_matches_the_api(capsys):
    args = ("--model", "tiny", "--prompt-ids", "1,2,3,4,5", "--max-new-tokens", "6", "--greedy")
    _, out1, _ = _run(capsys, *args)
    _, out2, _ = _run(capsys, *args)
    assert _tokens(out1) == _tokens(out2)
    api = ascend_v4.generate(ascend_v4.load_model("tiny"), [[1, 2, 3, 4, 5]], 6)
    assert [int(t) for t in _tokens(out1)] == api.tokens[0]


def test_mtp_reports_acceptance_and_keeps_greedy_output(capsys):
    base = ("--model", "tiny", "--prompt-ids", "3 1 4 1 5", "--max-new-tokens", "6")
    _, plain, _ = _run(capsys, *base)
    _, mtp, _ = _run(capsys, *base, "--mtp")
    assert _tokens(plain) == _tokens(mtp)
    assert "MTP accepted" in mtp.strip().splitlines()[-1]


def test_sampling_with_seed(capsys):
    base = ("--model", "tiny", "--prompt-ids", "7,8", "--max-new-tokens", "8", "--temperature", "1.0", "--top-p", "0.9")
    _, a, _ = _run(capsys, *base, "--seed", "5")
    _, b, _ = _run(capsys, *base, "--seed", "5")
    assert _tokens(a) == _tokens(b)


@pytest.mark.parametrize("argv, message", [
    (("--model", "tiny", "--prompt", "hello"), "tokenizer"),
    (("--model", "tiny", "--prompt-ids", "1,x"), "integers"),
    (("--model", "tiny", "--prompt-ids", "99999"), "vocab_size"),
    (("--model", "tiny", "--temperature", "-1"), "temperature"),
    (("--model", "/no/such/model",), "neither a preset"),
])
def test_bad_options_give_a_clear_error(capsys, argv, message):
    rc, out, err = _run(capsys, *argv)
    assert rc == 2 and message in err


def test_checkpoint_with_tokenizer_and_text_prompt(tmp_path, capsys):
    tokenizers = pytest.importorskip("tokenizers")
    model = ascend_v4.load_model("tiny", seed=4)
    ckpt = tmp_path / "ckpt"
    save_model(model, ckpt)
    vocab = {f"w{i}": i for i in range(model.config.vocab_size)}
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="w2"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    tok.save(str(ckpt / "tokenizer.json"))
    rc, out, _ = _run(capsys, "--model", str(ckpt), "--prompt", "w5 w9 w12", "--max-new-tokens", "3", "--quiet")
    assert rc == 0 and f"checkpoint {ckpt}" in out
    assert "prompt ids (4): [0, 5, 9, 12]" in out  # bos + the three words
    loaded = ascend_v4.load_model(ckpt, progress=False)
    assert loaded.tokenizer is not None
    greedy = ascend_v4.generate(loaded, [[0, 5, 9, 12]], 3, eos_token_id=loaded.config.eos_token_id)
    assert _tokens(out) == [f"w{t}" for t in greedy.tokens[0]][: len(_tokens(out))]


def test_config_json_of_a_checkpoint_round_trips(tmp_path):
    model = ascend_v4.load_model("tiny")
    save_model(model, tmp_path)
    data = json.loads((tmp_path / "config.json").read_text())
    assert data["num_hidden_layers"] == model.config.num_hidden_layers
    assert ascend_v4.ModelConfig.from_file(tmp_path).config_hash() == model.config.config_hash()
