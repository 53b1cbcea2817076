"""Chat SFT: render conversations through a declared template, with a per-token loss flag.

Template (markers are reserved special ids in every tokenizer, never parsed out of text):
  <|system|>\\n{content}<|end|>\\n<|user|>\\n{content}<|end|>\\n<|assistant|>\\n{content}<|end|>\\n ... EOS
With only_train_on_assistant, the flagged tokens are each assistant turn's content and its
<|end|>; otherwise every token but the first. A conversation without an assistant turn then
carries no loss tokens at all.
"""

from __future__ import annotations

import numpy as np

from lmobjective.data.tokenizers import Tokenizer

TEMPLATE = "<|{role}|>\\n{content}<|end|>\\n"


def render(conversations: list[list[dict]], tok: Tokenizer, only_train_on_assistant: bool
           ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """(ids, lengths per conversation, loss flag per token) for a list of conversations."""
  contents = tok.encode_batch([m["content"] for conv in conversations for m in conv])
  newline = tok.encode("\n")
  end = tok.special_id("<|end|>")
  ids, flags, lengths, k = [], [], [], 0
  for conv in conversations:
    n0 = len(ids)
    for m in conv:
      body = contents[k]
      k += 1
      head = [tok.special_id(f"<|{m['role']}|>")] + newline
      train = m["role"] == "assistant" or not only_train_on_assistant
      ids += head + body + [end] + newline
      flags += [not only_train_on_assistant] * len(head) + [train] * (len(body) + 1) + [not only_train_on_assistant] * len(newline)
    ids.append(tok.eos_id)
    flags.append(not only_train_on_assistant)
    if n0 < len(flags):
      flags[n0] = False  # a conversation's first token is never predicted from inside it
    lengths.append(len(ids) - n0)
  return np.array(ids, np.int64), np.array(lengths, np.int64), np.array(flags, bool)
