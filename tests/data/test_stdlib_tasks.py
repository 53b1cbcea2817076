"""stdlib_tasks.py, stdlib_negatives.py: chat and preference tasks from stdlib docstrings, split by module;
exclude_modules on the pretraining corpora."""

import re
import subprocess
import sys
import textwrap

import ml_collections
import pytest

from configs import default
from lmobjective import data, validation
from lmobjective.config import ConfigError
from lmobjective.data import cache, fingerprint, sources, stdlib_corpus, stdlib_negatives, stdlib_tasks, tokenized
from lmobjective.data import tokenizers

TOK = tokenizers.ByteTokenizer()  # bytes 0..255, pad 256, EOS 257, <|system|> 258 <|user|> 259 <|assistant|> 260 <|end|> 261
DEDENT = "Remove any common leading whitespace from every line in `text`."


def _source(kind, **kw):
  return tokenized._typed("s", default.source(kind, 1.0, **kw))


def _config(kind, T, objective="next_token", **kw):
  c = default.get_config()
  c.data.context_length, c.data.tokenizer.kind = T, "byte"
  c.data.sources = ml_collections.ConfigDict({"s": default.source(kind, 1.0, **kw)})
  c.objective.kind = objective
  if objective in ("dpo", "ipo"):
    c.train.init_from = "runs/pretrained"
  return c


def _task(name):
  return next(t for t in stdlib_tasks.tasks() if t.name == name)


def test_dedent_is_asked_by_signature_and_answered_by_its_first_sentence():
  doc = textwrap.dedent.__doc__
  assert " ".join(doc.split("\n\n")[0].split()) == DEDENT  # the first paragraph is one sentence
  t = _task("textwrap.dedent")
  assert (t.module, t.signature, t.summary) == ("textwrap", "textwrap.dedent(text)", DEDENT)
  assert stdlib_tasks.unit_hash("module", "textwrap") == pytest.approx(0.16082859444134842, abs=1e-15)
  train, val, _ = stdlib_tasks.chat_splits(0.05, None)  # textwrap (0.161) is not held out at 0.05
  conv = next(c for c in train if "`textwrap.dedent(text)`" in c[0]["content"])
  assert conv == [{"role": "user", "content": "Explain `textwrap.dedent(text)` in one sentence."},
                  {"role": "assistant", "content": DEDENT}]
  method = _task("json.encoder.JSONEncoder.encode")  # a method: `self` is not part of the call
  assert (method.signature, method.summary) == ("json.encoder.JSONEncoder.encode(o)",
                                                "Return a JSON string representation of a Python data structure.")
  assert _task("datetime.date.fromordinal").signature == "datetime.date.fromordinal(n)"  # a classmethod: no cls


@pytest.mark.parametrize("doc, want", [
    ("Return the   thing.\n    More about it.\n\nDetails.", "Return the thing."),
    ("Returns the OS name, e.g. 'Linux'. Also Java.", "Returns the OS name, e.g. 'Linux'."),
    ("Join two paths, returning the result!  Next", "Join two paths, returning the result!"),
    ("S.find(sub[, start[, end]]) -> int", ""), ("datetime -> string name of time zone.", ""),  # signatures
    ("Deprecated alias of foo.", ""), ("Helper for bar.", ""), ("Emit.", ""),  # vacuous, too short
    ("Return one of:", ""), ("x" * 150 + " and " + "y" * 60, ""),  # a list follows; over 200 chars
])
def test_summary_table(doc, want):
  assert stdlib_tasks.summary(doc) == want


def test_split_by_module_shared_by_chat_and_pairs():
  held = stdlib_tasks.heldout_modules(0.05)
  assert held == sorted({t.module for t in stdlib_tasks.tasks()
                         if stdlib_tasks.unit_hash("module", t.module) < 0.05})
  assert 0.02 < len(held) / len({t.module for t in stdlib_tasks.tasks()}) < 0.09
  train, val = stdlib_tasks.split(0.05)
  assert {t.module for t in val} == set(held) and not {t.module for t in train} & set(held)
  assert not {t.name for t in train} & {t.name for t in val}
  assert not {t.summary for t in train} & {t.summary for t in val}  # a shared docstring stays in val only
  chat_train, chat_val, _ = stdlib_tasks.chat_splits(0.05, None)
  pair_train, pair_val, info = stdlib_tasks.pair_splits(0.05, None)
  assert info["heldout_modules"] == len(held) and info["tasks_without_negative"] == 0
  assert [c[0]["content"] for c in chat_val] == [p["prompt"][0]["content"] for p in pair_val]
  assert [c[0]["content"] for c in chat_train] == [p["prompt"][0]["content"] for p in pair_train]
  assert len(chat_train) == len(train) and len(chat_val) == len(val)


def test_max_documents_caps_after_the_split_keeping_its_share():
  full_train, full_val, _ = stdlib_tasks.pair_splits(0.1, None)
  train, val, _ = stdlib_tasks.pair_splits(0.1, 200)
  assert len(train) + len(val) == 200
  assert len(val) == round(200 * len(full_val) / (len(full_train) + len(full_val)))
  assert all(p in full_train for p in train) and all(p in full_val for p in val)
  assert stdlib_tasks.pair_splits(0.1, 200)[:2] == (train, val)


def test_prompt_files_are_the_chat_splits_user_turns_and_the_eval_file_spreads_over_the_held_out_ones(tmp_path):
  """write_prompts: the chat splits' user turns with their summaries, `fits` dropping some, and prompts_eval
  every k-th kept held-out prompt (from more than one held-out module), none twice."""
  import json
  chat_train, chat_val, _ = stdlib_tasks.chat_splits(0.1, None)
  short = lambda m: len(m[0]["content"]) < 60
  paths, dropped = stdlib_tasks.write_prompts(str(tmp_path), 0.1, fits=short, eval_count=40)
  read = lambda name: [json.loads(line) for line in open(paths[name])]
  held = read("prompts_heldout")
  assert [r["prompt"] for r in held] == [c[:1] for c in chat_val if short(c[:1])]
  assert dropped["prompts_heldout"] == len(chat_val) - len(held) > 0
  assert [r["summary"] for r in read("prompts_train")] == [c[1]["content"] for c in chat_train if short(c[:1])]
  sub = read("prompts_eval")
  assert len(sub) == 40 and sub == [held[i * len(held) // 40] for i in range(40)]
  assert len({r["name"] for r in sub}) == 40 and len({r["name"].split(".")[0] for r in sub}) > 3


_DIGEST = """
import hashlib, json
from lmobjective.data import stdlib_corpus, stdlib_negatives, stdlib_tasks
tasks = stdlib_tasks.tasks_of(stdlib_corpus.stdlib_files()[::6])
print(hashlib.sha256(json.dumps([[vars(t) for t in tasks], stdlib_negatives.draw(tasks)]).encode()).hexdigest())
"""


def test_records_are_the_same_in_every_process():
  other = subprocess.run([sys.executable, "-c", _DIGEST], capture_output=True, text=True, check=True,
                         env={"PYTHONHASHSEED": "7", "PYTHONPATH": ":".join(sys.path)}).stdout
  here = {}
  exec(_DIGEST.replace("print(", "here['digest'] = ("), {"here": here})
  assert other == here["digest"] + "\n" and len(other) == 65
  assert sources.load_source("s", _source("stdlib_pairs")) == sources.load_source("s", _source("stdlib_pairs"))


def test_kinded_pairs_are_the_pairs_with_the_kind_that_drew_their_negative():
  train, val, info = stdlib_tasks.kinded_pair_splits(0.1, 300)
  assert ([p for p, _ in train], [p for p, _ in val], info) == stdlib_tasks.pair_splits(0.1, 300)
  tasks_val = stdlib_tasks.split(0.1)[1]
  kind_of = dict(zip((t.summary for t in tasks_val), stdlib_negatives.draw(tasks_val)[1]))
  assert [k for _, k in val] == [kind_of[p["chosen"]] for p, _ in val]
  assert {k for _, k in val} >= {k for k, share in stdlib_negatives.DESIGN.items() if share > 0}


@pytest.mark.parametrize("design", [None, {"hard": 0.5, "random": 0.5, "corrupted": 0.0, "swapped": 0.0, "repeated": 0.0}],
                         ids=["default", "prompt_only_kinds"])
def test_negatives_are_never_the_answer_and_follow_the_design(design, monkeypatch):
  if design is not None:  # the kinds the default design leaves out still make what they claim
    monkeypatch.setattr(stdlib_negatives, "DESIGN", design)
  train, _ = stdlib_tasks.split(0.05)
  rejected, kinds = stdlib_negatives.draw(train)
  by_summary = {}
  for t in train:
    by_summary.setdefault(t.summary, []).append(t)
  for t, r, k in zip(train, rejected, kinds):
    assert r != t.summary
    if k == "hard":  # another function's summary, of its module or of its name
      assert any(o.module == t.module or o.name.rsplit(".", 1)[1] == t.name.rsplit(".", 1)[1]
                 for o in by_summary[r])
    elif k == "random":
      assert r in by_summary
    elif k == "corrupted":  # one word replaced
      a, b = t.summary.split(" "), r.split(" ")
      assert len(a) == len(b) and sum(x != y for x, y in zip(a, b)) == 1, (t.summary, r)
    elif k == "swapped":  # two different words exchanged: the same words, in another order
      a, b = (re.findall(r"\w+", x.lower()) for x in (t.summary, r))
      assert sum(x != y for x, y in zip(a, b, strict=True)) == 2 and sorted(a) == sorted(b), (t.summary, r)
    else:  # "repeated": words[s:s+n] said again in place of words[s+n:s+2n], 2 <= n <= 4
      a, b = t.summary.split(" "), r.split(" ")
      assert len(a) == len(b) and any(b[:s + n] == a[:s + n] and b[s + n:s + 2 * n] == a[s:s + n] and
                                      b[s + 2 * n:] == a[s + 2 * n:] for n in range(2, 5) for s in range(len(a) - 2 * n + 1)), (t.summary, r)
  shares = stdlib_negatives.shares(kinds)["negative_shares"]
  for k, want in stdlib_negatives.DESIGN.items():
    assert abs(shares[k] - want) < 0.025, (k, shares)  # +-2.5 standard errors at n ~ 3900, fallbacks included


def test_exclude_modules_leaves_the_modules_out_of_code_and_prose():
  held = stdlib_tasks.heldout_modules(0.05) + ["textwrap"]
  files = [p for p in stdlib_corpus.stdlib_files() if stdlib_corpus.module_name(p) in held]
  assert len(files) == len(held) == 18  # one file per module
  read = lambda p: open(p, encoding="utf-8").read()
  full = sources.load_source("s", _source("python_stdlib", val_fraction=0.05))
  cut = sources.load_source("s", _source("python_stdlib", val_fraction=0.05, exclude_modules=",".join(held)))
  assert len(full.train) + len(full.val) - len(cut.train) - len(cut.val) == 18
  assert not set(map(read, files)) & set(cut.train + cut.val)
  sample = set(stdlib_corpus.stdlib_files()[::10]) | set(files)  # prose: parse a sample only (a full parse is ~4 s)
  some = lambda p: read(p) if p in sample else ""
  with_docs = sum(bool(stdlib_corpus._module_docstrings(read(p))) for p in files)
  assert with_docs == 18  # each has a task, so a docstring
  assert (len(stdlib_corpus.prose_documents(some)) - len(stdlib_corpus.prose_documents(some, tuple(held)))
          == with_docs)
  prose = sources.load_source("s", _source("stdlib_prose", val_fraction=0.05, exclude_modules=",".join(held)))
  train_text = " ".join(" ".join(d.split()) for d in prose.train)
  val_tasks = stdlib_tasks.split(0.05)[1]
  kept = [t.name for t in val_tasks if t.summary in train_text]
  assert DEDENT not in train_text and len(kept) <= 0.03 * len(val_tasks)  # only summaries another module repeats
  assert DEDENT in " ".join(" ".join(stdlib_corpus._module_docstrings(read(p)).split()) for p in files)


def test_default_sources_keep_their_fingerprints_and_cache_keys():
  for name, s in default.get_config().data.sources.items():
    typed = tokenized._typed(name, s)
    assert typed.exclude_modules == ""
    old_fields = {k: v for k, v in vars(typed).items() if k not in ("weight", "exclude_modules")}
    old_fields["markov"] = vars(typed.markov)
    old_content = stdlib_corpus.fingerprint() if s.kind != "markov" else "markov"
    assert sources.fingerprint(name, typed) == old_content
    assert sources.content_fingerprint(name, typed) == fingerprint.of_builtin(old_content)
    assert tokenized.cache_key(name, s, TOK) == cache.key(
        {"source": old_fields, "content": old_content, "tokenizer": TOK.fingerprint()})
  excluded = _source("python_stdlib", exclude_modules="textwrap")
  assert sources.fingerprint("s", excluded) == stdlib_corpus.fingerprint() + "|exclude=textwrap"
  assert tokenized.cache_key("s", excluded, TOK) != tokenized.cache_key("s", _source("python_stdlib"), TOK)


def test_an_edit_of_the_task_or_negative_code_is_a_new_cache_key(tmp_path, monkeypatch):
  """The records are made by code, not read from files: its source is part of the key (no version to bump)."""
  pairs = _source("stdlib_pairs")
  before = tokenized.cache_key("s", pairs, TOK)
  edited = tmp_path / "stdlib_negatives.py"
  assert '"hard": 0.0' in open(stdlib_negatives.__file__).read()  # the edit below changes the code
  edited.write_text(open(stdlib_negatives.__file__).read().replace('"hard": 0.0', '"hard": 0.05'))
  monkeypatch.setattr(stdlib_negatives, "__file__", str(edited))
  stdlib_tasks.code_digest.cache_clear()
  try:
    assert tokenized.cache_key("s", pairs, TOK) != before
  finally:
    monkeypatch.undo()
    stdlib_tasks.code_digest.cache_clear()
  assert tokenized.cache_key("s", pairs, TOK) == before


@pytest.mark.parametrize("kind, value, match", [
    ("python_stdlib", "textwrap,nosuchmodule", "exclude_modules='textwrap,nosuchmodule': 'nosuchmodule' is not a module"),
    ("stdlib_chat", "textwrap", "exclude_modules='textwrap': applies to kind python_stdlib or stdlib_prose, not"),
    ("markov", "textwrap", "applies to kind python_stdlib or stdlib_prose, not 'markov'"),
])
def test_exclude_modules_refusals(kind, value, match):
  c = _config(kind, 64, exclude_modules=value)
  with pytest.raises(ConfigError, match=match) as e:
    validation.validate(c)
  assert "data.sources.s.exclude_modules" in str(e.value) and "\n" not in str(e.value)
  validation.validate(_config("stdlib_prose", 64, exclude_modules=" textwrap , json.decoder"))


def test_objectives_take_the_matching_stdlib_kinds():
  validation.validate(_config("stdlib_pairs", 64, objective="dpo"))
  validation.validate(_config("stdlib_chat", 64))
  with pytest.raises(ConfigError, match="data.sources.s.kind='stdlib_chat': with objective.kind='dpo'"):
    validation.validate(_config("stdlib_chat", 64, objective="dpo"))
  with pytest.raises(ConfigError, match="a stdlib_pairs source needs a preference objective"):
    validation.validate(_config("stdlib_pairs", 64))


def test_stdlib_chat_rows_mask_exactly_the_assistant_tokens(tmp_path):
  c = _config("stdlib_chat", 384, max_documents=40)
  pipe = data.build_pipeline(c.data, TOK, seed=0, batch_size=8, cache_dir=str(tmp_path))
  assert pipe.rows_per_example == 1 and pipe.stats(0)["sources"]["s"]["truncated_tokens"] == 0
  summaries, seen = {t.summary for t in stdlib_tasks.tasks()}, 0
  b = pipe.batch(0)
  for r in range(8):
    for seg in range(1, b["segment_ids"][r].max() + 1):
      at = b["segment_ids"][r] == seg
      text = TOK.decode(b["inputs"][r][at])
      assert text.startswith("<|user|>\n")
      answer = text.split("<|assistant|>\n")[1].split("<|end|>")[0]
      assert answer in summaries
      assert TOK.decode(b["targets"][r][at & b["loss_mask"][r]]) == answer + "<|end|>"
      seen += 1
  assert b["loss_mask"].sum() == sum(len(a.encode()) + 1 for a in _answers(b)) and seen > 8


def _answers(b):
  texts = TOK.decode(b["inputs"][b["segment_ids"] > 0]).split("<|assistant|>\n")[1:]
  return [t.split("<|end|>")[0] for t in texts]


def test_stdlib_pairs_batch_holds_two_rows_per_pair(tmp_path):
  c = _config("stdlib_pairs", 512, objective="simpo", max_documents=60, max_prompt_length=320)
  pipe = data.build_pipeline(c.data, TOK, seed=0, batch_size=4, cache_dir=str(tmp_path))
  b = pipe.batch(0)
  assert pipe.rows_per_example == 2 and b["inputs"].shape == (8, 512)
  pairs = sources.load_source("s", _source("stdlib_pairs", max_documents=60)).train
  train = {p["prompt"][0]["content"]: p for p in pairs}
  for i in range(4):
    rows = [TOK.decode(b["inputs"][2 * i + k][b["segment_ids"][2 * i + k] > 0]) for k in (0, 1)]
    prompt = rows[0].split("<|end|>")[0][len("<|user|>\n"):]
    assert rows[1].startswith(rows[0].split("<|assistant|>\n")[0])  # the same prompt in both rows
    scored = [TOK.decode(b["targets"][2 * i + k][b["loss_mask"][2 * i + k]]) for k in (0, 1)]
    assert scored == [train[prompt]["chosen"] + "<|end|>", train[prompt]["rejected"] + "<|end|>"]
  st = pipe.stats(1)["sources"]["s"]
  assert st["pairs"] == 56 and sum(st["negative_counts"].values()) == 60  # 60 pairs: 56 train, 4 val
