"""Opt-in speed and memory transforms of a loaded model, applied from outside the model code (the gpt-fast
split): `optimize(model)` then `warmup(model)`, undone by `reset(model)` / `disable_offload(model)`.

A compiled or graph-captured forward is an instance attribute (`unet.forward`, `vae.decode`) shadowing the
class method, so parameter names and state_dict keys do not change and LoRA merging by key keeps working.
"""
from __future__ import annotations

import itertools
import time
import warnings
from typing import Callable

import torch
import torch.nn as nn

from sd15 import attention as attn


def enable_tf32() -> None:
    """Let fp32 matmuls and convs use TF32 tensor cores (Ampere and newer; process-global). TF32's relative
    error, ~3e-4, is well inside the fp16 tolerance."""
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True


def inductor_flags() -> None:
    """The Inductor settings of the diffusers torch.compile recipe (process-global): 1x1 convs as matmuls,
    coordinate-descent tuning of the generated kernels, no epilogue fusion into templates."""
    import torch._inductor.config as cfg

    cfg.conv_1x1_as_mm = True
    cfg.coordinate_descent_tuning = True
    cfg.coordinate_descent_check_all_directions = True
    cfg.epilogue_fusion = False


def channels_last(model):
    """Store the UNet's and VAE's conv weights NHWC: cuDNN and Inductor run NHWC activations faster on tensor
    cores; eager on the CPU it is usually slower. Returns the model."""
    model.unet.to(memory_format=torch.channels_last)
    model.vae.to(memory_format=torch.channels_last)
    return model


CUDAGRAPH_MODES = ("reduce-overhead", "max-autotune")  # torch.compile modes that capture CUDA graphs


class _Compiled:
    """A torch.compile'd function. Under Inductor's CUDA graphs (CUDAGRAPH_MODES) the output lives in a buffer
    the next replay overwrites, so it is cloned, and each call starts a new cudagraph step."""

    def __init__(self, fn: Callable, **compile_kw):
        self.mode = compile_kw.get("mode")
        self.compiled = torch.compile(fn, **compile_kw)

    def __call__(self, *args, **kwargs):
        if self.mode in CUDAGRAPH_MODES:
            torch.compiler.cudagraph_mark_step_begin()
            return self.compiled(*args, **kwargs).clone()
        return self.compiled(*args, **kwargs)


def compile_unet(model, *, mode: str | None = None, dynamic: bool | None = None,
                 backend: str | Callable = "inductor"):
    """torch.compile the UNet forward in place. Returns the model. `dynamic=None` (torch's automatic dynamic
    shapes): a static graph for the first (warmed-up) shape, then one shape-polymorphic graph for all others.
    Latents are not padded to size buckets: that would change the convs' borders and so the images. Dynamo
    guards on the attention backend (a per-thread attribute), so another backend gets its own graph."""
    unet = model.unet
    if isinstance(unet.__dict__.get("forward"), CUDAGraphRunner):
        raise ValueError("compile_unet must come before cuda_graphs (the graph runner wraps the compiled forward)")
    unet.forward = _Compiled(type(unet).forward.__get__(unet), mode=mode, dynamic=dynamic, fullgraph=True,
                             backend=backend)
    return model


def compile_vae_decode(model, *, mode: str | None = None):
    """torch.compile `vae.decode`. Tiled decoding calls the decoder's parts directly and stays eager. Returns
    the model."""
    vae = model.vae
    vae.decode = _Compiled(type(vae).decode.__get__(vae), mode=mode, fullgraph=True)
    return model


class CUDAGraphRunner:
    """Replays a captured CUDA graph of `fn(*tensors)` per input signature (shapes, dtypes, strides, device,
    attention backend, inference mode); calls with grad, on the CPU, with keyword arguments or with a callable
    attention backend run eagerly. The graph reads the weights at their captured addresses: change them in
    place (as LoRA merging does); after replacing or moving them, `reset()`. The graphs share one memory
    pool, safe as they run one at a time on one stream."""

    def __init__(self, fn: Callable):
        self.fn = fn
        self.graphs: dict = {}
        self.failed: dict = {}  # signature -> why its capture failed; those calls run eagerly, not re-captured
        self.pool = None

    def reset(self) -> None:
        self.graphs.clear()
        self.failed.clear()
        self.pool = None

    def _eligible(self, args, kwargs) -> bool:
        return not (kwargs or torch.is_grad_enabled() or callable(attn.get_attention_backend()) or not args
                    or not all(isinstance(a, torch.Tensor) for a in args) or not args[0].is_cuda)

    def __call__(self, *args, **kwargs):
        if not self._eligible(args, kwargs):
            return self.fn(*args, **kwargs)
        key = (attn.get_attention_backend(), torch.is_inference_mode_enabled(),
               *((a.shape, a.dtype, a.stride(), a.device) for a in args))
        if key in self.failed:
            return self.fn(*args)
        if key not in self.graphs:
            try:
                self.graphs[key] = self._capture(args)
            except Exception as e:  # e.g. an op that cannot be captured: run this signature eagerly from now on
                self.failed[key] = f"{type(e).__name__}: {e}"
                warnings.warn(f"CUDA graph capture failed for input shapes {[tuple(a.shape) for a in args]} "
                              f"({self.failed[key]}); running them eagerly", RuntimeWarning, stacklevel=2)
                return self.fn(*args)
        graph, static_in, static_out = self.graphs[key]
        for buf, a in zip(static_in, args):
            buf.copy_(a)
        graph.replay()
        return static_out.clone()

    def _capture(self, args):
        static_in = [a.clone() for a in args]
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up outside the capture: cuDNN/cuBLAS setup, compilation
            for _ in range(2):
                self.fn(*static_in)
        torch.cuda.current_stream().wait_stream(side)
        if self.pool is None:
            self.pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        # thread_local: CUDA work that other server threads start meanwhile does not invalidate the capture
        with torch.cuda.graph(graph, pool=self.pool, capture_error_mode="thread_local"):
            static_out = self.fn(*static_in)
        return graph, static_in, static_out


def cuda_graphs(model):
    """Install a `CUDAGraphRunner` around the UNet forward (compiled or eager). Needs the model on CUDA, and a
    compile mode without Inductor's own CUDA graphs (two graph layers would capture each other)."""
    if model.device.type != "cuda":
        raise RuntimeError(f"CUDA graphs need the model on a CUDA device; it is on {model.device}")
    fwd = model.unet.forward
    if isinstance(fwd, _Compiled) and fwd.mode in CUDAGRAPH_MODES:
        raise ValueError(f"compile mode {fwd.mode!r} already captures CUDA graphs; use it without sd15's graph "
                         "runner, or compile with 'default' / 'max-autotune-no-cudagraphs' under the runner")
    model.unet.forward = CUDAGraphRunner(fwd)
    return model


def reset(model):
    """Undo compile_unet / compile_vae_decode / cuda_graphs (channels_last and offload stay)."""
    model.unet.__dict__.pop("forward", None)
    model.vae.__dict__.pop("decode", None)
    return model


def _blocks(module: nn.Module) -> list[nn.Module]:
    """The top-level blocks of a network: its children, with forward-less containers (ModuleList, CLIP's
    `encoder`) replaced by theirs (UNet: time_embed, input_blocks.N, middle_block, output_blocks.N, out)."""
    out = []
    for child in module.children():
        if type(child).forward is nn.Module.forward:  # a container: ModuleList, ModuleDict, a forward-less holder
            out.extend(_blocks(child))
        else:
            out.append(child)
    return out


class _Offloader:
    """Moves modules' parameters and buffers to `device` on demand and back to their resting (CPU) tensors.

    Loading points a tensor's `.data` at a device copy and unloading back at the resting tensor, so nothing
    is copied back; whatever `.data` is at rest (after `vae.float()` or a LoRA merge) is what loads next."""

    def __init__(self, device: torch.device):
        self.device = device
        self.resting: dict = {}  # id(tensor) -> its resting data, for what is loaded now
        self.handles = []
        self.resident = None  # "model" mode: the network on the device now

    def load(self, module: nn.Module) -> None:
        for t in (*module.parameters(), *module.buffers()):
            if id(t) not in self.resting:
                self.resting[id(t)] = t.data
                t.data = t.data.to(self.device, non_blocking=True, copy=True)  # copy: moves on the CPU too

    def unload(self, module: nn.Module) -> None:
        for t in (*module.parameters(), *module.buffers()):
            if id(t) in self.resting:
                t.data = self.resting.pop(id(t))

    def make_resident(self, net: nn.Module) -> None:
        if self.resident is not net:
            if self.resident is not None:
                self.unload(self.resident)
            self.load(net)
            self.resident = net


def enable_offload(model, device=None, *, mode: str = "sequential"):
    """Keep the weights in CPU memory and move them to `device` (default CUDA) just in time, for small GPUs;
    `model.device` becomes `device`. Returns the model.

    mode="sequential" loads each top-level block (`_blocks`) before it runs and drops it after: peak VRAM is
    the largest block (~0.2 GB fp16) + activations, streaming the 1.7 GB fp16 UNet over PCIe every step.
    mode="model" keeps a whole network (UNet, VAE or text encoder) loaded until another one runs: ~1.7 GB for
    the UNet, a few transfers per image. Not combinable with compile or CUDA graphs (fixed weight addresses).
    """
    if mode not in ("sequential", "model"):
        raise ValueError(f"offload mode must be 'sequential' or 'model', got {mode!r}")
    if getattr(model, "_offloader", None) is not None:
        raise ValueError("offload is already enabled; call disable_offload(model) first")
    if "forward" in model.unet.__dict__ or "decode" in model.vae.__dict__:
        raise ValueError("offload cannot be combined with compile or CUDA graphs; call reset(model) first")
    off = _Offloader(torch.device(device or "cuda"))
    for net in (model.text_encoder, model.unet, model.vae):
        net.to("cpu")
        if off.device.type == "cuda":
            for p in net.parameters():
                p.data = p.data.pin_memory()  # pinned: faster, asynchronous host-to-device copies
        for block in _blocks(net):
            if mode == "sequential":
                off.handles.append(block.register_forward_pre_hook(lambda m, a, b=block: off.load(b)))
                off.handles.append(block.register_forward_hook(lambda m, a, o, b=block: off.unload(b)))
            else:
                off.handles.append(block.register_forward_pre_hook(lambda m, a, n=net: off.make_resident(n)))
    model._offloader = off
    model.device = off.device
    return model


def disable_offload(model, device=None):
    """Remove the offload hooks and put every network on `device` (default: the offload device)."""
    off = getattr(model, "_offloader", None)
    if off is None:
        return model
    for h in off.handles:
        h.remove()
    model.device = torch.device(device or off.device)
    for net in (model.text_encoder, model.unet, model.vae):
        off.unload(net)
        net.to(model.device)
    model._offloader = None
    return model


def warmup(model, sizes=((512, 512),), batch_sizes=(1,), *, steps: int = 2) -> dict:
    """Run a short `model.txt2img` for every (width, height) x batch size, so that compilation, CUDA-graph
    capture and cuDNN autotuning happen now, with exactly the dtypes, strides and grad mode of real requests
    (one pass is enough). Returns {(width, height, batch): seconds}."""
    times = {}
    for (w, h), b in itertools.product(sizes, batch_sizes):
        if model.device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        model.txt2img(prompt="warm-up", seed=0, steps=steps, width=w, height=h, batch_size=b,
                      sampler_name="Euler")
        if model.device.type == "cuda":
            torch.cuda.synchronize()
        times[(w, h, b)] = time.perf_counter() - t0
    return times


_cuda_graphs = cuda_graphs  # optimize()'s keyword argument shadows the name


def optimize(model, *, compile: bool | None = None, cuda_graphs: bool | None = None,
             offload: bool | str = False, mode: str | None = None, vae: bool = True):
    """The usual fast path in one call. Returns the model.

    On CUDA: TF32, the diffusers Inductor flags, channels_last, torch.compile of the UNet (and of `vae.decode`
    when `vae`) and a `CUDAGraphRunner` around the UNet. On the CPU nothing by default: Inductor made the UNet
    25% slower than eager there (bench/RESULTS.md). `mode` "max-autotune-no-cudagraphs" autotunes kernels
    (minutes); "reduce-overhead" / "max-autotune" capture Inductor's own CUDA graphs instead of the runner's.
    `offload=True` (or "sequential" / "model", see `enable_offload`) is the small-GPU mode instead.
    """
    on_cuda = model.device.type == "cuda"
    if offload:
        if compile or cuda_graphs:
            raise ValueError("offload cannot be combined with compile or CUDA graphs")
        if not on_cuda and not torch.cuda.is_available():
            raise RuntimeError("offload moves weights to a CUDA device just in time; no CUDA device is available")
        return enable_offload(model, model.device if on_cuda else "cuda",
                              mode="sequential" if offload is True else offload)
    if cuda_graphs and not on_cuda:
        raise RuntimeError(f"CUDA graphs need the model on a CUDA device; it is on {model.device}")
    compile = on_cuda if compile is None else compile
    inductor_graphs = compile and mode in CUDAGRAPH_MODES
    if inductor_graphs and cuda_graphs:
        raise ValueError(f"compile mode {mode!r} captures CUDA graphs itself; pass cuda_graphs=False, or use "
                         "mode='max-autotune-no-cudagraphs' with sd15's graph runner")
    if on_cuda:
        enable_tf32()
    if compile:
        if on_cuda:
            channels_last(model)
            inductor_flags()
        compile_unet(model, mode=mode or "default")
        if vae:
            compile_vae_decode(model, mode=mode or "default")
    if (on_cuda and not inductor_graphs) if cuda_graphs is None else cuda_graphs:
        _cuda_graphs(model)
    return model
