"""A CPU stand-in for "tensors on an accelerator" that counts device -> host reads.

`DeviceTensor` behaves like a plain CPU tensor, except that every result computed from it is again a
`DeviceTensor` (as results of CUDA tensors stay on the GPU) and every read of its values on the host
(`.item()`, `bool()`, `float()`, `int()`, `.tolist()`, `.numpy()`, `.cpu()`) adds one to `DeviceTensor.reads`
and gives back a plain tensor or Python value. Plain CPU tensors play the host: reading them costs nothing,
as on a real machine. So a sampler loop that keeps its schedule on the host and only launches work on the
device makes no reads, and one that branches on a device value (`if sigma_next == 0` with σ on the GPU)
is caught, on any machine.

    x = to_device(x)                       # latents, schedules, buffers the sampler would find on the GPU
    with count_reads() as c:
        sampler(...)
    c.reads                                # device -> host reads inside the block
"""
import contextlib

import torch

_READS = {torch.Tensor.item, torch.Tensor.__bool__, torch.Tensor.__float__, torch.Tensor.__int__,
          torch.Tensor.__index__, torch.Tensor.tolist, torch.Tensor.numpy, torch.Tensor.cpu}


def _plain(value):
    if isinstance(value, DeviceTensor):
        return value.as_subclass(torch.Tensor)
    return value


class DeviceTensor(torch.Tensor):
    reads = 0
    trace = None  # a list to append the name of each read to, or None

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _READS:
            DeviceTensor.reads += 1
            if DeviceTensor.trace is not None:
                DeviceTensor.trace.append(func.__name__)
            with torch._C.DisableTorchFunctionSubclass():
                return _plain(func(*args, **kwargs))
        return super().__torch_function__(func, types, args, kwargs)


def to_device(t: torch.Tensor) -> DeviceTensor:
    return t.as_subclass(DeviceTensor)


@contextlib.contextmanager
def count_reads(trace: bool = False):
    """Counts the DeviceTensor reads inside the block: `.reads`, and `.trace` (names) when `trace`."""
    class Count:
        reads = 0
        names = []
    c = Count()
    start = DeviceTensor.reads
    saved = DeviceTensor.trace
    DeviceTensor.trace = c.names if trace else None
    try:
        yield c
    finally:
        c.reads = DeviceTensor.reads - start
        DeviceTensor.trace = saved
