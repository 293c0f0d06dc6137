"""Values between this host and a mesh that may span several hosts.

In one process these are ``jax.device_get`` / ``jax.device_put``. With several processes
(``jax.distributed``) both refuse arrays that live partly on other processes' devices, so a
value that every process holds in full (a seeded initialisation, a batch of rows all hosts
read, rewards all hosts computed) is placed by global index (``make_array_from_callback``),
and a global array comes back through ``process_allgather``: a collective, which every
process calls on the same arrays in the same order."""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec, Sharding


def to_host(tree):
    """Numpy copies of every array in ``tree``, gathered from all processes when needed."""
    def one(x):
        if isinstance(x, jax.Array) and not x.is_fully_addressable:
            from jax.experimental import multihost_utils

            return np.asarray(multihost_utils.process_allgather(x, tiled=True))
        return jax.device_get(x)

    return jax.tree.map(one, tree)


def to_global(x, sharding: Sharding | None):
    """``x`` (identical on every process) as the array of ``sharding`` (None: the default
    device). PRNG keys go through their raw data."""
    if sharding is None or jax.process_count() == 1:
        return jax.device_put(x, sharding)
    if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
        data_sharding = NamedSharding(sharding.mesh, PartitionSpec(*sharding.spec, None))
        return jax.random.wrap_key_data(to_global(jax.random.key_data(x), data_sharding), impl=jax.random.key_impl(x))
    host = np.asarray(to_host(x))
    return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])


def barrier(name: str) -> None:
    """Wait until every process gets here (after process 0 wrote a file the others read next)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)
