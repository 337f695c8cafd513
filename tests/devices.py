"""A logical accelerator for a CPU-only machine: a cross-device op fails here as it would on CUDA.

Tests of the engine's device handling need a second device whose tensors hold real values (the
stream path runs real `eigh`s and compares real edits). A CPU build of PyTorch has none: CUDA
cannot even be named without a driver, `meta` tensors hold no values, and `FakeTensorMode` (which
does fake a `cuda` device) computes no values either. So a tensor on the accelerator here is an
`OnAccelerator`: a wrapper that reports the device `meta` (the one non-CPU device every build
accepts) and holds a real CPU tensor inside. Inside `accelerator()`, every op goes through one
rule, CUDA's:

- an op whose tensors are on different devices raises PyTorch's "Expected all tensors to be on
  the same device" error; the exceptions are CUDA's own: 0-dim CPU tensors (scalars), CPU index
  tensors of an indexing op, and the copies that move data (`.to`, `.cpu()`, `copy_`);
- its results live where its inputs do; a factory (`torch.zeros(..., device=)`) and `.to(device)`
  put them on the device named.

Values are computed on the CPU in the same dtype, so a test under `accelerator()` checks the
numbers of the plain test, to rounding: a composite op may take another path on another device
(attention decomposes into plain matmuls on `meta`). `torch.tensor(data, device=ACCELERATOR)`
builds its tensor below the dispatcher, where no values can be kept: an op that meets such a
tensor raises rather than compute on garbage (an empty one, as a KV cache starts with, is taken
as the empty tensor it is).

The accelerator also keeps CUDA's memory counters: `memory_allocated()` is the bytes of the
storages its tensors hold now (a storage counted once, however many views share it, until the
last of them is freed), `max_memory_allocated()` their peak since `reset_peak_memory_stats()`.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves, tree_map

ACCELERATOR = torch.device("meta")
CPU = torch.device("cpu")

aten = torch.ops.aten
# ops that move data between devices: any mix is their purpose
TRANSFERS = {aten._to_copy.default, aten.copy_.default, aten.copy.default}
# indexing ops: CUDA accepts index tensors on the CPU (their argument 1, a list of tensors)
INDEXING = {
    aten.index.Tensor,
    aten.index_put.default,
    aten.index_put_.default,
    aten._index_put_impl_.default,
}


class _Memory:
    """The storages alive on the accelerator: address -> [bytes, tensors holding it]."""

    def __init__(self) -> None:
        self.storages: dict[int, list[int]] = {}
        self.allocated = 0
        self.peak = 0

    def hold(self, tensor: torch.Tensor, payload: torch.Tensor) -> None:
        storage = payload.untyped_storage()
        address = storage.data_ptr()
        entry = self.storages.setdefault(address, [storage.nbytes(), 0])
        if entry[1] == 0:
            self.allocated += entry[0]
            self.peak = max(self.peak, self.allocated)
        entry[1] += 1
        weakref.finalize(tensor, self.release, address)

    def release(self, address: int) -> None:
        entry = self.storages[address]
        entry[1] -= 1
        if entry[1] == 0:
            self.allocated -= entry[0]
            del self.storages[address]


MEMORY = _Memory()


def memory_allocated() -> int:
    """Bytes the accelerator's tensors hold now, as `torch.cuda.memory_allocated`."""
    return MEMORY.allocated


def max_memory_allocated() -> int:
    """The peak of `memory_allocated` since the last `reset_peak_memory_stats`."""
    return MEMORY.peak


def reset_peak_memory_stats() -> None:
    MEMORY.peak = MEMORY.allocated


class OnAccelerator(torch.Tensor):
    """A tensor on the logical accelerator: reports `ACCELERATOR`, computes with `payload`."""

    payload: torch.Tensor

    @staticmethod
    def __new__(cls, payload: torch.Tensor) -> OnAccelerator:
        wrapper = torch.Tensor._make_wrapper_subclass(
            cls,
            payload.shape,
            strides=payload.stride(),
            storage_offset=payload.storage_offset(),
            dtype=payload.dtype,
            layout=payload.layout,
            device=ACCELERATOR,
        )
        wrapper.payload = payload
        MEMORY.hold(wrapper, payload)
        return wrapper

    # autograd, hooks and modules see a plain tensor; only the dispatcher level is ours
    __torch_function__ = torch._C._disabled_torch_function_impl

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        return run_op(func, args, kwargs or {})

    def tolist(self):  # CUDA tensors convert (a copy to the host); subclasses do not by default
        return self.payload.tolist()

    def numpy(self, *, force: bool = False):
        raise TypeError("can't convert a tensor on the accelerator to numpy: use .cpu() first")

    def __repr__(self) -> str:
        return f"OnAccelerator({self.payload!r})"


def device_of(t: torch.Tensor) -> torch.device:
    """The device a tensor is on in this test world."""
    if isinstance(t, OnAccelerator):
        return ACCELERATOR
    if t.device.type == "meta":
        if t.numel() == 0:
            return ACCELERATOR  # an empty tensor has no values to lose (a KV cache starts so)
        raise RuntimeError(
            "a real meta tensor (no values) reached the logical accelerator: it was built below "
            "the dispatcher (torch.tensor(..., device=)); build it on the CPU and move it with .to"
        )
    return t.device


def _checked_devices(func, args, kwargs) -> set[torch.device]:
    """The devices an op combines, after CUDA's exceptions; raises on a mix."""
    exempt = set()
    if func in INDEXING:
        exempt = {id(t) for t in tree_leaves(args[1]) if isinstance(t, torch.Tensor)}
    devices = set()
    for t in tree_leaves((args, kwargs)):
        if not isinstance(t, torch.Tensor):
            continue
        device = device_of(t)
        if device == CPU and (t.dim() == 0 or id(t) in exempt):
            continue  # CUDA kernels take CPU scalars, and CPU indices
        devices.add(device)
    if len(devices) > 1 and func not in TRANSFERS:
        names = " and ".join(sorted(str(d) for d in devices)).replace("meta", "meta (accelerator)")
        raise RuntimeError(
            "Expected all tensors to be on the same device, but found at least two devices, "
            f"{names}! (in {func})"
        )
    return devices


def run_op(func, args: tuple, kwargs: dict):
    """Run one op on the CPU payloads under CUDA's device rule; wrap what lands on the
    accelerator. A result that is one of the inputs (an in-place op) comes back as that input."""
    devices = _checked_devices(func, args, kwargs)
    target = kwargs.get("device")
    if target is not None:
        target = torch.device(target)
        kwargs = {**kwargs, "device": CPU if target == ACCELERATOR else target}
    elif func in (aten.copy_.default, aten.copy.default):  # a copy lands where its `self` is
        target = device_of(args[0])
    else:
        target = ACCELERATOR if ACCELERATOR in devices else CPU
    originals = {}

    def unwrap(x):
        if isinstance(x, torch.Tensor):
            if isinstance(x, OnAccelerator):
                inner = x.payload
            elif x.device.type == "meta":  # empty (device_of checked): its CPU twin
                inner = torch.empty(x.shape, dtype=x.dtype)
            else:
                inner = x
            originals[id(inner)] = x
            return inner
        return x

    out = func(*tree_map(unwrap, args), **tree_map(unwrap, kwargs))

    def wrap(x):
        if not isinstance(x, torch.Tensor):
            return x
        if id(x) in originals:
            return originals[id(x)]
        return OnAccelerator(x) if target == ACCELERATOR else x

    return tree_map(wrap, out)


class _AcceleratorMode(TorchDispatchMode):
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        return run_op(func, args, kwargs or {})


@contextmanager
def accelerator() -> Iterator[torch.device]:
    """Within the block, `ACCELERATOR` (yielded) is a device with real values and CUDA's rule
    against mixing it with the CPU: `model.to(device)` puts a model there, `torch.zeros(...,
    device=device)` and `t.to(device)` put tensors there, and `t.cpu()` brings them back."""
    with _AcceleratorMode():
        yield ACCELERATOR


def on_accelerator(t: torch.Tensor) -> bool:
    """Whether `t` lives on the logical accelerator."""
    return isinstance(t, OnAccelerator)
