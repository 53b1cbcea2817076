"""sft.py + padded packing: only assistant tokens carry loss (hand-checked positions)."""

import json

import numpy as np

from conftest import file_config
from lmobjective import data
from lmobjective.data import sft, tokenizers

TOK = tokenizers.ByteTokenizer()  # bytes 0..255, pad 256, EOS 257, <|system|> 258 <|user|> 259 <|assistant|> 260 <|end|> 261
CHAT = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}
NO_ASSISTANT = {"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "q"}]}


def test_render_table():
  ids, lengths, flags = sft.render([CHAT["messages"], NO_ASSISTANT["messages"]], TOK, only_train_on_assistant=True)
  np.testing.assert_array_equal(lengths, [13, 11])
  np.testing.assert_array_equal(ids[:13], [259, 10, 104, 105, 261, 10, 260, 10, 121, 111, 261, 10, 257])
  np.testing.assert_array_equal(np.flatnonzero(flags[:13]), [8, 9, 10])  # 'y' 'o' <|end|>
  np.testing.assert_array_equal(ids[13:], [258, 10, 115, 261, 10, 259, 10, 113, 261, 10, 257])
  assert not flags[13:].any()
  assert TOK.decode(ids[:13]) == "<|user|>\nhi<|end|>\n<|assistant|>\nyo<|end|>\n"


def test_render_prompt_is_the_training_rendering_up_to_the_assistant_content():
  prompt = sft.render_prompt(CHAT["messages"][:1], TOK)
  assert prompt == [259, 10, 104, 105, 261, 10, 260, 10]  # <|user|>\nhi<|end|>\n<|assistant|>\n (table above)
  ids, _, flags = sft.render([CHAT["messages"]], TOK, only_train_on_assistant=True)
  first_scored = int(np.flatnonzero(flags)[0])
  assert ids[:first_scored].tolist() == prompt  # generation conditions on what training scored after


def test_render_all_tokens_when_not_only_assistant():
  _, _, flags = sft.render([CHAT["messages"]], TOK, only_train_on_assistant=False)
  np.testing.assert_array_equal(flags, [False] + [True] * 12)


def _pipeline(tmp_path, only_assistant=True):
  path = tmp_path / "chat.jsonl"
  path.write_text(json.dumps(CHAT) + "\n" + json.dumps(NO_ASSISTANT) + "\n")
  cfg = file_config("chat_jsonl", path, T=16, val_fraction=0.0, only_train_on_assistant=only_assistant)
  return data.build_pipeline(cfg.data, TOK, seed=0, batch_size=2, cache_dir=str(tmp_path / "cache"))


def test_only_assistant_targets_carry_loss_in_batches(tmp_path):
  pipe = _pipeline(tmp_path)
  assert pipe.train_rows[0].num_rows == 2  # 13 + 11 tokens do not share a row of 17
  rows = pipe.train_rows[0].fields(np.arange(2))
  a = int(np.flatnonzero(rows["inputs"][:, 0] == 259)[0])  # the row holding CHAT
  np.testing.assert_array_equal(rows["inputs"][a], [259, 10, 104, 105, 261, 10, 260, 10, 121, 111, 261, 10, 257,
                                                    256, 256, 256])
  np.testing.assert_array_equal(rows["targets"][a], [10, 104, 105, 261, 10, 260, 10, 121, 111, 261, 10, 257,
                                                     256, 256, 256, 256])
  np.testing.assert_array_equal(np.flatnonzero(rows["loss_mask"][a]), [7, 8, 9])  # targets y, o, <|end|>
  assert rows["loss_mask"][1 - a].sum() == 0  # no assistant turn: zero loss tokens
  np.testing.assert_array_equal(rows["segment_ids"][a], [1] * 13 + [0] * 3)
  np.testing.assert_array_equal(rows["positions"][a], list(range(13)) + [0] * 3)
  b = pipe.batch(0)
  np.testing.assert_array_equal(b["source_ids"][b["inputs"][:, 0] == 259][0], [0] * 12 + [-1] * 4)
  assert b["loss_mask"].sum() == 3
  st = pipe.stats(step=1)["sources"]["f"]
  assert st["padding_fraction"] == 1 - 24 / 34 and st["rows"] == 2 and st["truncated_tokens"] == 0


def test_every_conversation_token_trains_when_not_only_assistant(tmp_path):
  b = _pipeline(tmp_path, only_assistant=False).batch(0)
  assert b["loss_mask"].sum() == 12 + 10  # every target inside its conversation
