"""preference_jsonl: pairs read, tokenized and laid out as interleaved padded rows (hand-aligned tables)."""

import glob
import json
import os

import numpy as np
import pytest

from conftest import file_config
from lmobjective import data, validation
from lmobjective.config import ConfigError
from lmobjective.data import DataWarning, sft, sources, streams, tokenized, tokenizer_build, tokenizers
from lmobjective.data.tokenized import Split

# pad 0, EOS 1, <|system|> 2 <|user|> 3 <|assistant|> 4 <|end|> 5, bytes 6..261, then the characters:
# '\n' 262, a 263, b 264, c 265, d 266, e 267, f 268, x 269, y 270, z 271
TOK = tokenizers.CharTokenizer("\nabcdefxyz")
NL, A, B, C, D, E, F, X, Y, Z = range(262, 272)
PLAIN = {"prompt": "ab", "chosen": "x", "rejected": "yz"}
CHAT = {"prompt": [{"role": "user", "content": "ab"}], "chosen": "x",
        "rejected": [{"role": "assistant", "content": "yz"}]}  # TRL's conversational response, or a bare string


def _write(path, records):
  path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
  return path


def _pipeline(tmp_path, records, T, batch_size=1, tok=TOK, **source):
  cfg = file_config("preference_jsonl", _write(tmp_path / "p.jsonl", records), T=T, **{"val_fraction": 0.0, **source})
  return data.build_pipeline(cfg.data, tok, seed=0, batch_size=batch_size, cache_dir=str(tmp_path / "cache"))


def _pair_rows(pairs, T, **kw):
  ids, lengths, flags = sft.render_pairs(pairs, TOK)
  split = Split(ids, np.concatenate([[0], np.cumsum(lengths)]), flags)
  return streams.PairRows(split, T, TOK.pad_id, True, seed=0, key=0, shuffle=False, **kw)


def _rows(batch, field):
  return batch[field].astype(int).tolist()


def test_plain_pair_table(tmp_path):
  pipe = _pipeline(tmp_path, [PLAIN], T=8)
  b = pipe.batch(0)
  assert pipe.rows_per_example == 2 and b["inputs"].shape == (2, 8)
  assert _rows(b, "inputs") == [[1, A, B, X, 1, 0, 0, 0],  # chosen: EOS + prompt + response + EOS, padded
                                [1, A, B, Y, Z, 1, 0, 0]]  # rejected
  assert _rows(b, "targets") == [[A, B, X, 1, 0, 0, 0, 0], [A, B, Y, Z, 1, 0, 0, 0]]
  assert _rows(b, "loss_mask") == [[0, 0, 1, 1, 0, 0, 0, 0], [0, 0, 1, 1, 1, 0, 0, 0]]  # response + its EOS
  assert _rows(b, "segment_ids") == [[1] * 5 + [0] * 3, [1] * 6 + [0] * 2]
  assert _rows(b, "positions") == [[0, 1, 2, 3, 4, 0, 0, 0], [0, 1, 2, 3, 4, 5, 0, 0]]
  assert _rows(b, "source_ids") == [[-1, -1, 0, 0, -1, -1, -1, -1], [-1, -1, 0, 0, 0, -1, -1, -1]]


def test_chat_pair_table(tmp_path):
  b = _pipeline(tmp_path, [CHAT], T=16).batch(0)
  prompt = [3, NL, A, B, 5, NL, 4, NL]  # <|user|>\nab<|end|>\n<|assistant|>\n: 8 = T // 2 tokens, kept whole
  assert _rows(b, "inputs") == [prompt + [X, 5, NL, 1] + [0] * 4, prompt + [Y, Z, 5, NL, 1] + [0] * 3]
  assert _rows(b, "targets") == [prompt[1:] + [X, 5, NL, 1] + [0] * 5, prompt[1:] + [Y, Z, 5, NL, 1] + [0] * 4]
  assert np.flatnonzero(b["loss_mask"][0]).tolist() == [7, 8]  # targets x, <|end|>
  assert np.flatnonzero(b["loss_mask"][1]).tolist() == [7, 8, 9]  # y, z, <|end|>
  assert _rows(b, "segment_ids") == [[1] * 12 + [0] * 4, [1] * 13 + [0] * 3]


def test_chat_pair_is_the_sft_render_flagged_on_the_final_turn_only():
  prompt = [{"role": "system", "content": "s"}, {"role": "user", "content": "a"},
            {"role": "assistant", "content": "b"}, {"role": "user", "content": "c"}]
  ids, lengths, flags = sft.render_pairs([{"prompt": prompt, "chosen": "xy", "rejected": "z"}], TOK)
  for doc, response in ((0, "xy"), (1, "z")):
    want_ids, _, want_flags = sft.render([prompt + [{"role": "assistant", "content": response}]], TOK, True)
    final = len(want_ids) - (len(response) + 5)  # <|assistant|> \n content <|end|> \n EOS
    want_flags[:final] = False  # the prompt's assistant turn ('b') is not scored
    lo, hi = np.cumsum([0, *lengths])[doc:doc + 2]
    np.testing.assert_array_equal(ids[lo:hi], want_ids)
    np.testing.assert_array_equal(flags[lo:hi], want_flags)
    assert TOK.decode(ids[lo:hi][flags[lo:hi]]) == response + "<|end|>"


def test_prompt_keeps_its_end_response_its_start_and_both_rows_share_the_prompt():
  pair = {"prompt": "abcdef", "chosen": "xyzxyz", "rejected": "y"}  # prompt [EOS a..f]: 7 tokens
  rows = _pair_rows([pair], T=8)  # max_prompt_length None = T // 2 = 4
  f = rows.fields(np.array([0]))
  assert _rows(f, "inputs") == [[C, D, E, F, X, Y, Z, X], [C, D, E, F, Y, 1, 0, 0]]
  assert _rows(f, "targets") == [[D, E, F, X, Y, Z, X, Y], [D, E, F, Y, 1, 0, 0, 0]]
  assert _rows(f, "loss_mask") == [[0, 0, 0, 1, 1, 1, 1, 1], [0, 0, 0, 1, 1, 0, 0, 0]]
  assert rows.accounting == {"pairs": 1, "rows": 2, "padding_fraction": 1 - 15 / 18, "prompt_truncated_pairs": 1,
                             "response_truncated_pairs": 1, "truncated_tokens": 3 + 3 + 2}
  g = _pair_rows([pair], T=8, max_prompt_length=2, max_response_length=3).fields(np.array([0]))
  assert _rows(g, "inputs") == [[E, F, X, Y, Z, 0, 0, 0], [E, F, Y, 1, 0, 0, 0, 0]]
  assert _rows(g, "loss_mask") == [[0, 1, 1, 1, 0, 0, 0, 0], [0, 1, 1, 0, 0, 0, 0, 0]]
  assert rows.scored_targets() == f["loss_mask"].sum() == 7


def test_batches_interleave_pairs_and_count_pairs(tmp_path):
  tok = tokenizers.CharTokenizer("qcr0123456789")
  pipe = _pipeline(tmp_path, [{"prompt": f"q{i}", "chosen": f"c{i}", "rejected": f"r{i}"} for i in range(10)],
                   T=8, batch_size=5, tok=tok)
  seen = []
  for step in range(4):  # 2 epochs of 10 pairs
    b = pipe.batch(step)
    assert b["inputs"].shape == (10, 8)  # batch_size pairs = 2 * batch_size rows
    text = [tok.decode(r[s > 0]) for r, s in zip(b["inputs"], b["segment_ids"])]
    for i in range(5):
      k = text[2 * i][1]
      assert (text[2 * i], text[2 * i + 1]) == (f"q{k}c{k}", f"q{k}r{k}")  # chosen, then its rejected
      seen.append(int(k))
  assert sorted(seen[:10]) == sorted(seen[10:]) == list(range(10))  # each pair once per epoch
  assert seen[:10] != seen[10:] and seen[:10] != list(range(10))  # a fresh seeded order per epoch
  st = pipe.stats(step=4)
  assert st["global_rows"] == 40 and st["sources"]["f"]["rows_per_epoch"] == 10
  assert st["sources"]["f"]["epochs_seen"] == 2.0 and st["sources"]["f"]["pairs"] == 10
  it = pipe.train_iterator()
  next(it), next(it)
  assert it.get_state() == {"next_index": 2}
  np.testing.assert_array_equal(next(it)["inputs"], pipe.batch(2)["inputs"])


def test_split_is_seeded_and_disjoint_by_pair(tmp_path):
  records = [{"prompt": f"q{i:02d}", "chosen": f"c{i:02d}", "rejected": f"r{i:02d}"} for i in range(40)]
  path = _write(tmp_path / "p.jsonl", records)
  scfg = file_config("preference_jsonl", path, val_fraction=0.1).data.sources.f
  d, again = sources.load_source("f", scfg), sources.load_source("f", scfg)
  assert len(d.train) == 36 and len(d.val) == 4 and d.val == again.val
  assert sorted(d.train + d.val, key=lambda r: r["prompt"]) == records  # whole pairs, none split or lost
  assert not {r["prompt"] for r in d.train} & {r["prompt"] for r in d.val}
  capped = sources.load_source("f", file_config("preference_jsonl", path, val_fraction=0.2,
                                                max_documents=10).data.sources.f)
  assert len(capped.train) == 8 and len(capped.val) == 2
  tok = tokenizers.CharTokenizer("qcr0123456789")
  pipe = _pipeline(tmp_path, records, T=8, batch_size=2, tok=tok, val_fraction=0.1)
  assert pipe.sources[0].val.num_documents == 8
  with pytest.warns(DataWarning, match="eval asks for 6 pairs, the validation split has 4; the rest are padding"):
    ev = pipe.eval_batches("f", num_batches=3, batch_size=2)
  assert [e["inputs"].shape for e in ev] == [(4, 8)] * 3
  scored = [r for e in ev for r, m in zip(e["inputs"], e["loss_mask"]) if m.any()]
  assert len(scored) == 8  # each held-out pair once (two rows), then padding pairs
  assert not ev[2]["loss_mask"].any() and (ev[2]["source_ids"] == -1).all()
  prompts = [tok.decode(r[1:4]) for r in scored[0::2]]
  assert sorted(prompts) == sorted(r["prompt"] for r in d.val)


GOOD = json.dumps(PLAIN)


@pytest.mark.parametrize("record,needle", [
    ('{"prompt": "a", "chosen": ', "invalid JSON (Expecting value)"),
    ('["a", "b", "c"]', "preference record is a JSON list, not an object"),
    ('{"prompt": "a", "chosen": "b"}', "preference record has no 'rejected' field"),
    ('{"prompt": 3, "chosen": "b", "rejected": "c"}', "'prompt' must be a string or a list of {'role'"),
    ('{"prompt": "a", "chosen": 3, "rejected": "c"}', "'chosen' must be a string (as the prompt is), not 3"),
    ('{"prompt": "a", "chosen": "b", "rejected": ""}', "'rejected' is empty"),
    ('{"prompt": [{"role": "user", "content": "q"}], "chosen": [{"role": "assistant", "content": ""}], '
     '"rejected": "c"}', "'chosen' is empty"),
    ('{"prompt": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}], "chosen": "b", '
     '"rejected": "c"}', "'prompt' must end with a user turn (its last turn is assistant)"),
    ('{"prompt": [], "chosen": "b", "rejected": "c"}', "'prompt' must end with a user turn (the list is empty)"),
    ('{"prompt": [{"role": "bot", "content": "q"}], "chosen": "b", "rejected": "c"}',
     "'prompt' must be a string or a list of {'role': system|user|assistant"),
    ('{"prompt": [{"role": "user", "content": "q"}], "chosen": [{"role": "user", "content": "b"}], '
     '"rejected": "c"}', "'chosen' must be a string or [{'role': 'assistant', 'content': str}]"),
    ('{"prompt": "a", "chosen": "b", "rejected": "c", "margin": "1"}', "'margin' must be a finite number, not '1'"),
    ('{"prompt": "a", "chosen": "b", "rejected": "c", "margin": NaN}', "'margin' must be a finite number, not nan"),
    ('{"prompt": "a", "chosen": "b", "rejected": "c", "margin": true}', "'margin' must be a finite number, not True"),
    ('{"prompt": "a", "chosen": "b", "rejected": "c", "margin": 0.5}',
     "preference record has a 'margin' the first record of the file lacks: every pair needs one, or none"),
])
def test_bad_records_are_one_line_naming_file_and_line_before_anything_is_written(tmp_path, record, needle):
  path = _write(tmp_path / "p.jsonl", [GOOD, record])
  cfg = file_config("preference_jsonl", path, val_fraction=0.0)
  cfg.data.tokenizer.kind = "char"
  with pytest.raises(ConfigError) as e:
    data.build_tokenizer(cfg.data, str(tmp_path / "run"))
  with pytest.raises(ConfigError) as again:
    data.build_pipeline(cfg.data, TOK, seed=0, batch_size=1, cache_dir=str(tmp_path / "cache"))
  msg = str(e.value)
  assert msg.startswith(f"config.data.sources.f.path='{path}:2': ") and needle in msg and "\n" not in msg, msg
  assert str(again.value) == msg
  assert not os.path.exists(tmp_path / "run" / "tokenizer") and not glob.glob(str(tmp_path / "cache" / "*"))


def test_margins_ride_on_both_rows_of_their_pair_and_zero_elsewhere(tmp_path):
  """TRL's optional `margin` column: float32 [2P] per batch, the pair's value on its chosen and rejected row,
  through the cache; 0 for a file without margins and on the padding pairs of an eval batch."""
  recs = [dict(PLAIN, chosen=c, margin=m) for c, m in (("x", 0.5), ("xx", -1.25), ("xxx", 2))]
  pipe = _pipeline(tmp_path, recs, T=8, batch_size=3)
  b = pipe.batch(0)
  chosen_len = b["loss_mask"][0::2].sum(axis=1) - 1  # which pair each row is: its chosen response's length
  want = {1: 0.5, 2: -1.25, 3: 2.0}
  assert b["margin"].dtype == np.float32 and b["margin"].tolist() == [want[n] for n in np.repeat(chosen_len, 2)]
  assert pipe.sources[0].info["pairs_with_margin"] is True
  again = _pipeline(tmp_path, recs, T=8, batch_size=3)  # a cache hit carries them too
  np.testing.assert_array_equal(again.batch(0)["margin"], b["margin"])
  (tmp_path / "plain").mkdir()
  plain = _pipeline(tmp_path / "plain", [PLAIN] * 3, T=8, batch_size=2)
  assert plain.batch(0)["margin"].tolist() == [0.0] * 4 and plain.sources[0].info["pairs_with_margin"] is False
  cfg = file_config("preference_jsonl", _write(tmp_path / "v.jsonl", recs), T=8, val_fraction=0.34)
  pipe = data.build_pipeline(cfg.data, TOK, seed=0, batch_size=1, cache_dir=str(tmp_path / "cache"))
  with pytest.warns(DataWarning, match="padding pairs"):
    (ev,) = pipe.eval_batches("f", 1, 2)
  assert ev["margin"][2:].tolist() == [0.0, 0.0] and ev["margin"][0] == ev["margin"][1] != 0


def test_a_margin_in_one_file_of_a_source_and_not_another_is_refused(tmp_path):
  _write(tmp_path / "a.jsonl", [dict(PLAIN, margin=1.0)])
  _write(tmp_path / "b.jsonl", [PLAIN])
  cfg = file_config("preference_jsonl", str(tmp_path / "*.jsonl"), val_fraction=0.0)
  with pytest.raises(ConfigError, match=r"a.jsonl gives each pair a 'margin', .*b.jsonl does not: every pair needs one, or none"):
    data.build_pipeline(cfg.data, TOK, seed=0, batch_size=1, cache_dir=None)


def test_cache_hit_returns_the_same_arrays(tmp_path, monkeypatch):
  scfg = file_config("preference_jsonl", _write(tmp_path / "p.jsonl", [PLAIN, CHAT] * 5),
                     val_fraction=0.2).data.sources.f
  first = tokenized.load("f", scfg, TOK, str(tmp_path / "cache"))
  monkeypatch.setattr(sources, "load_source", lambda *a: pytest.fail("re-read a cached source"))
  hit = tokenized.load("f", scfg, TOK, str(tmp_path / "cache"))
  for s in ("train", "val"):
    a, b = getattr(first, s), getattr(hit, s)
    for field in ("ids", "doc_starts", "flags"):
      np.testing.assert_array_equal(getattr(b, field), getattr(a, field), err_msg=f"{s} {field}")
    assert b.flags.dtype == bool and b.num_documents == 2 * (8 if s == "train" else 2)


def test_fingerprints_cover_the_file(tmp_path):
  path = _write(tmp_path / "p.jsonl", [PLAIN])
  scfg = file_config("preference_jsonl", path).data.sources.f
  before, key = sources.content_fingerprint("f", scfg), sources.fingerprint("f", scfg)
  _write(path, [dict(PLAIN, chosen="y")])  # same size, one byte changed
  after = sources.content_fingerprint("f", scfg)
  assert before["files"] == after["files"] == 1 and before["bytes"] == after["bytes"]
  assert before["content"] != after["content"] and sources.fingerprint("f", scfg) != key


def test_tokenizer_lines_read_prompts_and_both_responses():
  chat = {"prompt": [{"role": "system", "content": "s\nt"}, {"role": "user", "content": "ab"}], "chosen": "x",
          "rejected": "yz"}  # as sources.py gives it: responses as their content
  assert tokenizer_build._lines([PLAIN, chat]) == ["ab", "x", "yz", "s", "t", "ab", "x", "yz"]


def test_a_split_with_no_scored_response_is_refused(tmp_path):
  with pytest.raises(ConfigError, match="the train split of source 'f' has no scored response token"):
    _pipeline(tmp_path, [dict(PLAIN, prompt="abcd")], T=3, max_prompt_length=4)  # unvalidated: the prompt fills the row
  cfg = file_config("preference_jsonl", tmp_path / "p.jsonl", T=3, max_prompt_length=4)
  cfg.objective.kind = "simpo"
  with pytest.raises(ConfigError, match=r"max_prompt_length=4: must be <= data.context_length=3"):
    validation.validate(cfg)


def test_pairs_and_rows_are_not_mixed(tmp_path):
  cfg = file_config("preference_jsonl", _write(tmp_path / "p.jsonl", [PLAIN]))
  cfg.data.sources.t = file_config("text", _write(tmp_path / "t.txt", ["text " * 20])).data.sources.f
  with pytest.raises(ConfigError, match="data.sources.t.kind='text': cannot be mixed with preference_jsonl"):
    data.build_pipeline(cfg.data, TOK, seed=0, batch_size=1, cache_dir=str(tmp_path / "cache"))


def test_processes_build_their_share_of_pairs(tmp_path):
  path = _write(tmp_path / "p.jsonl", [{"prompt": f"q{i}", "chosen": f"c{i}", "rejected": f"r{i}"} for i in range(10)])
  cfg = file_config("preference_jsonl", path, T=8, val_fraction=0.0)
  tok = tokenizers.CharTokenizer("qcr0123456789")
  build = lambda B, p, n: data.build_pipeline(cfg.data, tok, seed=0, batch_size=B, process_index=p, process_count=n,
                                              cache_dir=str(tmp_path / "cache"))
  whole, parts = build(4, 0, 1).batch(3), [build(2, p, 2).batch(3) for p in range(2)]
  for k in whole:
    np.testing.assert_array_equal(np.concatenate([parts[0][k], parts[1][k]]), whole[k], err_msg=k)
