"""SFT stage: next-token prediction on the assistant turns of a chat JSONL file, from a pretrained run.

    python -m lmobjective.train --config=configs/sft.py --workdir=runs/sft \\
      --config.train.init_from=runs/default --config.data.sources.chat.path=chat.jsonl

The model is the default one (it must equal the origin's: a differing key is refused in one line);
the tokenizer is the origin's. Lines are {"messages": [{"role", "content"}, ...]}; the loss covers
the assistant turns only (`only_train_on_assistant`).
"""

import ml_collections

from lmobjective.config import base_config


def get_config(arg: str | None = None):
  c = base_config(__file__, arg=arg)
  chat = c.data.sources.code
  chat.kind, chat.weight, chat.val_fraction = "chat_jsonl", 1.0, 0.1
  c.data.sources = ml_collections.ConfigDict({"chat": chat})
  c.train.steps = 200
  c.train.batch_size = 16
  c.optimizer.learning_rate = 1e-3
  c.optimizer.end_learning_rate = 1e-4
  c.optimizer.warmup_steps = 10
  c.eval.every_steps = 50
  c.checkpoint.every_steps = 50
  return c
