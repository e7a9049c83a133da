"""Everything a run needs before data and checkpoints, built from the config alone.

Shared by training and the pre-launch check (`--dry_run`), which builds the same run on
a target TPU topology without touching data or compiling anything it cannot.
"""

import dataclasses
import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import models
import psgd
from trainer import data as data_lib
from trainer import mesh as mesh_lib
from trainer import optim
from trainer import step as step_lib
from trainer import validate


@dataclasses.dataclass(frozen=True)
class Setup:
  """The run's mesh, model, optimizer, shardings and jitted (not yet compiled) steps."""

  config: Any  # the checked config it was built from
  mesh: jax.sharding.Mesh
  rules: tuple
  graphdef: Any
  rest: Any  # non-Param model state (kept out of training)
  tx: optax.GradientTransformation
  schedule: optax.Schedule
  num_params: int
  flops_per_token: float
  state_shardings: step_lib.TrainState
  abstract_state: step_lib.TrainState  # ShapeDtypeStructs carrying the shardings
  batch_sharding: NamedSharding
  init_state: Callable  # () -> TrainState, jitted with the state shardings
  train_step: Callable  # (state, batch) -> (state, metrics), jitted, state donated
  eval_step: Callable  # (params, batch) -> (loss sum, token count), jitted

  def abstract_batch(self) -> dict[str, jax.ShapeDtypeStruct]:
    shape = (self.config.train.global_batch_size, self.config.data.seq_len)
    return {"inputs": jax.ShapeDtypeStruct(shape, jnp.int32, sharding=self.batch_sharding),
            "targets": jax.ShapeDtypeStruct(shape, jnp.int32, sharding=self.batch_sharding),
            "mask": jax.ShapeDtypeStruct(shape, jnp.bool_, sharding=self.batch_sharding)}

  def to_global(self, local_batch: dict) -> dict[str, jax.Array]:
    """This process's rows of a batch -> the global batch, split as the step expects."""
    rows = self.config.train.global_batch_size
    return {k: jax.make_array_from_process_local_data(
                self.batch_sharding, np.asarray(v), global_shape=(rows, *np.shape(v)[1:]))
            for k, v in local_batch.items()}

  def evaluate(self, params) -> dict[str, float]:
    """Mean eval loss (and bits per byte with the byte tokenizer) of `params` over one
    full, deterministic pass of the configured eval split."""
    data, batch_size = self.config.data, self.config.train.global_batch_size
    batches = data_lib.make_eval_iterator(data, batch_size, jax.process_index(),
                                          jax.process_count())
    sums = np.array([jax.device_get(self.eval_step(params, self.to_global(b)))
                     for b in batches])
    loss = float(sums[:, 0].sum() / max(sums[:, 1].sum(), 1.0))
    metrics = {"eval/loss": loss}
    if data.tokenizer == "bytes":
      metrics["eval/bits_per_byte"] = loss / math.log(2)
    return metrics


def _check_rules(rules, mesh) -> None:
  """Every mesh axis a rule names is one of the mesh's."""
  for name, target in rules:
    missing = [a for a in mesh_lib.axis_names(target) if a not in mesh.shape]
    if missing:
      raise ValueError(
          f"mesh.rules maps {name!r} to {target!r}, but mesh.axes={tuple(mesh.shape)} has "
          f"no axis {missing[0]!r}: map it to one of them or to None in mesh.rules.")


def _check_batch(config, mesh, rules) -> None:
  """Batch settings that cannot work, before anything is compiled."""
  batch, micro = config.train.global_batch_size, config.train.microbatches
  dp = mesh_lib.data_parallel_size(mesh, rules)
  if micro < 1 or batch % micro:
    raise ValueError(f"train.global_batch_size={batch} must be divisible by "
                     f"train.microbatches={micro}.")
  if (batch // micro) % dp:
    raise ValueError(f"train.global_batch_size / train.microbatches = {batch // micro} must "
                     f"be divisible by the data-parallel size {dp} (mesh axes "
                     f"{mesh_lib.batch_axes(rules)} of mesh {dict(mesh.shape)}).")
  processes = len({d.process_index for d in mesh.devices.flat})  # a target's, in dry runs
  if batch % processes:
    raise ValueError(f"train.global_batch_size={batch} must be divisible by the "
                     f"{processes} processes.")
  # Each process loads its own batch / processes rows: its devices must hold exactly
  # those rows, none of another process's (else the batch axes replicate rows over
  # processes, and each would feed different data for the same rows).
  rows = {}
  for device, (index,) in mesh_lib.batch_sharding(mesh, rules).devices_indices_map(
      (batch,)).items():
    rows.setdefault(device.process_index, set()).update(range(*index.indices(batch)))
  held = [len(r) for r in rows.values()]
  if any(n != batch // processes for n in held) or sum(held) != batch:
    raise ValueError(
        f"The batch axes {mesh_lib.batch_axes(rules)} of mesh {dict(mesh.shape)} do not split "
        f"the batch over the {processes} processes (each loads its own rows): make their "
        f"sizes multiply to a multiple of {processes} (e.g. a larger mesh.shape 'data' "
        "size, and a smaller 'tensor' one).")


def _check_divisible(abstract_params, param_specs, mesh) -> None:
  """Every sharded dim must divide by its mesh axes; say which param and rule if not."""
  flat_specs = jax.tree.leaves(param_specs, is_leaf=lambda x: isinstance(x, P))
  for (path, leaf), spec in zip(jax.tree_util.tree_flatten_with_path(abstract_params)[0],
                                flat_specs):
    for size, entry in zip(leaf.shape, spec):
      axes = mesh_lib.axis_names(entry)
      parts = math.prod(mesh.shape[a] for a in axes)
      if size % parts:
        raise ValueError(
            f"Parameter {jax.tree_util.keystr(path)} of shape {leaf.shape} has a dim of size "
            f"{size} sharded over mesh axes {axes} ({parts} ways), which does not divide it. "
            "Pick sizes divisible by the mesh (e.g. pad model.vocab_size), or map that "
            "logical axis to None in mesh.rules.")


def _opt_state_specs(config, tx, abstract_params, param_specs, mesh, scanned_layers):
  """Kron's factors by psgd's rule; every optimizer's params-shaped leaves (moments,
  Muon's momentum) like their parameter; the rest (counts, scalars) replicated."""
  abstract_state = jax.eval_shape(tx.init, abstract_params)
  return psgd.state_partition_specs(abstract_state, abstract_params, param_specs, mesh,
                                    scanned_layers, config.optimizer.kron.shard_local)


def build_setup(config, devices=None, check_vocab: bool = True,
                unroll_loops: bool = False) -> Setup:
  """Check the config, then build the run on `devices` (default: all).

  check_vocab=False skips building the tokenizer, for checks on machines without it.
  unroll_loops=True traces the scanned layers and the microbatches one after another,
  with no loop: the same results from a bigger program, for the dry run's cost count.
  """
  validate.check_config(config)
  if unroll_loops:
    config = config.copy_and_resolve_references()
    config.model.unroll_layers = True

  # Mesh.
  mesh = mesh_lib.make_mesh(config.mesh.axes, config.mesh.shape, devices)
  rules = tuple(tuple(rule) for rule in config.mesh.rules)
  _check_rules(rules, mesh)
  _check_batch(config, mesh, rules)

  # Model, abstract, and its shardings from metadata.
  with jax.set_mesh(mesh), nnx.logical_axis_rules(rules):
    abstract_model = nnx.eval_shape(lambda: models.build(config.model, nnx.Rngs(config.seed)))
  graphdef, abstract_params_state, rest = nnx.split(abstract_model, nnx.Param, ...)
  abstract_params = nnx.to_pure_dict(abstract_params_state)
  param_specs = nnx.to_pure_dict(models.partition_specs(abstract_params_state, rules))
  _check_divisible(abstract_params, param_specs, mesh)
  if check_vocab and data_lib.vocab_size(config.data) > config.model.vocab_size:
    raise ValueError(f"model.vocab_size={config.model.vocab_size} is smaller than the "
                     f"tokenizer's {data_lib.vocab_size(config.data)} tokens.")

  # Optimizer, with masks and state shardings from the same metadata.
  scanned_layers = nnx.to_pure_dict(models.scanned_mask(abstract_params_state))
  tx, schedule = optim.make_optimizer(
      config.optimizer, config.train.steps, scanned_layers=scanned_layers,
      weight_decay_mask=nnx.to_pure_dict(models.weight_decay_mask(abstract_params_state)),
      matrix_axes=nnx.to_pure_dict(models.matrix_axes(abstract_params_state)),
      width_multiplier=config.model.get("width_multiplier", 1),
      param_sharding=jax.tree.map(lambda s: NamedSharding(mesh, s), param_specs,
                                  is_leaf=lambda x: isinstance(x, P)))
  opt_specs = _opt_state_specs(config, tx, abstract_params, param_specs, mesh, scanned_layers)
  state_specs = step_lib.TrainState(step=P(), params=param_specs, opt_state=opt_specs,
                                    nonfinite_in_a_row=P())
  state_shardings = jax.tree.map(lambda s: NamedSharding(mesh, s), state_specs,
                                 is_leaf=lambda x: isinstance(x, P))

  # Sharded init and the jitted steps.
  def fresh_state():
    with nnx.logical_axis_rules(rules):
      model = models.build(config.model, nnx.Rngs(config.seed))
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    return step_lib.TrainState(step=jnp.int32(0), params=params, opt_state=tx.init(params),
                               nonfinite_in_a_row=jnp.int32(0))

  init_state = jax.jit(fresh_state, out_shardings=state_shardings)
  with jax.set_mesh(mesh):
    abstract_state = jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
        jax.eval_shape(init_state), state_shardings)
  batch_sharding = mesh_lib.batch_sharding(mesh, rules)
  loss_fn = step_lib.make_loss_fn(graphdef, rest, rules)
  train_step = jax.jit(
      step_lib.make_train_step(loss_fn, tx, schedule, config.train.microbatches,
                               unroll_microbatches=unroll_loops),
      in_shardings=(state_shardings, batch_sharding), out_shardings=(state_shardings, None),
      donate_argnums=(0,))
  eval_step = jax.jit(step_lib.make_eval_step(graphdef, rest, rules),
                      in_shardings=(state_shardings.params, batch_sharding))
  return Setup(config=config, mesh=mesh, rules=rules, graphdef=graphdef, rest=rest, tx=tx,
               schedule=schedule, num_params=models.param_count(abstract_params),
               flops_per_token=models.flops_per_token(config.model, config.data.seq_len),
               state_shardings=state_shardings, abstract_state=abstract_state,
               batch_sharding=batch_sharding, init_state=init_state, train_step=train_step,
               eval_step=eval_step)
