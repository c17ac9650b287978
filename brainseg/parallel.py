"""The device mesh and moving batches between hosts and devices.

One mesh axis, `data`, spans every device of every process. Batches are sharded
along it; params, optimizer state and BatchNorm statistics are replicated, and
jit inserts the collectives (so BatchNorm sees the global batch).
"""
from typing import Any

import jax
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
import numpy as np

DATA_AXIS = 'data'


def create_mesh(devices=None) -> Mesh:
  """A 1-D mesh over `devices`: by default every device of every process."""
  return Mesh(np.asarray(jax.devices() if devices is None else devices), (DATA_AXIS,))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P(DATA_AXIS))


def to_global(local_batch: Any, mesh: Mesh) -> Any:
  """This process's slice of a batch (numpy) -> global jax.Arrays sharded on `data`."""
  sharding = batch_sharding(mesh)
  return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, x),
                      local_batch)


def gather_to_host(tree: Any) -> Any:
  """Global arrays -> full numpy arrays on every process."""
  if jax.process_count() == 1:
    return jax.tree.map(np.asarray, tree)
  return multihost_utils.process_allgather(tree, tiled=True)


def any_process(flag: bool) -> bool:
  """True on every process if `flag` is True on any (a collective with several)."""
  if jax.process_count() == 1:
    return bool(flag)
  return bool(multihost_utils.process_allgather(np.int32(flag)).max())
