"""Pre-launch check: will a config fit its chips? Answered on any machine, a laptop CPU too.

    JAX_PLATFORMS=cpu python -m trainer.main --config configs/llm_tpu.py --dry_run

builds the run (trainer/setup.py) on the target's mesh - a TPU topology that libtpu
describes without the chips (`--topology v5p:2x2x2`, default config.dry_run.topology),
or the local devices when the topology is '' - and reports the train state's bytes per
device. Then it compiles the train step ahead of time for that target and compares the
compiled step's memory per device with the chip's, and reports what the step costs per
device as the compiler sees it: flops, bytes accessed and the collectives of each kind
(count and bytes). XLA's cost analysis counts a loop's body once, so these are read from
the same step compiled a second time with its layers and microbatches unrolled: every
pass counts, as it does on the chips. `--dry_run_compare=adamw` builds the same run
with that optimizer and prints both side by side with the ratios, so an optimizer's
cost on a slice is seen before the slice is paid for. No data or tokenizer is read, no
array is allocated and nothing is written: a config that cannot fit fails here.
"""

import collections
import dataclasses
import math
import os
import re
import time
from typing import Any, Optional

import jax
import numpy as np

from trainer import hardware
from trainer import setup as setup_lib

GiB = hardware.GiB


def target_devices(topology: str) -> list:
  """The devices of a TPU topology such as 'v5p:2x2x2', or the local devices for ''."""
  if not topology:
    return jax.devices()
  # Describing a topology loads libtpu, which by default lets one process per host hold
  # it (/tmp/libtpu_lockfile); no TPU is driven here, so others may load it too.
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  from jax.experimental import topologies  # pylint: disable=import-outside-toplevel
  try:
    return topologies.get_topology_desc(topology_name=topology, platform="tpu").devices
  except (RuntimeError, ValueError) as e:
    raise ValueError(
        f"Cannot describe the TPU topology {topology!r} ({e}). It needs libtpu "
        "(pip install -e '.[tpu]') and a name like 'v5p:2x2x2', 'v5e:4x4' or 'v6e:4x4'; "
        "--topology='' checks on the local devices instead.") from e


def bytes_per_device(tree: Any) -> int:
  """Bytes of `tree`'s arrays (or ShapeDtypeStructs with shardings) on the device that
  holds the most of them: every device holds its own shard of each array."""
  totals = collections.Counter()
  for leaf in jax.tree.leaves(tree):
    itemsize = np.dtype(leaf.dtype).itemsize
    for device, index in leaf.sharding.devices_indices_map(leaf.shape).items():
      shard = math.prod(len(range(*s.indices(n))) for s, n in zip(index, leaf.shape))
      totals[device] += shard * itemsize
  return max(totals.values(), default=0)


# ------------------------------------------------------------- the step's cost

COLLECTIVES = ("all-gather", "all-reduce", "reduce-scatter", "all-to-all",
               "collective-permute")
# `%name = <result shape> <op>(` with op a collective, synchronous or an async start.
_COLLECTIVE_OP = re.compile(r"=\s*(?P<shape>.+?)\s+(?P<kind>" + "|".join(COLLECTIVES) +
                            r")(?P<start>-start)?\(")
_ARRAY = re.compile(r"\b(pred|[su]4|[su]8|[su]16|[su]32|[su]64|f8\w*|bf16|f16|f32|f64|c64|"
                    r"c128)\[([\d,]*)\]")
_BITS = {"pred": 8, "bf16": 16, "f16": 16, "f32": 32, "f64": 64, "c64": 64, "c128": 128}


def _array_bytes(dtype: str, dims: str) -> float:
  bits = _BITS.get(dtype) or (8 if dtype.startswith("f8") else int(dtype[1:]))
  return math.prod(int(d) for d in dims.split(",") if d) * bits / 8


def collectives(hlo_text: str) -> dict[str, tuple[int, float]]:
  """{kind: (count, bytes)} of the collectives in a compiled HLO module's text.

  Bytes are those of each op's result (the gathered array of an all-gather, the
  scattered part of a reduce-scatter). An async start's result of a gather or permute
  holds its operands, then its results, then (permutes, all-to-alls) u32[] context
  scalars: only the results count.
  """
  found = {kind: [0, 0.0] for kind in COLLECTIVES}
  for match in _COLLECTIVE_OP.finditer(hlo_text):
    shapes = _ARRAY.findall(match["shape"])
    if match["start"] and match["kind"] != "all-reduce":
      while shapes and shapes[-1] == ("u32", ""):
        shapes.pop()
      shapes = shapes[len(shapes) // 2:]
    arrays = [_array_bytes(*a) for a in shapes]
    found[match["kind"]][0] += 1
    found[match["kind"]][1] += sum(arrays)
  return {kind: (count, size) for kind, (count, size) in found.items()}


def loops(hlo_text: str) -> int:
  """While loops in a compiled HLO module's text that carry floating-point arrays; loops
  of integers alone are the rounds of random-bit generation, which CPU programs keep
  rolled (a few integer ops per pass; other backends unroll them)."""
  carries = re.findall(r"=\s*(.+?)\swhile\(", hlo_text)
  return sum(re.search(r"\b(bf16|f8\w*|f16|f32|f64|c64|c128)\[", c) is not None
             for c in carries)


@dataclasses.dataclass(frozen=True)
class Cost:
  """What one compiled step costs per device, as XLA's cost analysis and HLO show it."""

  flops: float
  bytes_accessed: float
  collectives: dict  # kind -> (count, bytes)
  loops: int  # while loops left in the counted program: each counts one pass

  @property
  def collective_bytes(self) -> float:
    return sum(size for _, size in self.collectives.values())

  @classmethod
  def of(cls, compiled) -> "Cost":
    analysis = compiled.cost_analysis()
    if isinstance(analysis, (list, tuple)):  # one entry per program on older jax
      analysis = analysis[0]
    hlo = compiled.as_text()
    return cls(flops=analysis.get("flops", 0.0),
               bytes_accessed=analysis.get("bytes accessed", 0.0),
               collectives=collectives(hlo), loops=loops(hlo))

  def rows(self) -> list[tuple[str, str, float]]:
    """(name, printed value, number for ratios) per line of the report."""
    rows = [("flops", f"{self.flops:.3g}", self.flops),
            ("bytes accessed", _size(self.bytes_accessed).strip(), self.bytes_accessed)]
    for kind, (count, size) in self.collectives.items():
      rows.append((kind, f"{count} ops, {_size(size).strip()}", size))
    rows.append(("collectives, all", _size(self.collective_bytes).strip(),
                 self.collective_bytes))
    return rows


@dataclasses.dataclass(frozen=True)
class Report:
  """What the check found; per-device figures are for the most loaded device."""

  target: str  # the topology, or 'local devices'
  device_kind: str
  num_devices: int
  num_hosts: int
  mesh_shape: dict
  num_params: int
  params_bytes: int
  opt_state_bytes: int
  memory: Any  # the compiled step's CompiledMemoryStats (per device); None if refused
  cost: Optional[Cost]  # None if refused
  optimizer: str
  compile_error: str  # the compiler's out-of-memory message, if it refused the step
  compile_seconds: float
  device_memory: Optional[int]  # bytes per chip; None where unknown (CPU)

  @property
  def step_bytes(self) -> Optional[int]:
    """Peak bytes per device of one step as XLA planned it: arguments (state, batch),
    outputs not written over donated arguments, temporaries and code."""
    m = self.memory
    if m is None:
      return None
    return (m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes +
            m.temp_size_in_bytes + m.generated_code_size_in_bytes)

  @property
  def fits(self) -> Optional[bool]:
    if self.compile_error:
      return False
    return None if self.device_memory is None else self.step_bytes <= self.device_memory

  def lines(self) -> list[str]:
    lines = [
        f"Target: {self.target}, {self.num_devices} x {self.device_kind} on "
        f"{self.num_hosts} host(s), mesh {self.mesh_shape}",
        f"Model: {self.num_params / 1e6:.1f}M params",
        "Train state per device:",
        f"  params           {_size(self.params_bytes)}",
        f"  optimizer state  {_size(self.opt_state_bytes)}",
        f"Compiled train step per device (compiled in {self.compile_seconds:.0f} s):",
    ]
    if self.compile_error:
      lines.append(f"  DOES NOT FIT: the compiler refused it: {self.compile_error}")
    else:
      m = self.memory
      verdict = ("no memory figure for this device kind" if self.fits is None else
                 f"of {_size(self.device_memory).strip()} per chip "
                 f"({self.step_bytes / self.device_memory:.0%}): " +
                 ("fits" if self.fits else "DOES NOT FIT"))
      lines += [
          f"  arguments        {_size(m.argument_size_in_bytes)}  (state and batch)",
          f"  outputs          {_size(m.output_size_in_bytes)}",
          f"  donated          {_size(-m.alias_size_in_bytes)}  (outputs written over "
          "arguments)",
          f"  temporaries      {_size(m.temp_size_in_bytes)}",
          f"  code             {_size(m.generated_code_size_in_bytes)}",
          f"  total            {_size(self.step_bytes)}  {verdict}",
          f"Compiled train step cost per device ({self.optimizer}):",
      ]
      lines += [f"  {name:<20}{value}" for name, value, _ in self.cost.rows()]
      if self.cost.loops:
        lines.append(f"  (XLA counts a loop's body once: these figures hold one pass "
                     f"through each of the {self.cost.loops} loops left in the program "
                     "(scanned layers not unrolled, matmuls the compiler split into loops "
                     "over devices); work outside loops counts in full)")
    if self.fits is False:
      lines.append("To fit: fewer rows per device (train.global_batch_size, or more "
                   "train.microbatches), model.remat='full', more fsdp in mesh.shape, or "
                   "a bigger slice.")
    return lines


def _size(num_bytes: int) -> str:
  """Right-aligned GiB, or MiB below a GiB (small configs)."""
  if abs(num_bytes) >= GiB:
    return f"{num_bytes / GiB:9.2f} GiB"
  return f"{num_bytes / 2**20:9.2f} MiB"


def _compile(run) -> tuple[Any, str]:
  """(the compiled train step, '') or (None, message) when the compiler finds it too big
  for the chip (TPU compilers refuse such programs)."""
  try:
    with jax.set_mesh(run.mesh):
      lowered = run.train_step.lower(run.abstract_state, run.abstract_batch())
      return lowered.compile(), ""
  except jax.errors.JaxRuntimeError as e:
    if "RESOURCE_EXHAUSTED" not in str(e):
      raise
    return None, str(e).splitlines()[0]


def _counted_cost(config, devices, compiled) -> Cost:
  """The compiled step's cost with every pass through a loop counted: a step with
  loops (scanned layers, microbatches) is compiled again with them unrolled, unless the
  compiler refuses that bigger program."""
  if loops(compiled.as_text()):
    unrolled, _ = _compile(setup_lib.build_setup(config, devices, check_vocab=False,
                                                 unroll_loops=True))
    compiled = unrolled or compiled
  return Cost.of(compiled)


def check(config, topology: str = "", unroll_for_cost: bool = True) -> Report:
  """Build `config`'s run on the target and compile its train step; nothing runs.
  unroll_for_cost=False skips the second, unrolled compile: the cost is then XLA's own
  count of the step as it runs, each loop's body once (the report says so)."""
  devices = target_devices(topology)
  run = setup_lib.build_setup(config, devices, check_vocab=False)
  start = time.perf_counter()
  compiled, compile_error = _compile(run)
  compile_seconds = time.perf_counter() - start
  return Report(
      target=topology or "local devices", device_kind=devices[0].device_kind,
      num_devices=len(devices), num_hosts=len({d.process_index for d in devices}),
      mesh_shape=dict(run.mesh.shape), num_params=run.num_params,
      params_bytes=bytes_per_device(run.abstract_state.params),
      opt_state_bytes=bytes_per_device(run.abstract_state.opt_state),
      memory=compiled and compiled.memory_analysis(),
      cost=compiled and (_counted_cost(config, devices, compiled) if unroll_for_cost
                         else Cost.of(compiled)),
      optimizer=config.optimizer.name, compile_error=compile_error,
      compile_seconds=compile_seconds,
      device_memory=hardware.memory_per_device(devices[0]))


def comparison_lines(report: Report, other: Report) -> list[str]:
  """Two reports' costs side by side, with report / other ratios."""
  def ratio(a, b):
    return f"{a / b:.2f}x" if b else ("1.00x" if a == b else "-")

  header = f"  {'':<20}{report.optimizer:>24}{other.optimizer:>24}  ratio"
  lines = [f"Per device, {report.optimizer} vs {other.optimizer}:", header]
  rows = [("compile time", f"{report.compile_seconds:.0f} s", report.compile_seconds,
           f"{other.compile_seconds:.0f} s", other.compile_seconds),
          ("optimizer state", _size(report.opt_state_bytes).strip(), report.opt_state_bytes,
           _size(other.opt_state_bytes).strip(), other.opt_state_bytes)]
  if report.cost and other.cost:
    rows += [(name, value, number, other_value, other_number)
             for (name, value, number), (_, other_value, other_number)
             in zip(report.cost.rows(), other.cost.rows())]
  for name, value, number, other_value, other_number in rows:
    lines.append(f"  {name:<20}{value:>24}{other_value:>24}  {ratio(number, other_number)}")
  return lines


def main(config, topology: Optional[str] = None, compare: str = "") -> int:
  """Print the check's report (and, with `compare`, the same run's with that optimizer
  beside it); the exit status is 1 if the step does not fit, else 0. `topology` None
  means config.dry_run.topology."""
  topology = config.dry_run.topology if topology is None else topology
  report = check(config, topology)
  print("\n".join(report.lines()), flush=True)
  if compare:
    other_config = config.copy_and_resolve_references()
    other_config.optimizer.name = compare
    print("\n".join(comparison_lines(report, check(other_config, topology))), flush=True)
  return 1 if report.fits is False else 0
