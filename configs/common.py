"""Every setting of a run, with its default: config files start here and override.

This file is the config's schema and imports nothing but ml_collections, so reading a
config loads no heavy library. The trainer's modules check these settings; they hold no
defaults of their own. A key that is not here is an error on the command line.
"""

import ml_collections

placeholder = ml_collections.config_dict.placeholder

# Logical axis -> mesh axes for a ('data', 'fsdp', 'tensor') mesh, the one table for the
# model's parameters and activations. 'batch' (data parallelism) spans data and fsdp;
# weights are split over fsdp along the model width and over tensor along heads, MLP and
# vocab; the layer axis of scanned blocks, head_dim and norms are replicated.
# 'kv_heads' needs num_kv_heads divisible by the tensor axis (else map it to None).
MESH_RULES = (
    ("batch", ("data", "fsdp")), ("layers", None), ("vocab", "tensor"), ("embed", "fsdp"),
    ("heads", "tensor"), ("kv_heads", "tensor"), ("kv", None), ("mlp", "tensor"),
    ("norm", None),
)


def base_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.seed = 0
  config.mesh = ml_collections.ConfigDict(dict(
      axes=("data", "fsdp", "tensor"),
      shape=(-1, 1, 1),  # devices along each axis; one may be -1 (all that are left)
      rules=MESH_RULES,
  ))

  # models/transformer.py's TransformerConfig; `name` picks the model (models/registry.py).
  config.model = ml_collections.ConfigDict(dict(
      name="transformer",
      vocab_size=256,  # at least the tokenizer's vocabulary; pad it to divide the mesh
      d_model=128,
      num_layers=4,
      num_heads=4,
      num_kv_heads=placeholder(int),  # None: num_heads (no grouped-query attention)
      mlp_dim=512,
      max_seq_len=256,  # the training length, for the attention term of the FLOPs
      rope_theta=10000.0,
      tie_embeddings=True,  # the output head reuses the embedding table
      scan_layers=True,  # one stacked, scanned block (fast compiles) or unrolled blocks
      unroll_layers=False,  # compile the scanned block once per layer, with no loop
      remat="none",  # 'none' | 'full' | 'save_dots': what the backward pass recomputes
      dtype="float32",  # compute dtype; parameters, logits and loss stay float32
      # Multiplies d_model, num_heads, num_kv_heads and mlp_dim (head_dim stays): one knob
      # for width-transfer studies (the learning rate is scaled by 1 / it).
      width_multiplier=1,
  ))

  # trainer/data: where text comes from and how it becomes batches of tokens.
  config.data = ml_collections.ConfigDict(dict(
      source="stdlib",  # 'stdlib' (Python's own sources) | 'tfds' | 'files'
      tfds_name="",  # e.g. 'lm1b' or 'c4/en', prepared as array_record in data_dir
      # Where the stdlib corpus is built (once, ~8 MB) and prepared TFDS datasets are read.
      data_dir="~/.cache/psgd-train/tfds",
      text_key="text",  # the text feature of a TFDS example
      files_glob="",  # source='files': e.g. '~/corpus/**/*.txt', each file one document
      train_split="train",
      eval_split="validation",  # lm1b has 'test' instead
      tokenizer="bytes",  # 'bytes', or the path of a SentencePiece .model
      seq_len=512,
      shuffle_seed=0,
      eval_batches=16,  # batches per eval, the same count on every process
  ))

  # trainer/optim.py: the optimizer, its schedule and clipping.
  config.optimizer = ml_collections.ConfigDict(dict(
      name="kron",  # 'kron' | 'muon' | 'adamw' | 'lion' | 'sign_sgd' | 'sgd'
      learning_rate=3e-3,  # the peak, after warmup
      warmup_steps=50,
      decay="cosine",  # 'cosine' | 'linear' | 'constant', after warmup
      min_lr_ratio=0.1,  # the decay ends at this fraction of the peak
      b1=0.9,  # momentum
      b2=0.95,  # second-moment EMA of the Adam-like baselines
      weight_decay=0.1,  # decoupled; not on norms and biases
      grad_clip_norm=1.0,  # global-norm clipping of the gradients; 0: off
      # optax.contrib.muon: scale each orthogonalised update to this RMS (AdamW's).
      muon=ml_collections.ConfigDict(dict(consistent_rms=0.2)),
      # psgd.kron arguments beyond the common ones above (help(psgd.scale_by_kron)).
      kron=ml_collections.ConfigDict(dict(
          # QEQ: psgd.kron's default Q0.5EQ1.5 without its Procrustes step. With Nesterov
          # and dense factors it trains the LM as well per step, and its cheaper refit puts
          # Kron ahead of Muon per second (docs/kron_vs_muon.md).
          preconditioner_mode="QEQ",
          # Keep P = Q^T Q in the state: faster steps between refits, +1 set of factors.
          cache_preconditioner=False,
          # Refit probability: 1 for the first flat steps, then exp decay to the floor.
          update_prob_flat_steps=500,
          update_prob_decay=0.001,
          update_prob_floor=0.03,
          preconditioner_lr=0.7,
          whiten_grad=True,  # fit P on the gradients (False: on the momentum)
          # Precondition the momentum's look-ahead, as Muon does: it won on the LM at every
          # lr and seed tried (docs/kron_vs_muon.md); psgd.kron's own default is False.
          nesterov=True,
          max_size_triangular=8192,  # a larger dim gets a diagonal factor
          max_skew_triangular=1.0,  # a dim d with d^2 > this x numel gets a diagonal one,
          max_size_small_dim=1024,  # but a dim up to this size may be skewed up to
          max_skew_small_dim=4.0,  # this: small matrices get dense factors both sides
          memory_save_mode=placeholder(str),  # None | 'one_diag' | 'all_diag'
          block_size=placeholder(int),  # cut larger dims into blocks with own factors
          # Rank >= 3 params (attention's (embed, heads, head_dim)): one matrix with two
          # factors (True), or a factor per dim (False, psgd_torch's layout).
          merge_dims=True,
          # Shard-local blocks: cut each parameter into the shards its devices hold, each
          # with factors of its own, so the preconditioner moves no gradient or momentum
          # between devices (P block-diagonal over the shards; the factors' shapes then
          # depend on the mesh, so a run resumes only on the same mesh).
          shard_local=False,
          lr_style="adam",  # scale the update to Adam's RMS, so AdamW's lr carries over
          mu_dtype=placeholder(str),  # momentum storage dtype; None: the gradient's
          precond_dtype=placeholder(str),  # factor storage dtype; None: float32
          # Matmuls with bfloat16 operands and float32 accumulation on every backend, as
          # TPUs do at default precision: about 2x faster on AMX CPUs (and GPUs), and the
          # fit loses nothing measurable (tests/test_psgd_fitting.py, docs/convergence).
          precond_update_precision="bfloat16",
          precond_grads_precision="bfloat16",
          lax_map_scanned_layers=False,  # map the layers' fits one by one: less memory
      )),
  ))

  config.train = ml_collections.ConfigDict(dict(
      steps=1000,  # the run's length (the learning-rate schedule spans it)
      stop_at=0,  # if > 0: save and exit after this step (the run resumes later)
      global_batch_size=32,
      microbatches=1,  # gradient accumulation: the batch is split into this many parts
      log_every=10,
      eval_every=200,
      max_nonfinite_steps=10,  # stop after this many skipped (non-finite) steps in a row
      peak_flops_per_device=0.0,  # 0: from trainer/hardware.py's table
  ))
  config.checkpoint = ml_collections.ConfigDict(dict(
      save_every=100,
      max_to_keep=3,
      keep_every=placeholder(int),  # keep every N-th step
      async_save=True,
      init_from="",  # another run's workdir, to start from its latest checkpoint
      init_what="params",  # 'params' or 'params_and_optimizer'
      # Resume a checkpoint that has no data position for this run's process count,
      # starting the data stream afresh (otherwise that is an error).
      restart_data=False,
  ))
  # trainer/distributed.py: joining the processes of a multi-host run.
  config.distributed = ml_collections.ConfigDict(dict(
      mode="auto",  # 'auto' (TPU pods, Slurm, ...), 'manual' (the three below) or 'off'
      coordinator_address="",  # manual: host:port of process 0 (every process the same)
      num_processes=placeholder(int),  # manual
      process_id=placeholder(int),  # manual: 0 .. num_processes-1
  ))
  config.dry_run = ml_collections.ConfigDict(dict(
      topology="",  # --dry_run's target, a TPU topology like 'v5p:2x2x2'; '' = local devices
  ))
  return config
