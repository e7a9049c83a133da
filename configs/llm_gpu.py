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

It is configs/llm_tpu.py's run (model, tokens per step, schedule, optimizer) on other
hardware; prepare C4 and the tokenizer as described there, and replace YOUR_BUCKET (or
use local paths on a shared file system).
"""

from configs import llm_tpu

GPUS_PER_NODE = 8
# Rows one GPU takes in one forward and backward pass (80 GB H100s; lower it for 40 GB
# A100s). More rows per GPU than this are split into train.microbatches passes.
ROWS_PER_PASS = 8


def get_config(nodes: str = "1"):
  if not nodes.isdigit() or int(nodes) < 1:
    raise ValueError(f"configs/llm_gpu.py:{nodes}: give the number of {GPUS_PER_NODE}-GPU "
                     "nodes, e.g. configs/llm_gpu.py:2.")
  gpus = int(nodes) * GPUS_PER_NODE
  if llm_tpu.GLOBAL_BATCH % gpus:
    raise ValueError(f"configs/llm_gpu.py:{nodes}: {gpus} GPUs do not divide the "
                     f"{llm_tpu.GLOBAL_BATCH} rows of a step; use a node count that does.")
  # The TPU config's run (model, data, schedule, optimizer, checkpoints), on GPUs.
  config = llm_tpu.get_config()
  # Mesh: FSDP over every GPU of every node; weights, gradients, the PSGD factors and the
  # batch are all split over the fsdp axis. At 1B parameters no tensor parallelism is
  # needed; for bigger models split heads within a node, e.g. mesh.shape=(1, -1, 8).
  config.mesh.shape = (1, -1, 1)
  config.train.microbatches = max(1, llm_tpu.GLOBAL_BATCH // gpus // ROWS_PER_PASS)
  config.dry_run.topology = ""  # the local devices: the GPUs, or fake CPU devices
  return config
