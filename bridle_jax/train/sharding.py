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
  """Shards the leading (batch) axis over the data and fsdp mesh axes."""
  return NamedSharding(mesh, PartitionSpec(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec())


def batch_shards(mesh: Mesh) -> int:
  """Devices the batch is split over: mesh.data x mesh.fsdp."""
  return _axis_size(mesh, BATCH_AXES)


def check_batch_divides(name: str, batch_size: int, mesh: Mesh) -> None:
  """Raises ValueError naming `name` when `batch_size` does not split over the batch shards."""
  shards = batch_shards(mesh)
  if batch_size % shards:
    raise ValueError(f"{name}={batch_size} is not divisible by the {shards} data-parallel "
                     "devices (mesh.data x mesh.fsdp)")


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
