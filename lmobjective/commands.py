"""What every `python -m lmobjective.<verb>` shares: its own flags under --help, one `error:` line
for a bad flag.

absl's --help lists the flags of the main module only, and exits 1. Behind a door
(`python -m lmobjective.evaluate` runs lmobjective/evaluate.py, whose `cli` is
lmobjective/analysis/evaluate.py's) the main module defines none, so --help listed no flag at all.
`parse_flags` first makes every flag an lmobjective module defined a key flag of the main module
(one process runs one command, so those are its flags), and answers --help with exit status 0.
"""

from __future__ import annotations

import sys
from collections.abc import Callable

from absl import app, flags

HELP = ("--help", "--helpshort", "-?")


def parse_flags(argv: list[str], parse: Callable[[list[str]], list[str]] = flags.FLAGS) -> list[str]:
  """`app.run(main, flags_parser=parse_flags)`; `parse(argv)` does the parsing (default: absl's)."""
  for module, defined in flags.FLAGS.flags_by_module_dict().items():
    if module.startswith("lmobjective."):
      for flag in defined:
        flags.FLAGS.register_key_flag_for_module(sys.argv[0], flag)
  if any(a in HELP for a in argv[1:]):
    app.usage(shorthelp=True, writeto_stdout=True)
    print("\nTry --helpfull to list absl's own flags too.")
    sys.exit(0)
  try:
    return parse(argv)
  except flags.Error as e:
    sys.exit(f"error: {e}")
