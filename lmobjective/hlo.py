"""What a compiled program does, read from its text: sharding constraints, collectives, memory.

Equal losses across meshes do not show how XLA laid a program out; these readers do. They take
`jax.stages.Lowered.as_text()` (StableHLO before partitioning: the declared constraints) and
`jax.stages.Compiled.as_text()` (HLO after SPMD partitioning: per-device shapes and the
collectives GSPMD/Shardy inserted), as returned by `sharding.Program.lower/compile`.
"""

from __future__ import annotations

import collections
import re
from typing import NamedTuple

COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")
DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "bf16": 2, "f16": 2, "s16": 2, "u16": 2, "f32": 4, "s32": 4,
               "u32": 4, "f64": 8, "s64": 8, "u64": 8}
_OP = re.compile(r"=\s*(?P<shape>\([^()]*\)|[a-z0-9]+\[[0-9,]*\](?:\{[^}]*\})?)\s+"
                 r"(?P<op>" + "|".join(COLLECTIVES) + r")(?P<start>-start)?\(")
_ARRAY = re.compile(r"\b([a-z]+[0-9]*)\[([0-9,]*)\]")


_OP_NAME = re.compile(r'op_name="([^"]*)"')


class Collective(NamedTuple):
  kind: str  # one of COLLECTIVES
  bytes: int  # per device: the size of the op's result (for a tuple, all its arrays)
  shapes: tuple[str, ...]  # e.g. ("f32[64,192]",)
  op_name: str  # the jax op(s) it serves, e.g. ".../block_0/attn/out/dot_general" ("" if none)


def _array_bytes(dtype: str, dims: str) -> int:
  n = 1
  for d in filter(None, dims.split(",")):
    n *= int(d)
  return n * DTYPE_BYTES.get(dtype, 4)


def collectives(compiled_text: str) -> list[Collective]:
  """Every collective in a compiled (partitioned) HLO module, in program order.

  An async `*-start` op's result tuple holds its operand too; only its last array (the output)
  is counted, so bytes mean the same as for the synchronous op.
  """
  out = []
  for line in compiled_text.splitlines():
    m = _OP.search(line)
    if not m:
      continue
    arrays = _ARRAY.findall(m.group("shape"))
    if m.group("start"):
      arrays = arrays[-1:]
    name = _OP_NAME.search(line)
    out.append(Collective(m.group("op"), sum(_array_bytes(t, d) for t, d in arrays),
                          tuple(f"{t}[{d}]" for t, d in arrays), name.group(1) if name else ""))
  return out


_COMPUTATION = re.compile(r"^(?:ENTRY\s+)?%?([\w.\-]+)\s*\(.*\{\s*$")
_CALLED = re.compile(r"(?:body|condition|to_apply|calls)=%?([\w.\-]+)|(?:branch_computations|called_computations)=\{([^}]*)\}")


def _computations(compiled_text: str) -> dict[str, list[str]]:
  """{computation name: its instruction lines} of an HLO module's text."""
  out, name = {}, None
  for line in compiled_text.splitlines():
    m = _COMPUTATION.match(line)
    if m:
      name = m.group(1)
      out[name] = []
    elif line.startswith("}"):
      name = None
    elif name is not None:
      out[name].append(line)
  return out


def loop_lines(compiled_text: str) -> list[str]:
  """The instructions that run inside a `while` loop's body or condition (or a computation they
  call, fusions included): those repeat every iteration, e.g. every decoded token of a sampler."""
  comps = _computations(compiled_text)
  todo = [m.group(1) for lines in comps.values() for line in lines if " while(" in line
          for m in re.finditer(r"(?:body|condition)=%?([\w.\-]+)", line)]
  seen = set()
  while todo:
    name = todo.pop()
    if name in seen or name not in comps:
      continue
    seen.add(name)
    for line in comps[name]:
      for m in _CALLED.finditer(line):
        todo += [m.group(1)] if m.group(1) else [n.strip().lstrip("%") for n in m.group(2).split(",")]
  return [line for name in comps if name in seen for line in comps[name]]


def loop_collectives(compiled_text: str) -> list[Collective]:
  """The collectives among `loop_lines`: communication paid at every iteration."""
  return collectives("\n".join(loop_lines(compiled_text)))


def collective_bytes(compiled_text: str) -> dict[str, int]:
  """{kind: total bytes per device} over the program (kinds absent from it are 0)."""
  totals = collections.Counter({k: 0 for k in COLLECTIVES})
  for c in collectives(compiled_text):
    totals[c.kind] += c.bytes
  return dict(totals)


def sharding_constraints(lowered_text: str) -> int:
  """Activation sharding constraints in a lowered program (Shardy's or GSPMD's spelling)."""
  return lowered_text.count("sdy.sharding_constraint") + lowered_text.count("@Sharding")


def memory(compiled) -> dict[str, int]:
  """Per-device bytes from `compiled.memory_analysis()`: arguments, outputs, aliased, temporaries.

  `state` = arguments + outputs - aliased (donated buffers counted once): what stays resident
  across steps; `temp` is the scratch the step needs on top of it.
  """
  m = compiled.memory_analysis()
  out = {"argument": int(m.argument_size_in_bytes), "output": int(m.output_size_in_bytes),
         "alias": int(m.alias_size_in_bytes), "temp": int(m.temp_size_in_bytes)}
  out["state"] = out["argument"] + out["output"] - out["alias"]
  return out
