"""Train the configured tokenizer standalone.

  python -m lmobjective.run.train_tokenizer --config=configs/default.py --output=DIR

Writes DIR/tokenizer/ (use it with --config.data.tokenizer.path=DIR/tokenizer).
"""

from absl import app, flags
from ml_collections import config_flags

from lmobjective.config import DEFAULT_CONFIG
from lmobjective.data import tokenizer_build
from lmobjective.validation import validate

_CONFIG = config_flags.DEFINE_config_file("config", default=DEFAULT_CONFIG, lock_config=True)
_OUTPUT = flags.DEFINE_string("output", None, "directory to write the tokenizer into", required=True)


def main(argv):
  del argv
  cfg = _CONFIG.value
  validate(cfg)
  tok = tokenizer_build.build_tokenizer(cfg.data, _OUTPUT.value)
  print(f"{tok.kind} tokenizer, vocab_size={tok.vocab_size}, fingerprint={tok.fingerprint()} "
        f"-> {_OUTPUT.value}/tokenizer")


if __name__ == "__main__":
  app.run(main)
