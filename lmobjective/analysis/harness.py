"""lm-evaluation-harness on a restored run or an imported Hugging Face model.

    pip install -e '.[eval]'       # lm_eval and what it brings (datasets, scikit-learn, sacrebleu)

    import lm_eval, lmobjective.harness
    from lm_eval.tasks import TaskManager
    lm = lmobjective.harness.LM("runs/sft")                 # a run (newest checkpoint), or an HF directory
    out = lm_eval.simple_evaluate(model=lm, tasks=["lmobjective_docstring_choice"],
                                  task_manager=TaskManager(include_path=lmobjective.harness.write_tasks("tasks")))

`LM` is a `TemplateLM`, so the harness's own code turns text into token requests (`_encode_pair`: the
context's trailing spaces move to the continuation, context + continuation are encoded whole and split
at the context's length; an empty context becomes `prefix_token_id`); this class scores them with the
framework's one rule (`analysis/loglikelihood.py`, the same code as `evaluate --choice_task` and
`--per_document`):

  * `loglikelihood` -> (summed log-prob, is-greedy) of the last len(continuation) positions of
    `(context + continuation)[-(T+1):][:-1]`, T the run's context length;
  * `loglikelihood_rolling` -> the document's summed log-prob over disjoint windows (each token once;
    the first from the prefix token);
  * `generate_until` -> the KV-cached sampler (greedy unless the request asks `do_sample` with a
    temperature), cut at the first stop string; EOS always stops.

The prefix token is the tokenizer's opener: BOS where the model's tokenizer prepends it, else EOS (what
every document of an lmobjective run follows). Nothing here is imported by the rest of the package;
`lmobjective.harness` is its door.
"""

from __future__ import annotations

import os

try:
  from lm_eval.api.model import TemplateLM
except ImportError as e:  # an optional extra, never a core dependency
  raise ImportError("lmobjective.harness needs lm-evaluation-harness: pip install -e '.[eval]'") from e

from lmobjective.analysis import inspection, loglikelihood
from lmobjective.data import stdlib_choice


def open_model(path: str, step: int | None = None, context_length: int | None = None) -> inspection.Run:
  """A run directory (with checkpoints/) or a Hugging Face model directory (with config.json) as a `Run`."""
  path = os.path.expanduser(path)
  if os.path.isdir(os.path.join(path, "checkpoints")):
    return inspection.restore(path, step=step)
  if os.path.isfile(os.path.join(path, "config.json")):
    return inspection.restore_hf(path, context_length=context_length)
  raise FileNotFoundError(f"{path}: neither a run (no checkpoints/) nor a Hugging Face model (no config.json)")


def write_tasks(directory: str) -> str:
  """The shipped tasks (`data/stdlib_choice.py`) as harness task files in `directory`; for
  `TaskManager(include_path=...)`."""
  stdlib_choice.write(directory)
  return os.path.abspath(directory)


class LM(TemplateLM):
  """`lm_eval`'s model interface over an `inspection.Run` (`path`, or a `run` already restored)."""

  def __init__(self, path: str | None = None, *, run: inspection.Run | None = None, step: int | None = None,
               context_length: int | None = None, batch_size: int = 16, max_gen_toks: int = 256):
    super().__init__()
    if (path is None) == (run is None):
      raise ValueError("LM: give a path (a run or a Hugging Face model directory) or a restored run")
    self.run = run if run is not None else open_model(path, step, context_length)
    self.batch_size, self.max_gen_toks = int(batch_size), int(max_gen_toks)

  @property
  def eot_token_id(self) -> int:
    return self.run.tokenizer.eos_id

  @property
  def prefix_token_id(self) -> int:
    return self.run.tokenizer.opener_id

  @property
  def max_length(self) -> int:
    return self.run.context_length

  def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
    return self.run.tokenizer.encode(string)

  def tok_decode(self, tokens, **kwargs) -> str:
    return self.run.tokenizer.decode([tokens] if isinstance(tokens, int) else tokens)

  def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
    scored = loglikelihood.score(self.run, [(ctx, cont) for _, ctx, cont in requests], self.batch_size)
    return [(s.logprob, s.is_greedy) for s in scored]

  def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
    windows, owner = [], []
    for i, req in enumerate(requests):
      (text,) = req.args
      w = loglikelihood.rolling_windows(self.tok_encode(text), self.prefix_token_id, self.max_length)
      windows += w
      owner += [i] * len(w)
    out = [0.0] * len(requests)
    for i, s in zip(owner, loglikelihood.score(self.run, windows, self.batch_size)):
      out[i] += s.logprob
    return out

  def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
    return [self._generate(*req.args) for req in requests]

  def _generate(self, context: str, gen_kwargs: dict) -> str:
    kw = dict(gen_kwargs or {})
    until = kw.pop("until", None) or []
    until = [until] if isinstance(until, str) else list(until)
    max_new = int(kw.pop("max_gen_toks", self.max_gen_toks))
    room = self.max_length - max_new
    if room < 1:
      raise ValueError(f"generate_until: max_gen_toks={max_new} leaves no room for a context in {self.max_length} tokens")
    ids = self.tok_encode(context)[-room:] or [self.prefix_token_id]
    temperature = float(kw.pop("temperature", 0.0)) if kw.pop("do_sample", False) else 0.0
    s = self.run.sample_ids([ids], (self.eot_token_id,), max_new, temperature, seed=int(kw.pop("seed", 0) or 0))
    new = [int(t) for t in s.tokens[0][s.response_mask[0]]]
    if new and new[-1] == self.eot_token_id:
      new = new[:-1]
    text = self.tok_decode(new)
    for stop in until:
      if stop and stop in text:
        text = text[:text.index(stop)]
    return text
