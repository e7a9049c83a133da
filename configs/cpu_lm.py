"""The README's main job: a small byte-level Transformer on the Python stdlib corpus.

Runs on a laptop CPU in a few minutes with nothing to download:
    python -m trainer.main --config configs/cpu_lm.py --workdir runs/cpu_lm
"""

from configs.common import base_config


def get_config():
  config = base_config()
  # 257 byte-level tokens, padded to a multiple of 64 so the vocab shards on any mesh.
  # Unscanned: on CPU, XLA runs the unrolled backward pass faster than the scanned one.
  config.model.update(dict(vocab_size=320, d_model=128, num_layers=4, num_heads=4,
                           mlp_dim=512, max_seq_len=128, scan_layers=False))
  config.data.seq_len = 128
  config.data.eval_batches = 32
  config.train.update(dict(steps=600, global_batch_size=16, log_every=50, eval_every=200))
  # Kron's best of the 400-step sweep with Nesterov momentum (docs/kron_vs_muon.md;
  # AdamW's best: 1e-3 to 2e-3, Muon's: 6e-3).
  config.optimizer.update(dict(learning_rate=6e-3, warmup_steps=50))
  config.checkpoint.save_every = 200
  return config
