"""experiments/rl_addition.py's exact tests, and configs/addition.py's stages with the experiment's flags."""

import importlib.util
import os

import numpy as np
import pytest

from _tiny import ROOT
from lmobjective import validation
from lmobjective.analysis import stack


def _experiment():
  spec = importlib.util.spec_from_file_location("rl_addition", os.path.join(ROOT, "experiments", "rl_addition.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_exact_p_by_hand():
  """b = 10, c = 2: 2 * (C(12,0) + C(12,1) + C(12,2)) / 2^12 = 2 * 79 / 4096."""
  exact_p = _experiment().exact_p
  assert exact_p(10, 2) == 0.03857421875 == exact_p(2, 10)
  assert exact_p(0, 0) == 1.0 and exact_p(3, 3) == 1.0  # no discordant pair; a tie caps at 1
  assert exact_p(6, 0) == 2 / 64
  assert exact_p(5, 0) == 2 / 32 > 0.05  # five of five one way is not significant two-sided


def test_exact_p_is_the_stack_mcnemar():
  """The same test as analysis/stack.py's McNemar on the same discordant counts."""
  rng = np.random.default_rng(0)
  before, after = rng.random(200) < 0.3, rng.random(200) < 0.45
  m = stack.mcnemar(before, after)
  assert _experiment().exact_p(m["gained"], m["lost"]) == m["p_value"]


@pytest.mark.parametrize("stage", ["pretrain", "sft", "rl"])
def test_stages_validate_with_the_experiments_flags(stage, tmp_path):
  exp = _experiment()
  origin = {"pretrain": None, "sft": "pretrained", "rl": "sft"}[stage]
  c = exp.load_stage_config(stage, exp.stage_flags(str(tmp_path), stage, origin))
  validation.validate(c)
  assert exp.load_stage_config(stage, exp.stage_flags(str(tmp_path), stage, origin, seed=3)).seed == 3  # --seed
  paths = [s.path for s in c.data.sources.values()] + ([c.rl.eval_prompts] if stage == "rl" else [])
  assert all(p.startswith(str(tmp_path / "data")) for p in paths)
  if stage == "rl":
    assert c.objective.kind == "rloo" and c.data.sources.prompts.val_fraction == 0.0
