r"""A ~1B-parameter decoder LM on C4 on NVIDIA GPU nodes of 8 GPUs, trained with PSGD Kron.

The part after ':' is the number of nodes. One node (one process with its 8 GPUs):

    python -m trainer.main --config configs/llm_gpu.py:1 --workdir /shared/runs/llm1b

Several nodes, one process each, joined by jax.distributed (docs/pod_slices.md):

    python scripts/launch_gpu.py slurm --nodes 4 --gpus_per_node 8 \
        --config configs/llm_gpu.py:4 --workdir /shared/runs/llm1b

Install with the `cuda` extra (`pip install -e '.[cuda]'`: jax's CUDA 12 wheels).
scripts/launch_gpu.py sets XLA's GPU flags (its --xla_flags, see GPU_XLA_FLAGS there):
the latency-hiding scheduler, so FSDP's all-gathers and reduce-scatters overlap the
matmuls, collectives on a high-priority stream, and larger combined collectives. Set
the same XLA_FLAGS when running one node by hand.

Check the build and the compiled step first, on any machine, with as many fake CPU
devices as the run has GPUs (no memory verdict for CPUs: it checks shapes, shardings
and the compile, and prints the state's bytes per device and the step's cost):

    XLA_FLAGS=--xla_force_host_platform_device_count=8 JAX_PLATFORMS=cpu \
        python -m trainer.main --config configs/llm_gpu.py:1 --dry_run

The model, tokens per step and schedule are those of configs/llm_tpu.py (the same
run on other hardware); prepare C4 and the tokenizer as described there, and replace
YOUR_BUCKET (or use local paths on a shared file system).
"""

from configs.common import base_config

GPUS_PER_NODE = 8
GLOBAL_BATCH = 256  # rows of 2048 tokens a step: 0.5M tokens, on any number of nodes
# Rows one GPU takes in one forward and backward pass (80 GB H100s; lower it for 40 GB
# A100s). More rows per GPU than this are split into train.microbatches passes.
ROWS_PER_PASS = 8


def get_config(nodes: str = "1"):
  if not nodes.isdigit() or int(nodes) < 1:
    raise ValueError(f"configs/llm_gpu.py:{nodes}: give the number of {GPUS_PER_NODE}-GPU "
                     "nodes, e.g. configs/llm_gpu.py:2.")
  gpus = int(nodes) * GPUS_PER_NODE
  if GLOBAL_BATCH % gpus:
    raise ValueError(f"configs/llm_gpu.py:{nodes}: {gpus} GPUs do not divide the "
                     f"{GLOBAL_BATCH} rows of a step; use a node count that does.")
  config = base_config()

  # Model: as configs/llm_tpu.py (1.01B params), bf16 compute, float32 params and
  # optimizer state; remat='save_dots' recomputes all but the weight matmuls' outputs.
  config.model.update(dict(
      vocab_size=32768, d_model=2048, num_layers=20, num_heads=16, num_kv_heads=8,
      mlp_dim=5632, max_seq_len=2048, dtype="bfloat16", remat="save_dots"))

  # Mesh: FSDP over every GPU of every node; weights, gradients, the PSGD factors and the
  # batch are all split over the fsdp axis. At 1B parameters no tensor parallelism is
  # needed; for bigger models split heads within a node, e.g. mesh.shape=(1, -1, 8).
  config.mesh.shape = (1, -1, 1)

  config.data.update(dict(
      source="tfds", tfds_name="c4/en:3.1.0", data_dir="gs://YOUR_BUCKET/tfds",
      train_split="train", eval_split="validation",
      tokenizer="gs://YOUR_BUCKET/tokenizers/c4_en_32k.model", seq_len=2048,
      eval_batches=32))

  config.train.update(dict(
      steps=20_000, global_batch_size=GLOBAL_BATCH,
      microbatches=max(1, GLOBAL_BATCH // gpus // ROWS_PER_PASS), log_every=50,
      eval_every=1000))
  config.optimizer.update(dict(name="kron", learning_rate=3e-4, warmup_steps=1000,
                               weight_decay=0.1, grad_clip_norm=1.0))
  config.optimizer.kron.cache_preconditioner = True
  config.checkpoint.update(dict(save_every=500, max_to_keep=3, keep_every=5000))
  return config
