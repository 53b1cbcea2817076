"""prompts.py: prompts_jsonl records, one-line errors naming file:line, rendering, and the seeded prompt order."""

import hashlib
import json

import numpy as np
import pytest

from lmobjective.config import ConfigError
from lmobjective.data import prompts, sft, tokenizers

TOK = tokenizers.ByteTokenizer()  # bytes, pad 256, EOS 257, <|system|> 258 <|user|> 259 <|assistant|> 260 <|end|> 261
CHAT = [{"role": "system", "content": "s"}, {"role": "user", "content": "1+2="}]


def _write(tmp_path, lines):
  path = tmp_path / "p.jsonl"
  path.write_text("".join(line + "\n" for line in lines))
  return str(path)


def test_records_load_with_their_fields_in_order(tmp_path):
  recs = [{"prompt": "plain", "answer": "3", "meta": {"k": 1}},
          {"prompt": CHAT, "meta": None, "answer": 4}]  # key order and value types are free
  path = _write(tmp_path, [json.dumps(recs[0]), "", "  ", json.dumps(recs[1])])  # blank lines skipped
  ps = prompts.load_prompts("rl", path)
  assert len(ps) == 2 and ps.prompts == ["plain", CHAT]
  assert ps.fields == {"answer": ["3", 4], "meta": [{"k": 1}, None]}
  with open(path, "rb") as f:
    assert ps.fingerprint == hashlib.sha256(f.read()).hexdigest()[:16]
  assert prompts.load_prompts("rl", _write(tmp_path, [json.dumps(recs[1])])).fingerprint != ps.fingerprint
  assert ps.take(np.array([1, 0, 1])) == ([CHAT, "plain", CHAT],
                                          {"answer": [4, "3", 4], "meta": [None, {"k": 1}, None]})


def test_records_without_other_fields(tmp_path):
  ps = prompts.load_prompts("rl", _write(tmp_path, ['{"prompt": "a"}', '{"prompt": "b"}']))
  assert ps.fields == {} and ps.take([1]) == (["b"], {})


def _error(tmp_path, lines, path=None):
  path = path or _write(tmp_path, lines)
  with pytest.raises(ConfigError) as e:
    prompts.load_prompts("rl", path)
  assert "\n" not in str(e.value)
  return str(e.value).replace(path, "P")


GOOD = '{"prompt": "a", "answer": "1"}'


@pytest.mark.parametrize("lines, message", [
    ([GOOD, '{"prompt": "b", '], "config.data.sources.rl.path='P:2': invalid JSON (Expecting property name enclosed "
     "in double quotes)"),
    (["[1, 2]"], "config.data.sources.rl.path='P:1': prompt record is a JSON list, not an object"),
    ([GOOD, '{"answer": "2"}'], "config.data.sources.rl.path='P:2': prompt record has no 'prompt' field"),
    (['{"prompt": 3}'], "config.data.sources.rl.path='P:1': prompt record: 'prompt' must be a string or a list of "
     "{'role': system|user|assistant, 'content': str}"),
    (['{"prompt": [{"role": "bot", "content": "x"}]}'], "config.data.sources.rl.path='P:1': prompt record: 'prompt' "
     "must be a string or a list of {'role': system|user|assistant, 'content': str}"),
    (['{"prompt": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}'],
     "config.data.sources.rl.path='P:1': prompt record: 'prompt' must end with a user turn (its last turn is "
     "assistant)"),
    (['{"prompt": []}'], "config.data.sources.rl.path='P:1': prompt record: 'prompt' must end with a user turn "
     "(the list is empty)"),
    ([GOOD, GOOD, '{"prompt": "c", "answer": "3", "extra": 0}'], "config.data.sources.rl.path='P:3': prompt record "
     "has fields ['answer', 'extra'], the first record ['answer']: every record needs the same fields (one list "
     "per reward keyword)"),
    ([GOOD, '{"prompt": "c"}'], "config.data.sources.rl.path='P:2': prompt record has fields [], the first record "
     "['answer']: every record needs the same fields (one list per reward keyword)"),
    (['{"prompt": "c", "completions": 1}'], "config.data.sources.rl.path='P:1': prompt record has a field "
     "'completions': the reward functions receive that keyword themselves"),
    (["", "  "], "config.data.sources.rl.path='P': file is empty"),
])
def test_bad_records_are_one_line_naming_file_and_line(tmp_path, lines, message):
  assert _error(tmp_path, lines) == message


def test_a_missing_file_or_path(tmp_path):
  assert _error(tmp_path, None, path=str(tmp_path / "nope.jsonl")) == "config.data.sources.rl.path='P': no such file"
  with pytest.raises(ConfigError, match=r"^config.data.sources.rl.path='': required for a prompts_jsonl source$"):
    prompts.load_prompts("rl", "")


def test_render_chat_as_sft_and_plain_after_an_eos():
  assert prompts.render("ab", TOK) == [257, 97, 98]
  ids = prompts.render(CHAT, TOK)
  assert ids == sft.render_prompt(CHAT, TOK)
  assert ids == [258, 10, 115, 261, 10, 259, 10, 49, 43, 50, 61, 261, 10, 260, 10]  # ... <|assistant|>\n


def test_prompt_order_takes_each_prompt_once_per_epoch_across_batch_boundaries():
  order = prompts.PromptOrder(num_prompts=10, batch_size=4, seed=3)
  taken = np.concatenate([order.batch(i) for i in range(10)])  # 40 positions = 4 epochs
  perms = [np.random.default_rng([3, e]).permutation(10) for e in range(4)]
  np.testing.assert_array_equal(taken, np.concatenate(perms))
  for e in range(4):
    assert sorted(taken[10 * e:10 * e + 10].tolist()) == list(range(10))
  assert len({tuple(p) for p in perms}) == 4  # epochs are reshuffled
  np.testing.assert_array_equal(order.batch(2), np.concatenate([perms[0][8:], perms[1][:2]]))  # crosses epoch 0 -> 1
  assert [order.epoch_of(i) for i in (0, 2, 3, 4, 5, 9)] == [0, 0, 1, 1, 2, 3]


def test_prompt_order_is_a_pure_function_of_the_iteration():
  a, b = prompts.PromptOrder(7, 3, seed=0), prompts.PromptOrder(7, 3, seed=0)
  later = [b.batch(i) for i in (5, 1, 100)]  # any order of calls, a fresh object: a resumed run
  for i, got in zip((5, 1, 100), later):
    np.testing.assert_array_equal(a.batch(i), got)
  assert a.batch(0).dtype == np.int64
  assert not np.array_equal(prompts.PromptOrder(7, 3, seed=1).batch(0), a.batch(0))


def test_a_batch_larger_than_the_prompts_spans_epochs():
  order = prompts.PromptOrder(num_prompts=3, batch_size=7, seed=2)
  perms = [order.permutation(e) for e in range(5)]
  assert all(not np.array_equal(p, q) for p, q in zip(perms, perms[1:]))  # (seed 0 repeats some: a vacuous test)
  np.testing.assert_array_equal(order.batch(0), np.concatenate([perms[0], perms[1], perms[2][:1]]))
  np.testing.assert_array_equal(order.batch(1), np.concatenate([perms[2][1:], perms[3], perms[4][:2]]))
  with pytest.raises(ValueError, match=r"^PromptOrder: num_prompts=0 and batch_size=2 must be >= 1$"):
    prompts.PromptOrder(0, 2, seed=0)
