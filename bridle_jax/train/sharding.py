"""Device mesh and parameter shardings from logical axis names.

Every parameter carries logical axis names ('embed', 'mlp', 'heads', ...); the config's
`sharding_rules` map them to mesh axes. The same code then runs data-parallel on one
GPU (mesh 1x1x1), FSDP over a TPU pod ('embed' -> 'fsdp') or tensor-parallel
('mlp'/'heads' -> 'model'). A dimension that does not divide evenly over its mesh axes
stays replicated rather than failing.
"""
import math
from typing import Any

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "model")
BATCH_AXES = ("data", "fsdp")


def make_mesh(mesh_config, devices=None) -> Mesh:
  """A (data, fsdp, model) mesh; one size may be -1 to take the remaining devices."""
  devices = jax.devices() if devices is None else devices
  sizes = [int(mesh_config[axis]) for axis in MESH_AXES]
  if sizes.count(-1) > 1:
    raise ValueError("mesh: at most one of mesh.data, mesh.fsdp, mesh.model may be -1")
  known = math.prod(s for s in sizes if s != -1)
  if -1 in sizes:
    if len(devices) % known:
      raise ValueError(f"mesh: {len(devices)} devices do not split into {known} x (-1)")
    sizes[sizes.index(-1)] = len(devices) // known
  if math.prod(sizes) != len(devices):
    raise ValueError(f"mesh: data x fsdp x model = {'x'.join(map(str, sizes))} "
                     f"does not match the {len(devices)} devices")
  return Mesh(np.asarray(devices).reshape(sizes), MESH_AXES)


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Shards the leading (batch) axis over the data and fsdp mesh axes (each host feeds the
  rows of the batch shards its devices hold: see `check_hosts_own_their_batch_shards`)."""
  check_hosts_own_their_batch_shards(
      np.vectorize(lambda device: device.process_index, otypes=[int])(mesh.devices))
  return NamedSharding(mesh, PartitionSpec(BATCH_AXES))


def check_hosts_own_their_batch_shards(hosts: np.ndarray) -> None:
  """Raises ValueError naming mesh.model when the devices of one batch shard sit on several
  hosts. `hosts` holds the process index of each device of the (data, fsdp, model) mesh.

  Each host reads its own clips, so a batch shard whose model-parallel devices span hosts
  would be given different clips by each of them: a smaller global batch, mixed up.
  """
  per_shard = hosts.reshape(-1, hosts.shape[-1])
  spanning = [sorted(set(row.tolist())) for row in per_shard if len(set(row.tolist())) > 1]
  if spanning:
    per_host = min(np.unique(hosts, return_counts=True)[1])
    raise ValueError(
        f"mesh.model={hosts.shape[-1]} spans hosts (a batch shard's devices are on hosts "
        f"{spanning[0]}), but each host feeds whole batch shards; use mesh.model <= "
        f"{per_host} (the devices per host) and shard further with mesh.fsdp")


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec())


def batch_shards(mesh: Mesh) -> int:
  """Devices the batch is split over: mesh.data x mesh.fsdp."""
  return _axis_size(mesh, BATCH_AXES)


def check_batch_divides(name: str, batch_size: int, mesh: Mesh, grad_accum: int = 1) -> None:
  """Raises ValueError naming `name` (a `<section>.batch_size`) when `batch_size`, or each of
  its `grad_accum` micro-batches, does not split over the batch shards."""
  shards = batch_shards(mesh)
  if batch_size % shards:
    raise ValueError(f"{name}={batch_size} is not divisible by the {shards} data-parallel "
                     "devices (mesh.data x mesh.fsdp)")
  if (batch_size // grad_accum) % shards:
    accum_name = name.rsplit(".", 1)[0] + ".grad_accum"
    raise ValueError(f"{accum_name}={grad_accum} splits {name}={batch_size} into "
                     f"micro-batches of {batch_size // grad_accum}, which the {shards} "
                     "data-parallel devices (mesh.data x mesh.fsdp) cannot share evenly")


def _axis_size(mesh: Mesh, axes) -> int:
  if axes is None:
    return 1
  axes = (axes,) if isinstance(axes, str) else axes
  return math.prod(mesh.shape[a] for a in axes)


def _fit(spec: PartitionSpec, shape, mesh: Mesh) -> PartitionSpec:
  """Replicates each dimension whose size its mesh axes do not divide."""
  fitted = [axes if dim % _axis_size(mesh, axes) == 0 else None
            for dim, axes in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec)))]
  return PartitionSpec(*fitted)


def shardings_for(abstract_boxed: Any, mesh: Mesh, rules) -> Any:
  """NamedShardings for an eval_shape'd pytree whose params are logically annotated.

  Leaves without annotations (optimizer counts, codebooks, step, rng) are replicated.
  The result matches the tree with the annotations removed (`nn.unbox`).
  """
  logical = nn.get_partition_spec(abstract_boxed)
  mesh_specs = nn.logical_to_mesh(logical, rules)
  unboxed = nn.unbox(abstract_boxed)
  return jax.tree.map(
      lambda spec, leaf: NamedSharding(mesh, _fit(spec, leaf.shape, mesh)),
      mesh_specs, unboxed, is_leaf=lambda x: isinstance(x, PartitionSpec))


def with_shardings(abstract: Any, shardings: Any) -> Any:
  """jax.ShapeDtypeStruct leaves carrying `shardings`: the target of a sharded restore."""
  return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                      abstract, shardings)
