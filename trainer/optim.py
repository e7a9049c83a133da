"""The optimizer from the config: psgd.kron by default, optax baselines by name."""

from typing import Any, Callable

import jax
import ml_collections
import optax

import psgd

# name -> factory(learning-rate schedule, optimizer config, weight-decay mask). Every
# one decays as AdamW does, decoupled: -lr * weight_decay * p, outside the sign and the
# momentum.
_BASELINES: dict[str, Callable[..., optax.GradientTransformation]] = {
    "adamw": lambda lr, cfg, mask: optax.adamw(lr, b1=cfg.b1, b2=cfg.b2,
                                               weight_decay=cfg.weight_decay, mask=mask),
    "lion": lambda lr, cfg, mask: optax.lion(lr, b1=cfg.b1, b2=cfg.b2,
                                             weight_decay=cfg.weight_decay, mask=mask),
    "sign_sgd": lambda lr, cfg, mask: optax.chain(
        optax.scale_by_sign(), optax.add_decayed_weights(cfg.weight_decay, mask),
        optax.scale_by_learning_rate(lr)),
    "sgd": lambda lr, cfg, mask: optax.chain(
        optax.trace(decay=cfg.b1), optax.add_decayed_weights(cfg.weight_decay, mask),
        optax.scale_by_learning_rate(lr)),
}
OPTIMIZERS = ("kron", "muon", *_BASELINES)
SCHEDULES = ("cosine", "linear", "constant")
# psgd.precond_update_prob_schedule's arguments -> the optimizer.kron settings for them
_UPDATE_PROB_SETTINGS = {"min_prob": "update_prob_floor", "flat_start": "update_prob_flat_steps",
                         "decay": "update_prob_decay"}


def check_config(cfg: ml_collections.ConfigDict) -> None:
  """ValueError naming the setting, before anything is built."""
  if cfg.name not in OPTIMIZERS:
    raise ValueError(f"optimizer.name={cfg.name!r} is unknown; choose one of "
                     f"{', '.join(OPTIMIZERS)}.")
  if cfg.decay not in SCHEDULES:
    raise ValueError(f"optimizer.decay={cfg.decay!r} must be one of {', '.join(SCHEDULES)}.")
  if not cfg.learning_rate > 0:  # NaN too
    raise ValueError(f"optimizer.learning_rate={cfg.learning_rate} must be positive.")
  if cfg.warmup_steps < 0:
    raise ValueError(f"optimizer.warmup_steps={cfg.warmup_steps} must be >= 0.")
  if not 0 <= cfg.min_lr_ratio <= 1:
    raise ValueError(f"optimizer.min_lr_ratio={cfg.min_lr_ratio} must be in [0, 1]: the "
                     "decay ends at this fraction of the peak learning rate.")
  for name in ("b1", "b2"):
    if not 0 <= cfg[name] < 1:
      raise ValueError(f"optimizer.{name}={cfg[name]} must be in [0, 1): it is an EMA's "
                       "decay rate.")
  if cfg.grad_clip_norm < 0:  # a negative max norm flips the gradients' sign
    raise ValueError(f"optimizer.grad_clip_norm={cfg.grad_clip_norm} must be >= 0 (0: no "
                     "clipping).")
  rms = cfg.muon.consistent_rms
  if rms is not None and not rms > 0:
    raise ValueError(f"optimizer.muon.consistent_rms={rms} must be positive, or None for "
                     "Muon's own scaling.")


def muon(schedule: optax.Schedule, cfg: ml_collections.ConfigDict, weight_decay_mask: Any,
         matrix_axes: Any) -> optax.GradientTransformation:
  """optax.contrib.muon with AdamW's hyperparameters carrying over.

  consistent_rms scales each orthogonalised update to AdamW's RMS, so the same learning
  rate and weight decay apply. The matrices to orthogonalise come from the model's
  metadata: a scanned weight's layer axis is a batch axis (each layer its own matrix);
  vectors and vocabulary tables go to Muon's AdamW part, which decays every parameter
  it holds, the norms' scales too: optax's muon takes no mask for that part, and this
  baseline is optax's muon as a user would call it (it did better so on the CPU LM than
  with that part's decay masked; README).
  """
  if matrix_axes is None:
    raise ValueError("optimizer.name='muon' needs the model's matrix axes.")
  dimension_numbers = jax.tree.map(
      lambda axes: None if axes is None else optax.contrib.MuonDimensionNumbers(*axes),
      matrix_axes, is_leaf=lambda x: x is None or isinstance(x, tuple))
  return optax.contrib.muon(
      schedule, beta=cfg.b1, weight_decay=cfg.weight_decay,
      weight_decay_mask=weight_decay_mask, adam_b1=cfg.b1, adam_b2=cfg.b2,
      adam_weight_decay=cfg.weight_decay, consistent_rms=cfg.muon.consistent_rms,
      muon_weight_dimension_numbers=dimension_numbers)


def learning_rate_schedule(cfg: ml_collections.ConfigDict, total_steps: int,
                           width_multiplier: int = 1) -> optax.Schedule:
  """Linear warmup, then cosine / linear decay to min_lr_ratio, or constant.

  The peak is learning_rate / width_multiplier: the learning rate tuned at width 1
  carries over to wider models (muP's hidden-layer rule, applied to all weights); the
  weight-decay coefficient stays, so the per-step decay lr * wd falls as 1 / width.
  """
  peak, warmup = cfg.learning_rate / width_multiplier, min(cfg.warmup_steps, total_steps)
  floor = peak * cfg.min_lr_ratio
  decay_steps = max(total_steps - warmup, 1)
  if cfg.decay == "cosine":
    decay = optax.cosine_decay_schedule(peak, decay_steps, alpha=cfg.min_lr_ratio)
  elif cfg.decay == "linear":
    decay = optax.linear_schedule(peak, floor, decay_steps)
  else:
    decay = optax.constant_schedule(peak)
  return optax.join_schedules([optax.linear_schedule(0.0, peak, warmup), decay], [warmup])


def make_optimizer(cfg: ml_collections.ConfigDict, total_steps: int, *,
                   scanned_layers: Any = None, weight_decay_mask: Any = None,
                   matrix_axes: Any = None, width_multiplier: int = 1,
                   param_sharding: Any = None
                   ) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """(transformation, schedule): clipping by global norm, then the named optimizer.

  `matrix_axes` (Muon only): per parameter, (input axes, output axes) of the matrix it
  is, or None for the parameters Muon leaves to Adam; see models.matrix_axes.
  `param_sharding` (Kron with kron.shard_local only): the params' NamedShardings.
  """
  check_config(cfg)
  schedule = learning_rate_schedule(cfg, total_steps, width_multiplier)
  if cfg.name == "kron":
    kron_args = cfg.kron.to_dict()
    if kron_args.pop("shard_local") and param_sharding is None:
      raise ValueError("optimizer.kron.shard_local=True needs the params' shardings.")
    try:
      update_prob = psgd.precond_update_prob_schedule(
          **{arg: kron_args.pop(setting) for arg, setting in _UPDATE_PROB_SETTINGS.items()})
      tx = psgd.kron(schedule, b1=cfg.b1, weight_decay=cfg.weight_decay,
                     weight_decay_mask=weight_decay_mask, scanned_layers=scanned_layers,
                     preconditioner_update_probability=update_prob,
                     param_sharding=param_sharding if cfg.kron.shard_local else None,
                     **kron_args)
    except ValueError as error:  # psgd names its argument: name the setting instead
      message = str(error).removeprefix("precond_update_prob_schedule: ")
      name, rest = message.split("=", 1) if "=" in message else ("", message)
      name = _UPDATE_PROB_SETTINGS.get(name, name)
      section = "optimizer.kron." if name in cfg.kron else "optimizer."
      raise ValueError(f"{section}{name}={rest}") from None
  elif cfg.name == "muon":
    tx = muon(schedule, cfg, weight_decay_mask, matrix_axes)
  else:
    tx = _BASELINES[cfg.name](schedule, cfg, weight_decay_mask)
  # identity when off: the same state structure either way, so a run can resume with
  # clipping switched on or off.
  clip = optax.clip_by_global_norm(cfg.grad_clip_norm) if cfg.grad_clip_norm else optax.identity()
  return optax.chain(clip, tx), schedule
