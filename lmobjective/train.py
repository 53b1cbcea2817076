"""The training command line.

    python -m lmobjective.train --config=configs/default.py --workdir=runs/default \
        --config.train.steps=200

Flags -> `run.train.run(config, workdir, post_run=analysis.post_run.STEPS)`: this module is the
one place where training and the post-run analysis meet, so neither package imports the other.
Exit status: 0 done; 143 after SIGTERM and 130 after SIGINT, each once the current step finished
and a checkpoint was saved; 1 with one `error:` line for a bad or changed config, changed data,
damaged checkpoints, a failed write (a full disk) or a reward function that failed (RL); 3 with one `error:` line when the run
diverged (non-finite, dead or exploded; that state is never saved).

`--cpu_devices=N` (opt-in) runs on N XLA CPU devices, the host's cores split between them (the mesh's
`data` axis then spans them): on a 2-core CPU, `--cpu_devices=2` steps 1.2-1.3x faster than one device
(docs/benchmarks.md). It must be set before JAX starts, so it is a flag of this launcher, not a config
key or a library default.
"""

from __future__ import annotations

import functools
import sys

from absl import app, flags

from lmobjective import commands
from lmobjective import config as config_lib
from lmobjective.rewards import RewardError
from lmobjective.analysis import post_run as post_run_lib
from lmobjective.run import launch
from lmobjective.run.save_watch import WriteFailed
from lmobjective.run.train import Diverged, run

EXIT_DIVERGED = 3


def main(argv, config_flag, workdir_flag, cpu_devices_flag=None) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if workdir_flag.value is None:
    sys.exit("error: --workdir is required (the directory for this run's outputs)")
  if cpu_devices_flag is not None and cpu_devices_flag.value is not None:
    import jax
    jax.config.update("jax_num_cpu_devices", cpu_devices_flag.value)
  if not flags.FLAGS["verbosity"].present:
    from absl import logging as absl_logging
    absl_logging.set_verbosity(absl_logging.WARNING)  # orbax logs every save and restore at INFO
  try:
    run(config_flag.value, workdir_flag.value, post_run=post_run_lib.STEPS)
  except (config_lib.ConfigError, WriteFailed, RewardError) as e:
    sys.exit(f"error: {e}")
  except Diverged as e:
    print(f"error: diverged: {e}", file=sys.stderr, flush=True)
    sys.exit(EXIT_DIVERGED)


def cli() -> None:
  config_flag = launch.define_config_flag()
  workdir_flag = flags.DEFINE_string("workdir", None, "Directory for this run's outputs.")
  cpu_devices_flag = flags.DEFINE_integer("cpu_devices", None, "Run on this many XLA CPU devices (opt-in; "
                                          "set before JAX starts). None: JAX's default (one).", lower_bound=1)
  app.run(functools.partial(main, config_flag=config_flag, workdir_flag=workdir_flag,
                            cpu_devices_flag=cpu_devices_flag),
          flags_parser=functools.partial(commands.parse_flags, parse=launch.parse_flags))


if __name__ == "__main__":
  cli()
