"""Data parallelism over the visible devices with jax.sharding (batch axis sharded, state replicated).

One :class:`jax.sharding.Mesh` over ``jax.devices()`` with a single axis ``'batch'``:

- batches (B, ...) are placed with ``NamedSharding(mesh, P('batch'))``: device i holds rows
  ``[i B/D, (i+1) B/D)`` of the global batch (D = number of devices);
- the model and the optimizer state are placed with ``NamedSharding(mesh, P())`` (replicated).

The jitted training step is unchanged: jit compiles one SPMD program for the mesh, and every
reduction over the batch (the mean loss, the monitors' means and sums over tokens) is computed
over the GLOBAL batch, with the all-reduce inserted by XLA. The metrics therefore mean exactly
what they mean on one device; only the floating-point summation order differs.

With one device (or data parallelism switched off) everything is placed on the default device
and the class is a thin no-op. Several hosts (``jax.distributed.initialize`` before use): every
process must build the same global batch (train's batcher does, it is a pure function of the
seed); each process then contributes the rows of its own devices.
"""

from __future__ import annotations

from gradsparse._validate import check_bool, check_int

import warnings
from typing import Any, Sequence

import equinox as eqx
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

#: name of the mesh axis the batch is split over
AXIS = "batch"


class DataParallel:
    """Placement of batches (sharded over ``'batch'``) and of replicated state.

    Build it with :meth:`auto` (what ``train`` does) or directly with a list of devices:
    ``DataParallel(jax.devices())``. ``DataParallel()`` or ``DataParallel([dev])`` is the
    single-device placement.
    """

    def __init__(self, devices: Sequence[Any] | None = None):
        devs = list(devices) if devices is not None else [jax.devices()[0]]
        if not devs:
            raise ValueError("DataParallel needs at least one device, got an empty list")
        if len({d.id for d in devs}) != len(devs):
            raise ValueError(f"DataParallel devices must be distinct, got {devs}")
        self.devices: list[Any] = devs
        self.mesh: Mesh | None = None
        self.batch_sharding: NamedSharding | None = None
        self.replicated_sharding: NamedSharding | None = None
        if len(devs) > 1:
            self.mesh = Mesh(np.array(devs, dtype=object), (AXIS,))
            self.batch_sharding = NamedSharding(self.mesh, P(AXIS))
            self.replicated_sharding = NamedSharding(self.mesh, P())

    # ------------------------------------------------------------------ construction
    @staticmethod
    def auto(batch_size: int, enabled: bool = True, devices: Sequence[Any] | None = None) -> "DataParallel":
        """Data parallel over ``devices`` (default ``jax.devices()``) when it can be, else one device.

        Data parallelism is chosen when ``enabled``, more than one device is visible and
        ``batch_size`` is divisible by the device count. When the batch does not divide evenly a
        warning says so and training runs on the first device.
        """
        batch_size = check_int("batch_size", int(batch_size) if isinstance(batch_size, np.integer) else batch_size, 1)
        check_bool("enabled", enabled)
        devs = list(devices) if devices is not None else list(jax.devices())
        if not devs:
            raise ValueError("no devices to run on")
        if not enabled or len(devs) == 1:
            return DataParallel(devs[:1])
        if batch_size % len(devs):
            warnings.warn(f"batch size {batch_size} is not divisible by the {len(devs)} visible devices; "
                          f"training on one device ({devs[0]}). Use a batch size that is a multiple of "
                          f"{len(devs)} to train data-parallel.", RuntimeWarning, stacklevel=2)
            return DataParallel(devs[:1])
        return DataParallel(devs)

    # ------------------------------------------------------------------ properties
    @property
    def n_devices(self) -> int:
        """How many devices a batch is split over (1 = no data parallelism)."""
        return len(self.devices)

    @property
    def is_parallel(self) -> bool:
        return self.n_devices > 1

    def __repr__(self) -> str:
        return f"DataParallel(n_devices={self.n_devices}, devices={self.devices})"

    def can_shard(self, batch_size: int) -> bool:
        """True when a leading axis of ``batch_size`` rows splits evenly over the devices."""
        return batch_size % self.n_devices == 0

    # ------------------------------------------------------------------ placement
    def put_batch(self, x: Any) -> Any:
        """Place a batch (an array, or a pytree of arrays with the same leading size B).

        Data parallel: each array is split along axis 0 over the mesh (``P('batch')``) when B is
        divisible by the device count, otherwise replicated (held-out batches of any size still
        work; each device then computes the whole batch). One device: placed on that device.
        Non-array leaves are returned as they are.
        """
        def put(a: Any) -> Any:
            if not _is_arraylike(a):
                return a
            if not self.is_parallel:
                return jax.device_put(a, self.devices[0])
            if np.ndim(a) == 0:
                raise ValueError("put_batch needs arrays with a leading batch axis, got a scalar")
            sharding = self.batch_sharding if self.can_shard(np.shape(a)[0]) else self.replicated_sharding
            return _place(a, sharding)

        return jax.tree_util.tree_map(put, x)

    def replicate(self, tree: Any) -> Any:
        """Copy every array leaf of ``tree`` (model, optimizer state) to all devices (``P()``).

        Only array leaves move; Python scalars and other static leaves of equinox modules are
        left untouched so that ``filter_jit`` keeps treating them as static.
        """
        arrays, static = eqx.partition(tree, eqx.is_array)
        if self.is_parallel:
            arrays = jax.tree_util.tree_map(lambda a: _place(a, self.replicated_sharding), arrays)
        else:
            arrays = jax.device_put(arrays, self.devices[0])
        return eqx.combine(arrays, static)


def _is_arraylike(a: Any) -> bool:
    return isinstance(a, (jax.Array, np.ndarray, np.generic))


def _place(a: Any, sharding: NamedSharding) -> jax.Array:
    """device_put for one process; for several, assemble the global array from each process's copy."""
    if jax.process_count() == 1:
        return jax.device_put(a, sharding)
    host = np.asarray(a)
    return jax.make_array_from_callback(host.shape, sharding, lambda idx: host[idx])
