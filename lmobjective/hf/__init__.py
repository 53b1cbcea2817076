"""Hugging Face checkpoints in and out: `config.json` <-> `config.model` (`configs`), safetensors keys <->
the params tree (`keymap`), reading onto a mesh (`load`) and writing for `from_pretrained` (`export`)."""
