"""Scaling on paper: memory per device and step time for model sizes x meshes (markdown tables).

    python experiments/bench_scaling.py            # the tables in docs/scaling.md

Everything comes from the code: parameter shapes and logical axes from `model.Transformer`
(via `jax.eval_shape`, no memory used), their mesh placement from `sharding.RULES`, bytes per
device from `sharding.memory_per_device`, FLOPs from `model.flops_per_token` and device peaks
from `hardware.PEAK_FLOPS`. Step time assumes an MFU (default 40%) and ignores communication.
"""

from __future__ import annotations

import dataclasses
import os

from absl import app, flags

from lmobjective import sharding
from lmobjective.config import load_config_file
from lmobjective.model import ModelConfig, Transformer, flops_per_token
from lmobjective.run import hardware

_MFU = flags.DEFINE_float("mfu", 0.40, "Assumed model FLOP utilisation for the step-time column.")

GIB = 2**30
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

def model_config(**fields) -> ModelConfig:
  """configs/default.py's model section, resolved, with `fields` replaced."""
  base = ModelConfig.from_config(load_config_file(os.path.join(ROOT, "configs", "default.py")).model,
                                 vocab_size=fields["vocab_size"], context_length=fields.get("max_len", 128))
  return dataclasses.replace(base, **fields)


MODELS = {  # name: (ModelConfig, context, sequences per device per microbatch)
    "GPT-2 124M": (model_config(vocab_size=50_304, num_layers=12, num_heads=12, num_kv_heads=12, embed_dim=768,
                               mlp_dim=3072, max_len=1024, position="learned", norm="layernorm", mlp="gelu",
                               use_bias=True), 1024, 16),
    "1.3B (24L, 2048)": (model_config(vocab_size=50_304, num_layers=24, num_heads=16, num_kv_heads=16,
                                     embed_dim=2048, mlp_dim=5504, max_len=2048), 2048, 4),
    "7B (Llama-2 shape)": (model_config(vocab_size=32_000, num_layers=32, num_heads=32, num_kv_heads=32,
                                       embed_dim=4096, mlp_dim=11_008, max_len=4096, tie_embeddings=False),
                           4096, 1),
    "70B (Llama-2 shape, GQA 8)": (model_config(vocab_size=32_000, num_layers=80, num_heads=64, num_kv_heads=8,
                                               embed_dim=8192, mlp_dim=28_672, max_len=4096,
                                               tie_embeddings=False), 4096, 1),
}

PLATFORMS = {  # name: (device count, HBM GiB per device, hardware.PEAK_FLOPS key, meshes (data, fsdp, tensor))
    "8 x H100 80GB (one node)": (8, 80, "H100", [(8, 1, 1), (1, 8, 1), (2, 4, 1), (1, 4, 2), (1, 1, 8)]),
    "TPU v5p, 64-chip slice (95 GB each)": (64, 95, "TPU v5p",
                                            [(64, 1, 1), (1, 64, 1), (4, 16, 1), (1, 16, 4), (1, 8, 8)]),
    "TPU v5p, 256-chip slice": (256, 95, "TPU v5p", [(4, 64, 1), (1, 64, 4), (2, 16, 8)]),
}


def row(name, cfg, context, seqs, mesh, hbm, peak, chunk):
  sizes = dict(zip(sharding.MESH_AXES, mesh))
  m = sharding.memory_per_device(Transformer(cfg), sizes, batch_per_device=seqs, context=context,
                                 loss_chunk_size=chunk)
  dp = mesh[0] * mesh[1]
  # the tensor axis splits a sequence's work, the data axes split the batch
  tokens = seqs * context * dp
  step_s = tokens * flops_per_token(cfg, context) / (peak * _MFU.value * mesh[0] * mesh[1] * mesh[2])
  fits = "yes" if m["total"] <= 0.9 * hbm * GIB else "no"
  return (f"| {name} | {m['params_total'] / 1e9:.2f} B | ({mesh[0]}, {mesh[1]}, {mesh[2]}) | "
          f"{m['params'] / GIB:.2f} | {m['state'] / GIB:.2f} | {m['remat_activations'] / GIB:.2f} | "
          f"{m['logits'] / GIB:.2f} | {m['total'] / GIB:.1f} | {fits} | {tokens:,} | {step_s * 1e3:,.0f} |")


def main(argv) -> None:
  del argv
  for platform, (n, hbm, kind, meshes) in PLATFORMS.items():
    peak = hardware.PEAK_FLOPS[kind]["bfloat16"]
    print(f"\n### {platform}: peak {peak / 1e12:.0f} TFLOP/s bf16 per device, step time at {_MFU.value:.0%} MFU\n")
    print("| model | params | mesh (data, fsdp, tensor) | params GiB/dev | params+grads+Adam GiB/dev | "
          "remat acts GiB/dev | logits GiB/dev | total GiB/dev | fits 90% HBM | tokens/microbatch | "
          "ms/microbatch |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for name, (cfg, context, seqs) in MODELS.items():
      for mesh in meshes:
        assert mesh[0] * mesh[1] * mesh[2] == n
        chunk = 0 if name.startswith("GPT-2") else 256
        print(row(name, cfg, context, seqs, mesh, hbm, peak, chunk))


if __name__ == "__main__":
  app.run(main)
