"""Train the configured tokenizer standalone.

  python -m lmobjective.run.train_tokenizer --config=configs/default.py --output=DIR

Writes DIR/tokenizer/ (use it with --config.data.tokenizer.path=DIR/tokenizer). A bad config
file, key or value stops with one `error:` line, as in `lmobjective.train`.
"""

import functools
import sys

from absl import app, flags

from lmobjective.config import ConfigError
from lmobjective.data import tokenizer_build
from lmobjective.run import launch
from lmobjective.validation import validate


def main(argv, config_flag, output_flag):
  del argv
  cfg = config_flag.value
  try:
    validate(cfg)
    tok = tokenizer_build.build_tokenizer(cfg.data, output_flag.value)
  except ConfigError as e:
    sys.exit(f"error: {e}")
  print(f"{tok.kind} tokenizer, vocab_size={tok.vocab_size}, fingerprint={tok.fingerprint()} "
        f"-> {output_flag.value}/tokenizer")


def cli() -> None:
  config_flag = launch.define_config_flag()
  output_flag = flags.DEFINE_string("output", None, "directory to write the tokenizer into", required=True)
  app.run(functools.partial(main, config_flag=config_flag, output_flag=output_flag),
          flags_parser=launch.parse_flags)


if __name__ == "__main__":
  cli()
