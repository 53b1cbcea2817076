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


def render_prompt(messages: list[dict], tok: Tokenizer) -> list[int]:
  """The ids a model trained on `render` sees before an assistant turn: the messages rendered
  through the template, then the assistant header (`<|assistant|>\\n`), for generation."""
  ids, _, _ = render([messages + [{"role": "assistant", "content": ""}]], tok, only_train_on_assistant=True)
  header = [tok.special_id("<|assistant|>")] + tok.encode("\n")
  n = len(ids) - len(_closing(tok))  # drop the empty turn's <|end|>\n and the EOS
  assert ids[n - len(header):n].tolist() == header
  return ids[:n].tolist()


def _closing(tok: Tokenizer) -> list[int]:
  return [tok.special_id("<|end|>")] + tok.encode("\n") + [tok.eos_id]


def render_pairs(pairs: list[dict], tok: Tokenizer) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """(ids, lengths, flags) of two documents per preference pair: 2i = prompt+chosen, 2i+1 = prompt+rejected.

  Plain pair (prompt a string): [EOS] + enc(prompt) + enc(response) + [EOS], flags on enc(response)
  and its EOS (TRL appends EOS to each response). Chat pair: `render` of the prompt messages plus one
  assistant turn, flagged exactly as SFT flags that turn (its content and <|end|>); the prompt's own
  assistant turns carry no flag. Either way a document's prompt is every token before its first flag.
  """
  is_chat = [isinstance(p["prompt"], list) for p in pairs]
  plain = iter(_plain_docs([p for p, c in zip(pairs, is_chat) if not c], tok))
  chat = iter(_chat_docs([p for p, c in zip(pairs, is_chat) if c], tok))
  docs = [d for c in is_chat for d in (next(chat) if c else next(plain))]
  lengths = np.array([len(ids) for ids, _ in docs], np.int64)
  if not docs:
    return np.zeros(0, np.int64), lengths, np.zeros(0, bool)
  return (np.concatenate([ids for ids, _ in docs]).astype(np.int64), lengths,
          np.concatenate([flags for _, flags in docs]).astype(bool))


def _plain_docs(pairs: list[dict], tok: Tokenizer) -> list[list[tuple[np.ndarray, np.ndarray]]]:
  enc = tok.encode_batch([t for p in pairs for t in (p["prompt"], p["chosen"], p["rejected"])])
  out = []
  for k in range(0, len(enc), 3):
    prompt = [tok.opener_id] + enc[k]  # EOS opens the document, as in pretraining streams (an imported Llama: BOS)
    out.append([(np.array(prompt + r + [tok.eos_id]), np.array([False] * len(prompt) + [True] * (len(r) + 1)))
                for r in enc[k + 1:k + 3]])
  return out


def _chat_docs(pairs: list[dict], tok: Tokenizer) -> list[list[tuple[np.ndarray, np.ndarray]]]:
  if not pairs:  # plain pairs only: a tokenizer without chat markers (an imported one) renders them
    return []
  turns = [[{"role": "assistant", "content": p[r]}] for p in pairs for r in ("chosen", "rejected")]
  ids, lengths, flags = render([p["prompt"] for p in pairs] + turns, tok, only_train_on_assistant=True)
  cuts = np.cumsum(lengths)[:-1]
  parts = list(zip(np.split(ids, cuts), np.split(flags, cuts)))
  prompts, turns = parts[:len(pairs)], parts[len(pairs):]
  out = []
  for k, (prompt, _) in enumerate(prompts):  # the prompt's EOS goes: the assistant turn follows directly
    out.append([(np.concatenate([prompt[:-1], t]), np.concatenate([np.zeros(len(prompt) - 1, bool), f]))
                for t, f in turns[2 * k:2 * k + 2]])
  return out
