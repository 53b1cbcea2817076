"""The default experiment: a small modern decoder on real, offline text.

Three sources are mixed by token share: Python standard-library source code ("code"),
English prose drawn from it ("prose": docstrings and the pydoc topic pages), and a
seeded Markov chain whose exact entropy rate is known ("markov"), so the curves show
how close the model gets to a floor.

Every key the framework reads is declared here, once. Presets (`tiny.py`,
`gpt2_124m.py`) and experiments start from this function and override values;
they never add keys. Two keys default to another key's value and stay independent:
`model.max_len` (None = data.context_length) and `optimizer.decay_steps` (None = train.steps);
`lmobjective.config.max_len` / `decay_steps` resolve them.
"""

import ml_collections
from ml_collections import config_dict

placeholder = config_dict.placeholder


def source(kind: str, weight: float, **overrides) -> ml_collections.ConfigDict:
  """One named data source. Every source declares every field; `kind` picks which apply."""
  s = ml_collections.ConfigDict()
  s.kind = kind  # python_stdlib | stdlib_prose | markov | stdlib_chat | stdlib_pairs | text | jsonl | parquet | array_record | chat_jsonl | preference_jsonl | prompts_jsonl
  s.weight = float(weight)  # share of *tokens* fed to the model (normalised over sources)
  s.path = placeholder(str)  # file, directory or glob (comma-separated allowed) for file kinds
  s.text_field = "text"  # jsonl / parquet / array_record(json) field holding the document
  s.val_fraction = 0.05  # held-out share: tail of a single file, seeded document split otherwise
  s.max_documents = placeholder(int)  # cap for quick runs; None = all
  # python_stdlib / stdlib_prose: comma-separated stdlib modules left out of both splits ("" = none),
  # e.g. ",".join(stdlib_tasks.heldout_modules(f)) so pretraining never reads the held-out tasks' docstrings.
  s.exclude_modules = ""
  # markov: a seeded order-k chain over `num_symbols` printable characters.
  s.markov = ml_collections.ConfigDict()
  s.markov.order = 1
  s.markov.num_symbols = 16
  s.markov.concentration = 0.2  # Dirichlet concentration of each transition row (lower = lower entropy)
  s.markov.seed = 1234
  s.markov.num_documents = 2000
  s.markov.document_length = 1000  # symbols per document
  # chat_jsonl / stdlib_chat: conversations rendered through a template; loss on assistant tokens only if set.
  # stdlib_chat / stdlib_pairs: docstring tasks split by held-out module (val_fraction), see data/README.md.
  s.only_train_on_assistant = True
  # preference_jsonl / stdlib_pairs: {"prompt", "chosen", "rejected"} per line, plain strings or chat messages. A
  # pair is two padded rows (chosen, rejected) of context_length.
  s.max_prompt_length = placeholder(int)  # a long prompt keeps its end (the turn nearest the response); None = context_length // 2
  s.max_response_length = placeholder(int)  # a long response keeps its start; None = the rest of the row
  s.update(overrides)
  return s


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  del arg
  c = ml_collections.ConfigDict()
  c.seed = 0


  # ---- data ---------------------------------------------------------------
  c.data = ml_collections.ConfigDict()
  c.data.context_length = 128  # tokens per training example (inputs; targets shifted by one)
  c.data.packing = "concat"  # concat: docs joined with EOS, cut into rows | window: random offsets (nanoGPT)
  c.data.document_masking = True  # attend only within a document (False = GPT-style cross-document attention)
  c.data.cache_dir = placeholder(str)  # pre-tokenization cache; None = ~/.cache/lmobjective
  c.data.tokenizer = ml_collections.ConfigDict()
  c.data.tokenizer.kind = "sentencepiece"  # sentencepiece | char | byte | hf (a Hugging Face tokenizer.json: data.tokenizer.path = its directory)
  c.data.tokenizer.model_type = "bpe"  # bpe | unigram (sentencepiece only)
  c.data.tokenizer.vocab_size = 2048
  c.data.tokenizer.sample_lines = 200_000  # seeded sample of the mixture's train splits used to train it
  c.data.tokenizer.seed = 0  # seed of that sample (independent of c.seed: the vocabulary stays put)
  c.data.tokenizer.path = placeholder(str)  # an existing tokenizer file to use instead of training
  c.data.sources = ml_collections.ConfigDict()
  c.data.sources.code = source("python_stdlib", 0.6)
  c.data.sources.prose = source("stdlib_prose", 0.3)
  c.data.sources.markov = source("markov", 0.1)
  # The mixture from a given step on, e.g. "500:code=0.2,prose=0.7,markov=0.1" (stages joined by ";"):
  # each source's rows carry on where they stopped, none replayed or skipped; "" = one mixture.
  c.data.mixture_stages = ""

  # ---- model --------------------------------------------------------------
  c.model = ml_collections.ConfigDict()
  c.model.num_layers = 4
  c.model.num_heads = 4
  c.model.num_kv_heads = placeholder(int)  # None = num_heads; fewer = grouped-query attention
  c.model.embed_dim = 256
  c.model.head_dim = placeholder(int)  # None = embed_dim // num_heads (Qwen3 and others set it apart)
  c.model.mlp_dim = placeholder(int)  # None = 4*embed_dim (gelu, relu2) or 8/3*embed_dim rounded to 64 (swiglu)
  c.model.max_len = placeholder(int)  # longest context the model supports; None = data.context_length
  c.model.vocab_size = placeholder(int)  # None = the tokenizer's vocabulary size; larger pads the embedding and head, the padded ids' logits -inf everywhere
  c.model.position = "rope"  # rope | learned
  c.model.rope_theta = 10_000.0
  c.model.norm = "rmsnorm"  # rmsnorm | layernorm
  c.model.norm_eps = placeholder(float)  # None = 1e-6 (rmsnorm) or 1e-5 (layernorm); imported models read theirs from config.json
  c.model.mlp = "swiglu"  # swiglu | gelu | relu2 (relu(x)^2, modded-nanogpt); gelu and relu2 are ungated
  c.model.qk_norm = False  # RMSNorm of q and k per head (learned scale over head_dim, 1 at init) before rope (OLMo 2, Gemma 3)
  c.model.use_bias = False  # biases on every projection and LayerNorm (GPT-2)
  c.model.attention_bias = "none"  # none | qkv (Qwen2) | qkvo (Llama's attention_bias): biases there only
  c.model.mlp_bias = False  # biases on the MLP's projections only (Llama's mlp_bias)
  c.model.tie_embeddings = True  # False = a separate LM head
  c.model.dropout = 0.0
  c.model.init_std = 0.02
  c.model.param_dtype = "float32"
  c.model.compute_dtype = "float32"  # float32 | bfloat16 (params stay in param_dtype)
  c.model.attention = "auto"  # auto (cudnn on GPU with bf16, else xla) | xla | cudnn
  c.model.remat = "none"  # none | full | dots_saveable
  c.model.scan_layers = False

  # ---- objective ----------------------------------------------------------
  c.objective = ml_collections.ConfigDict()
  c.objective.z_loss = 0.0  # weight of mean(logsumexp^2) added to the training loss
  c.objective.kind = "next_token"  # next_token | dpo | ipo | simpo (preference objectives read preference_jsonl / stdlib_pairs pairs) | rloo | grpo | reinforce | ppo (config.rl; a prompts_jsonl source) | reward_model (Bradley–Terry on pairs; a score head)
  c.objective.beta = 0.1  # preference objectives: β (DPO/IPO: of the log-ratio to the reference; SimPO: of the mean log-prob); RL: of the KL to the reference (0 = none)
  c.objective.label_smoothing = 0.0  # DPO/SimPO: conservative DPO's ε (share of flipped labels); 0 = the paper
  c.objective.rpo_alpha = 0.0  # preference objectives: + α·(chosen response's NLL per token), RPO (TRL's rpo_alpha); 0 = off
  c.objective.simpo_gamma = 0.0  # SimPO's target margin γ (TRL's simpo_gamma; SimPO's code takes γ/β); 0 for every other kind
  # DPO/IPO: the frozen reference's log-probs. cached: computed once per pair before training, stored beside
  # the tokenized data (lmobjective/run/reference_cache.py), read from the batch (no reference forward in the
  # step); live: the reference's forward in every step. SimPO and next_token have no reference: leave it.
  c.objective.reference = "cached"
  c.objective.center_rewards_coefficient = 0.0  # reward_model: + c·(r_w + r_l)² per pair (TRL's center_rewards_coefficient), pins the reward's free constant near 0; 0 = off
  c.objective.loss_chunk_size = 0  # >0: fuse the LM head with the loss over chunks of this many positions (no [B,T,V] logits); 0 = dense

  # ---- reward maximisation (objective.kind rloo | grpo | reinforce) ---------
  # Each iteration (train.steps counts them): train.batch_size prompts from the one prompts_jsonl source,
  # num_generations responses each from the sampler, scored by reward_fn, then epochs x num_minibatches
  # updates (state.step and the schedule count those). objective.beta weighs the KL to the frozen reference
  # (train.init_from's params); 0 = no reference is run. docs/objectives.md: the fixed point each choice reaches.
  c.rl = ml_collections.ConfigDict()
  c.rl.num_generations = 4  # responses per prompt (TRL's num_generations): a prompt's group is never split
  c.rl.max_new_tokens = 32  # longest response; one without a stop id is truncated
  c.rl.temperature = 1.0  # the sampling distribution, also the one the loss's log-probs and the reference's are taken at
  c.rl.top_k = 0  # 0 = off (a π* check needs it off: the trainer then scores the truncated distribution)
  c.rl.top_p = 1.0  # 1 = off
  c.rl.epochs = 1  # passes over each iteration's responses (TRL's num_iterations / num_ppo_epochs)
  c.rl.num_minibatches = 1  # updates per pass, each on whole groups; epochs = num_minibatches = 1: the ratio is exactly 1
  c.rl.scale_rewards = "group"  # grpo: divide (R - group mean) by the std of the group | batch | none
  c.rl.kl_placement = "reward"  # reward: -beta*sum_t k1 added to the score | loss: beta*kl_estimator in the loss
  c.rl.kl_estimator = "k1"  # reward: k1 only; loss: k2 | k3 (per token, GRPO) | k2_sequence (1/2 (sum_t log pi/pi_ref)^2)
  c.rl.loss_type = "dapo"  # dapo: tokens of the batch | grpo: mean per sequence, then over sequences | dr_grpo: sequences*max_new_tokens
  c.rl.cliprange = 0.2  # PPO's epsilon: the ratio pi/pi_old clipped to [1-cliprange, 1+cliprange_high]
  c.rl.cliprange_high = placeholder(float)  # None = cliprange (DAPO's clip-higher: larger)
  # PPO (objective.kind=ppo) only: a value head on the policy, per-token rewards (-beta*k1 each token, the score on
  # the last), GAE with gamma and lam, the clipped value loss weighted by vf_coef in the policy's own loss.
  c.rl.gamma = 1.0  # GAE's discount
  c.rl.lam = 0.95  # GAE's lambda
  c.rl.cliprange_value = 0.2  # the value clipped to old value +- this (PPO2)
  c.rl.vf_coef = 0.1  # weight of the value loss in the loss
  c.rl.whiten_advantages = False  # True: GAE advantages whitened over the batch's response tokens (TRL does; it shifts pi*'s beta by N/(N-1))
  c.rl.missing_eos_penalty = 0.0  # subtracted from the score of a response that never stopped (TRL's missing_eos_penalty)
  c.rl.mask_truncated_completions = False  # True: a response that never stopped is left out of the loss
  # "path/to/file.py:function" or "package.module:function", comma-separated: fn(prompts=, completions=, **fields)
  # -> one float (or None: not applicable) per completion; several are combined as a weighted NaN-sum.
  c.rl.reward_fn = ""
  # A reward model's workdir (a run of objective.kind=reward_model, the policy's tokenizer): it scores the sampled
  # ids, beside or instead of reward_fn, as the term `reward_model` (last in reward_weights). None = none.
  c.rl.reward_model = placeholder(str)
  c.rl.reward_weights = ""  # comma-separated, one per reward_fn (then one for reward_model); "" = all 1
  c.rl.eval_prompts = placeholder(str)  # a prompts_jsonl file scored at eval.every_steps (greedy and sampled); None = none
  c.rl.eval_samples = 4  # sampled responses per eval prompt (sampled pass@1 = their mean reward)

  # ---- optimizer ----------------------------------------------------------
  c.optimizer = ml_collections.ConfigDict()
  # adamw: every parameter. muon: the hidden matrices (attention and MLP kernels, seen as (fan-in, fan-out)
  # from their logical axis names, each layer its own matrix) get optax.contrib.muon; embeddings, the LM
  # head, norms and biases keep this AdamW.
  c.optimizer.kind = "adamw"  # adamw | muon
  c.optimizer.learning_rate = 4e-3  # peak (with kind=muon: of the AdamW group, whose rate is the logged lr)
  c.optimizer.end_learning_rate = 3e-4
  # cosine | linear | constant | wsd (warmup-stable-decay: the peak, then a linear decay to
  # end_learning_rate over the last decay_fraction of decay_steps), each after linear warmup
  c.optimizer.schedule = "cosine"
  c.optimizer.warmup_steps = 40
  c.optimizer.decay_steps = placeholder(int)  # warmup+decay length (includes warmup; the end rate holds after it); None = train.steps
  c.optimizer.decay_fraction = 0.2  # wsd: share of decay_steps spent in the final decay (rounded to whole steps)
  c.optimizer.b1 = 0.9
  c.optimizer.b2 = 0.95
  c.optimizer.eps = 1e-8
  c.optimizer.weight_decay = 0.1
  c.optimizer.decay_embeddings = False  # apply weight decay to embedding tables too
  c.optimizer.decay_norms_and_biases = False
  c.optimizer.grad_clip = 1.0  # global-norm clip; 0 disables
  # kind=muon, the Muon group: its schedule is the one above scaled by muon_learning_rate / learning_rate.
  c.optimizer.muon_learning_rate = 0.02  # peak
  c.optimizer.muon_weight_decay = 0.0  # multiplied by the learning rate, like AdamW's
  c.optimizer.muon_momentum = 0.95  # Nesterov momentum

  # ---- training -----------------------------------------------------------
  c.train = ml_collections.ConfigDict()
  c.train.steps = 600
  # A stage that starts from another run: "WORKDIR" (its newest checkpoint) or "WORKDIR:STEP". Loads
  # that run's params (not its optimizer state; this run starts at step 0) and reuses its tokenizer;
  # the params also become the frozen reference of a preference objective. None = from scratch.
  c.train.init_from = placeholder(str)
  c.train.batch_size = 24  # global sequences per optimizer step (all devices, all hosts)
  c.train.grad_accum_steps = 1  # microbatches per step; batch_size must divide evenly
  c.train.log_every_steps = 10
  c.train.nan_policy = "stop"  # non-finite loss/gradient: stop (one-line error, state not saved) | skip the update
  # A diverged run exits with status 3 and its state is never saved (docs/checkpoints.md, "Exit codes").
  c.train.max_skipped_fraction = 0.1  # diverged when more than this share of train.steps was skipped (nan_policy=skip)
  c.train.dead_grad_steps = 3  # diverged, a dead model: the gradient exactly 0 while tokens are scored, this many steps in a row
  c.train.max_param_growth = 100.0  # diverged, exploded: the parameter norm above this multiple of its initial value
  c.train.xla_gpu_flags = False  # add the recommended XLA GPU flags (latency-hiding scheduler, ...) to XLA_FLAGS

  # ---- evaluation ---------------------------------------------------------
  c.eval = ml_collections.ConfigDict()
  c.eval.every_steps = 100
  c.eval.num_batches = 4  # per source
  c.eval.batch_size = 32  # sequences per eval batch (per source: num_batches of them)

  # ---- checkpointing ------------------------------------------------------
  c.checkpoint = ml_collections.ConfigDict()
  c.checkpoint.every_steps = 100  # also saved at the end and on SIGTERM/SIGINT; 0 = only those
  c.checkpoint.keep = 2  # the newest this many are kept
  c.checkpoint.keep_best = False  # also keep the checkpoint with the lowest val_loss
  c.checkpoint.async_save = True  # write in the background; the loop only waits for the host copy
  c.checkpoint.allow_config_change = False  # on resume accept changes to train.steps, eval.*, checkpoint.*, logging, mesh
  c.checkpoint.allow_data_change = False  # on resume accept sources whose content changed since the checkpoint
  c.checkpoint.start_over = False  # every checkpoint damaged: start again at step 0 (old history kept aside)

  # ---- device mesh (product must equal the device count; -1 = the rest) ----
  c.mesh = ml_collections.ConfigDict()
  c.mesh.data = -1
  c.mesh.fsdp = 1
  c.mesh.tensor = 1

  # ---- multi-host (jax.distributed.initialize before any backend use) -----
  c.distributed = ml_collections.ConfigDict()
  c.distributed.auto_detect = False  # call jax.distributed.initialize() and let it detect the cluster (SLURM, TPU pod, MPI)
  c.distributed.coordinator_address = placeholder(str)  # "host:port" of process 0; set = explicit initialisation
  c.distributed.num_processes = placeholder(int)
  c.distributed.process_id = placeholder(int)

  return c
