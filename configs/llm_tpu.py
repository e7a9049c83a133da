r"""A ~1B-parameter decoder LM on C4 on a Cloud TPU v5p pod slice, trained with PSGD Kron.

Check that it fits first, on any machine (needs the `tpu` extra: libtpu, no TPU):

    JAX_PLATFORMS=cpu python -m trainer.main --config configs/llm_tpu.py:v5p-16 --dry_run

then launch it on every host of the slice (docs/pod_slices.md):

    python scripts/launch_tpu.py --name llm1b --slice v5p-16 --zone us-east5-a \
        --project YOUR_PROJECT --workdir gs://YOUR_BUCKET/runs/llm1b

which runs `python -m trainer.main --config configs/llm_tpu.py:v5p-16 --workdir ...` on
each host; jax.distributed finds the other hosts by itself (distributed.mode='auto').

The part after ':' names the slice (SLICES). The model, the tokens per step and the
schedule are the same on every slice; the slice sets the mesh, the target topology of
--dry_run and how many passes (train.microbatches) a step takes. Before the first run:
prepare C4 (c4/en:3.1.0) as array_record under gs://YOUR_BUCKET/tfds with TFDS's C4
builder, put a SentencePiece model of at most 32768 pieces at the tokenizer path, and
replace YOUR_BUCKET below (or override, e.g. --config.data.data_dir=gs://my-bucket/tfds).
"""

import math

from configs.common import base_config

# Slice (accelerator type) -> TPU topology, chips along each axis. v5p-N has N / 2 chips,
# 4 per host. Other generations hold less per chip - v5e ('v5litepod-16' is 'v5e:4x4',
# 16 GiB a chip) and v6e ('v6e-16' is 'v6e:4x4', 32 GiB): add them here, lower
# ROWS_PER_PASS and run --dry_run.
SLICES = {
    "v5p-8": "v5p:2x2x1",  # 4 chips, 1 host
    "v5p-16": "v5p:2x2x2",  # 8 chips, 2 hosts
    "v5p-32": "v5p:2x2x4",  # 16 chips, 4 hosts
    "v5p-64": "v5p:2x4x4",  # 32 chips, 8 hosts
    "v5p-128": "v5p:4x4x4",  # 64 chips, 16 hosts
}
TENSOR = 2  # chips that split each layer's heads, MLP and vocab (the 'tensor' mesh axis)
GLOBAL_BATCH = 256  # rows of 2048 tokens a step: 0.5M tokens, on every slice
# Rows one group of TENSOR chips takes in one forward and backward pass. Attention
# scores (rows x heads x 2048^2) and float32 logits dominate the memory; see
# docs/pod_slices.md for what 32 rows use on v5p.
ROWS_PER_PASS = 32


def get_config(slice_name: str = "v5p-16"):
  if slice_name not in SLICES:
    raise ValueError(f"configs/llm_tpu.py:{slice_name}: unknown slice; known: "
                     f"{', '.join(SLICES)}.")
  topology = SLICES[slice_name]
  chips = math.prod(int(n) for n in topology.split(":")[1].split("x"))
  rows_per_group = GLOBAL_BATCH // (chips // TENSOR)
  config = base_config()

  # Model: 20 layers of width 2048, 16 query and 8 key-value heads of 128: 1.01B params
  # (67M of them the tied 32768 x 2048 embedding). bf16 compute; params and optimizer
  # state stay float32. remat='save_dots' keeps the weight matmuls' outputs for the
  # backward pass and recomputes the rest: about 1/4 less compute than 'full' (which
  # keeps only each layer's input), at 32 rows per pass 59 to 64 GiB a chip on v5p.
  config.model.update(dict(
      vocab_size=32768, d_model=2048, num_layers=20, num_heads=16, num_kv_heads=8,
      mlp_dim=5632, max_seq_len=2048, dtype="bfloat16", remat="save_dots"))

  # Mesh: TENSOR-way tensor parallelism, FSDP over the other chips (-1): weights,
  # gradients and the PSGD factors are spread over every chip, the batch over the fsdp
  # axis. On slices of 256 chips and more, add data parallelism, e.g. (2, -1, 2), so
  # FSDP's all-gathers stay within fewer hosts (the batch then splits over data x fsdp).
  config.mesh.shape = (1, -1, TENSOR)

  # Data: C4 from the bucket through grain; each host reads its own shard of the
  # documents. model.vocab_size must cover the tokenizer's pieces (and EOS).
  config.data.update(dict(
      source="tfds", tfds_name="c4/en:3.1.0", data_dir="gs://YOUR_BUCKET/tfds",
      train_split="train", eval_split="validation",
      tokenizer="gs://YOUR_BUCKET/tokenizers/c4_en_32k.model", seq_len=2048,
      eval_batches=32))

  # 20k steps of 0.5M tokens: 10.5B tokens, about 10 per parameter.
  config.train.update(dict(
      steps=20_000, global_batch_size=GLOBAL_BATCH,
      microbatches=max(1, rows_per_group // ROWS_PER_PASS), log_every=50, eval_every=1000))
  config.optimizer.update(dict(name="kron", learning_rate=3e-4, warmup_steps=1000,
                               weight_decay=0.1, grad_clip_norm=1.0))
  # After the first few thousand steps most steps only apply P: keeping P = Q^T Q in the
  # state saves forming it on each of them (a quarter to a half of those steps' matmuls
  # at these shapes), for one more set of factors (~0.3 floats per parameter, sharded).
  config.optimizer.kron.cache_preconditioner = True
  # Checkpoints go to <workdir>/checkpoints; with a gs:// workdir a preempted or deleted
  # slice resumes from the bucket.
  config.checkpoint.update(dict(save_every=500, max_to_keep=3, keep_every=5000))
  config.dry_run.topology = topology
  return config
