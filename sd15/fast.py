"""Opt-in speed and memory transforms for a loaded `StableDiffusion`, applied from outside the model code.

The model files stay plain (the gpt-fast split): everything here changes an already
built model in place and can be undone with `reset(model)` / `disable_offload(model)`.

    import sd15, sd15.fast as fast
    model = sd15.load(path)                       # fp16 on CUDA
    fast.optimize(model)                          # TF32, channels_last, torch.compile, CUDA graphs (on CUDA)
    fast.warmup(model, sizes=[(512, 512)])        # compile / capture the common shapes before serving

Transforms (each small, each usable alone):
  enable_tf32()                  TF32 matmuls/convs for fp32 work on Ampere+ (no effect on fp16/bf16).
  channels_last(model)           NHWC weights for the UNet and VAE (pays with compile; benchmark, don't assume).
  compile_unet(model, ...)       torch.compile of the UNet forward; `compile_vae_decode` does `vae.decode`.
  cuda_graphs(model)             `CUDAGraphRunner`: one captured graph per input shape, static input buffers.
  enable_offload(model, ...)     weights live on the CPU; each block is moved to the GPU just in time.
  attention_backend_for(...)     which `sd15.attention` backend to use for an image size on a device.
  warmup(model, sizes, ...)      runs short generations so compilation / capture happen before serving.
  optimize(model, ...)           the usual combination of the above.

How the transforms attach: a compiled or graph-captured forward is stored as an instance attribute
(`unet.forward`, `vae.decode`) that shadows the class method, so module types, parameter names and
state_dict keys do not change (LoRA patching by key keeps working; weights must be changed *in place*
under CUDA graphs, see `CUDAGraphRunner`). Offload uses forward pre/post hooks on the top-level blocks.
"""
from __future__ import annotations

import time
import warnings
from typing import Callable, Iterable

import torch
import torch.nn as nn

from sd15 import attention as attn

# ------------------------------------------------------------------------------------------------
# Precision flags
# ------------------------------------------------------------------------------------------------


def enable_tf32(enabled: bool = True) -> None:
    """Let fp32 matmuls and convs use TF32 tensor cores (Ampere and newer). Process-global; no effect on
    fp16/bf16 models or on the CPU. Relative error of TF32 is ~3e-4, well inside the fp16 tolerance."""
    torch.backends.cuda.matmul.allow_tf32 = enabled
    torch.backends.cudnn.allow_tf32 = enabled


def inductor_flags() -> None:
    """The Inductor settings of the diffusers torch.compile recipe (process-global): 1x1 convs as matmuls,
    coordinate-descent tuning of the generated kernels, no epilogue fusion into templates."""
    import torch._inductor.config as cfg

    cfg.conv_1x1_as_mm = True
    cfg.coordinate_descent_tuning = True
    cfg.coordinate_descent_check_all_directions = True
    cfg.epilogue_fusion = False


def channels_last(model, *, unet: bool = True, vae: bool = True):
    """Store conv weights NHWC (`torch.channels_last`). Convs then produce NHWC activations, which cuDNN and
    Inductor run faster on tensor cores; eager on the CPU it is usually slower. Returns the model."""
    if unet:
        model.unet.to(memory_format=torch.channels_last)
    if vae:
        model.vae.to(memory_format=torch.channels_last)
    return model


# ------------------------------------------------------------------------------------------------
# torch.compile
# ------------------------------------------------------------------------------------------------
# The attention backend is a plain per-thread attribute (`sd15.attention._selection`), which Dynamo reads
# while tracing and guards on: a different backend (e.g. `with use_attention_backend("chunked")`) gets its
# own graph instead of silently using the old one, and compiled calls from several threads need no lock.

CUDAGRAPH_MODES = ("reduce-overhead", "max-autotune")  # torch.compile modes that capture CUDA graphs


class _Compiled:
    """A torch.compile'd function. With a mode that uses Inductor's CUDA graphs ("reduce-overhead",
    "max-autotune") the output lives in a buffer the next replay overwrites, so it is cloned, and each call
    starts a new cudagraph step."""

    def __init__(self, fn: Callable, **compile_kw):
        self.mode = compile_kw.get("mode")
        self.compiled = torch.compile(fn, **compile_kw)

    def __call__(self, *args, **kwargs):
        if self.mode in CUDAGRAPH_MODES:
            torch.compiler.cudagraph_mark_step_begin()
            return self.compiled(*args, **kwargs).clone()
        return self.compiled(*args, **kwargs)


def _current(module: nn.Module, name: str) -> Callable:
    """The callable `module.<name>` resolves to now (an installed override, else the class method)."""
    return module.__dict__.get(name) or getattr(type(module), name).__get__(module)


def compile_unet(model, *, mode: str | None = None, dynamic: bool | None = None, fullgraph: bool = True,
                 backend: str | Callable = "inductor"):
    """torch.compile the UNet forward (in place; `reset(model)` undoes it). Returns the model.

    mode: torch.compile's ("default", "max-autotune-no-cudagraphs", "reduce-overhead", "max-autotune"). With
      `cuda_graphs(model)` on top, use a mode without CUDA graphs.
    dynamic — how new sizes are handled (no recompilation storms):
      None  (default, torch's automatic dynamic shapes): the first shape gets a static graph (the fastest
            kernels, for the warmed-up 512x512); the first *different* shape triggers one recompile into a
            shape-polymorphic graph that then serves every other size and batch. Two compiles in all.
      False one static graph per (batch, height, width): best kernels, a compile per new size. For fixed-size
            serving and benchmarks; more than torch._dynamo.config.recompile_limit (8) sizes fall back to eager.
      True  one shape-polymorphic graph from the start.
    Padding latents to size buckets was rejected: padding changes the convs' borders and the attention
    token set, so the images would differ from the unpadded ones.
    """
    unet = model.unet
    if isinstance(unet.__dict__.get("forward"), CUDAGraphRunner):
        raise ValueError("compile_unet must come before cuda_graphs (the graph runner wraps the compiled forward)")
    unet.forward = _Compiled(type(unet).forward.__get__(unet), mode=mode, dynamic=dynamic, fullgraph=fullgraph,
                             backend=backend)
    return model


def compile_vae_decode(model, *, mode: str | None = None, dynamic: bool | None = None, fullgraph: bool = True,
                       backend: str | Callable = "inductor"):
    """torch.compile `vae.decode` (same options as `compile_unet`). Tiled decoding calls `vae.decoder`'s parts
    directly and stays eager. Returns the model."""
    vae = model.vae
    vae.decode = _Compiled(type(vae).decode.__get__(vae), mode=mode, dynamic=dynamic, fullgraph=fullgraph,
                           backend=backend)
    return model


# ------------------------------------------------------------------------------------------------
# CUDA graphs
# ------------------------------------------------------------------------------------------------


class CUDAGraphRunner:
    """Replays a captured CUDA graph of `fn(*tensors)` for each distinct input signature.

    Signature = shapes, dtypes, strides and device of the positional tensor arguments, plus the attention
    backend name and inference mode. The first call with a new signature warms up on a side stream (which
    also triggers any torch.compile of `fn`), then captures. Each later call copies the inputs into the
    graph's static input buffers, replays, and returns a *clone* of the static output, so a result stays
    valid after the next call.

    Correctness notes: the graph reads the weights at their captured addresses, so weights may be changed
    in place (`p.data.copy_`, as LoRA merging does) but not replaced by new tensors or moved; after that,
    or after `.to()`/`.half()`, call `reset()`. Calls with grad enabled, on the CPU, with keyword arguments
    or with a callable attention backend (attention capture) run `fn` eagerly. All graphs share one memory
    pool; that is safe because they run one at a time on one stream and the output is cloned before
    another graph runs.
    """

    def __init__(self, fn: Callable, warmup_iters: int = 2):
        self.fn = fn
        self.warmup_iters = warmup_iters
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
        entry = self.graphs.get(key)
        if entry is None:
            try:
                entry = self._capture(args)
            except Exception as e:  # e.g. an op that cannot be captured: run this signature eagerly from now on
                self.failed[key] = f"{type(e).__name__}: {e}"
                warnings.warn(f"CUDA graph capture failed for input shapes {[tuple(a.shape) for a in args]} "
                              f"({self.failed[key]}); running them eagerly", RuntimeWarning, stacklevel=2)
                return self.fn(*args)
            self.graphs[key] = entry
        graph, static_in, static_out = entry
        for buf, a in zip(static_in, args):
            buf.copy_(a)
        graph.replay()
        return static_out.clone()

    def _capture(self, args):
        static_in = [a.clone() for a in args]
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up outside the capture: cuDNN/cuBLAS setup, compilation
            for _ in range(self.warmup_iters):
                self.fn(*static_in)
        torch.cuda.current_stream().wait_stream(side)
        if self.pool is None:
            self.pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        # thread_local: CUDA work that other server threads start meanwhile does not invalidate the capture
        with torch.cuda.graph(graph, pool=self.pool, capture_error_mode="thread_local"):
            static_out = self.fn(*static_in)
        return graph, static_in, static_out


def cuda_graphs(model, *, unet: bool = True):
    """Install a `CUDAGraphRunner` around the UNet forward (compiled or eager). Needs the model on CUDA, and a
    compile mode without Inductor's own CUDA graphs (two graph layers would capture each other)."""
    if model.device.type != "cuda":
        raise RuntimeError(f"CUDA graphs need the model on a CUDA device; it is on {model.device}")
    fwd = model.unet.__dict__.get("forward")
    if isinstance(fwd, _Compiled) and fwd.mode in CUDAGRAPH_MODES:
        raise ValueError(f"compile mode {fwd.mode!r} already captures CUDA graphs; use it without sd15's graph "
                         "runner, or compile with 'default' / 'max-autotune-no-cudagraphs' under the runner")
    if unet:
        model.unet.forward = CUDAGraphRunner(_current(model.unet, "forward"))
    return model


def reset(model):
    """Undo compile_unet / compile_vae_decode / cuda_graphs (channels_last and offload stay)."""
    model.unet.__dict__.pop("forward", None)
    model.vae.__dict__.pop("decode", None)
    return model


# ------------------------------------------------------------------------------------------------
# Offload (small GPUs)
# ------------------------------------------------------------------------------------------------


def _blocks(module: nn.Module) -> list[nn.Module]:
    """The top-level blocks of a network: its children, with containers that have no forward of their own
    (ModuleList, CLIP's `encoder`) replaced by their children. UNet: time_embed, input_blocks.N,
    middle_block, output_blocks.N, out; VAE: encoder, decoder, quant_conv, post_quant_conv;
    CLIP: embeddings, encoder.layers.N, final_layer_norm."""
    out = []
    for child in module.children():
        if type(child).forward is nn.Module.forward:  # a container: ModuleList, ModuleDict, a forward-less holder
            out.extend(_blocks(child))
        else:
            out.append(child)
    return out


class _Offloader:
    """Moves blocks' parameters and buffers to `device` on demand and back to their resting (CPU) tensors.

    At rest a parameter's `.data` is its CPU tensor (pinned when the target is CUDA); loading replaces `.data`
    with a device copy and unloading restores the resting tensor, so nothing is copied back. Whatever `.data`
    is at rest is what gets loaded next time, so `vae.float()` or in-place LoRA edits at rest are honoured."""

    def __init__(self, device: torch.device):
        self.device = device
        self.resting: dict = {}  # tensor-holder id -> resting tensor, for what is loaded now
        self.handles = []
        self.resident = None  # "model" mode: the component on the device now

    def _tensors(self, module):
        yield from module.parameters()
        for m in module.modules():
            for name, b in m._buffers.items():
                if b is not None:
                    yield (m, name)

    def load(self, module: nn.Module) -> None:
        for item in self._tensors(module):
            if isinstance(item, tuple):
                m, name = item
                key, data = (id(m), name), m._buffers[name]
            else:
                key, data = id(item), item.data
            if key in self.resting:
                continue
            self.resting[key] = data
            moved = data.to(self.device, non_blocking=True, copy=True)  # copy=True: a real move on the CPU too
            if isinstance(item, tuple):
                item[0]._buffers[item[1]] = moved
            else:
                item.data = moved

    def unload(self, module: nn.Module) -> None:
        for item in self._tensors(module):
            if isinstance(item, tuple):
                m, name = item
                key = (id(m), name)
                if key in self.resting:
                    m._buffers[name] = self.resting.pop(key)
            elif id(item) in self.resting:
                item.data = self.resting.pop(id(item))


def enable_offload(model, device=None, *, mode: str = "sequential"):
    """Keep the weights in CPU memory and move them to `device` just in time (an "offload mode for small
    GPUs"). Returns the model; `model.device` becomes `device`, so inputs are created there.

    mode="sequential": each top-level block (see `_blocks`) is loaded by a forward pre-hook and dropped by a
      forward hook: peak VRAM = the largest block (~0.2 GB fp16) + activations, at the cost of streaming the
      1.7 GB fp16 UNet over PCIe every step.
    mode="model": a whole network (UNet, VAE or text encoder) is loaded when one of its blocks runs and
      stays until another network is needed: ~1.7 GB fp16 for the UNet, and only a few transfers per image.
    Not combinable with compile or CUDA graphs (they need fixed weight addresses).
    """
    if mode not in ("sequential", "model"):
        raise ValueError(f"offload mode must be 'sequential' or 'model', got {mode!r}")
    device = torch.device(device) if device is not None else torch.device("cuda")
    if getattr(model, "_offloader", None) is not None:
        raise ValueError("offload is already enabled; call disable_offload(model) first")
    if any(isinstance(m.__dict__.get(n), (_Compiled, CUDAGraphRunner))
           for m, n in ((model.unet, "forward"), (model.vae, "decode"))):
        raise ValueError("offload cannot be combined with compile or CUDA graphs; call reset(model) first")
    off = _Offloader(device)
    nets = [model.text_encoder, model.unet, model.vae]
    for net in nets:
        net.to("cpu")
        if device.type == "cuda":
            for p in net.parameters():
                p.data = p.data.pin_memory()  # pinned: faster, asynchronous host-to-device copies
        blocks = _blocks(net)
        covered = {id(p) for b in blocks for p in b.parameters()}
        if any(id(p) not in covered for p in net.parameters()):
            raise ValueError(f"{type(net).__name__} has parameters outside its top-level blocks; cannot offload it")
        for block in blocks:
            if mode == "sequential":
                off.handles.append(block.register_forward_pre_hook(lambda m, a, b=block: off.load(b)))
                off.handles.append(block.register_forward_hook(lambda m, a, o, b=block: off.unload(b)))
            else:
                off.handles.append(block.register_forward_pre_hook(lambda m, a, n=net: _make_resident(off, n)))
    model._offloader = off
    model.device = device
    return model


def _make_resident(off: _Offloader, net: nn.Module) -> None:
    if off.resident is not net:
        if off.resident is not None:
            off.unload(off.resident)
        off.load(net)
        off.resident = net


def disable_offload(model, device=None):
    """Remove the offload hooks and put every network on `device` (default: the offload device)."""
    off = getattr(model, "_offloader", None)
    if off is None:
        return model
    for h in off.handles:
        h.remove()
    for net in (model.text_encoder, model.unet, model.vae):
        off.unload(net)
        net.to(device or off.device)
    model._offloader = None
    model.device = torch.device(device or off.device)
    return model


# ------------------------------------------------------------------------------------------------
# Attention policy for large images
# ------------------------------------------------------------------------------------------------

_fused_cache: dict = {}

# Head sizes: the UNet has 8 heads of 40/80/160 (320/640/1280 channels); the VAE mid-block one head of 512.
HEAD_DIMS_UNET = (40, 80, 160)
HEAD_DIMS_VAE = (512,)


def fused_attention_available(device, dtype, head_dims: Iterable[int] = HEAD_DIMS_UNET) -> bool:
    """Whether torch's SDPA has a kernel that never materialises the (Lq, Lk) score matrix (flash,
    memory-efficient or cuDNN on CUDA; the flash kernel on the CPU) for every head size, found by trying
    each once under `torch.nn.attention.sdpa_kernel` (cached per device type and dtype). The probe uses
    contiguous inputs; SDPA also needs the last dimension contiguous at the call site."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    device = torch.device(device)
    key = (device.type, dtype, tuple(head_dims))
    if key not in _fused_cache:
        kernels = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION]
        if device.type == "cuda":
            kernels.append(SDPBackend.CUDNN_ATTENTION)
        ok = True
        for d in head_dims:
            q = torch.randn(1, 1, 64, d, device=device, dtype=dtype)
            try:
                with sdpa_kernel(kernels):
                    torch.nn.functional.scaled_dot_product_attention(q, q, q)
            except RuntimeError:
                ok = False
                break
        _fused_cache[key] = ok
    return _fused_cache[key]


def attention_backend_for(device, dtype, height: int, width: int, *, batch: int = 2, heads: int = 8,
                          head_dims: Iterable[int] = HEAD_DIMS_UNET, budget_bytes: int = 1 << 30) -> str:
    """The `sd15.attention` backend for an image of height x width pixels (defaults: the UNet with CFG;
    for the VAE mid-block pass batch=1, heads=1, head_dims=HEAD_DIMS_VAE).

    "sdpa" when torch has a fused kernel for this device, dtype and head sizes (memory linear in the token
    count), or when the largest score matrix the math fallback would build, batch * heads * N^2 fp32 values
    with N = (height/8) * (width/8) tokens, fits in `budget_bytes`; otherwise "chunked", which bounds it.
    """
    if fused_attention_available(device, dtype, head_dims):
        return "sdpa"
    n = (height // 8) * (width // 8)
    return "sdpa" if batch * heads * n * n * 4 <= budget_bytes else "chunked"


def use_attention_for(model, height: int, width: int, *, part: str = "unet", batch: int = 1):
    """`with use_attention_for(model, h, w): ...` runs the block with `attention_backend_for`'s choice for
    the UNet (`batch` images, CFG doubles it) or, with part="vae", for one VAE decode."""
    if part == "vae":
        kw = dict(batch=1, heads=1, head_dims=HEAD_DIMS_VAE)
    else:
        kw = dict(batch=2 * batch, heads=8, head_dims=HEAD_DIMS_UNET)
    return attn.use_attention_backend(attention_backend_for(model.device, model.dtype, height, width, **kw))


# ------------------------------------------------------------------------------------------------
# Warm-up and the convenience entry point
# ------------------------------------------------------------------------------------------------


def warmup(model, sizes=((512, 512),), batch_sizes=(1,), *, steps: int = 2, sampler: str = "Euler") -> dict:
    """Run a short txt2img for every (width, height) x batch size through `model.txt2img`, so
    that compilation, CUDA-graph capture and cuDNN autotuning happen now and with exactly the dtypes,
    strides and grad mode real requests use. Returns {(width, height, batch): seconds}. A new shape under
    `cuda_graphs` is compiled (if compiled) and captured on its first call, so one pass is enough."""
    times = {}
    for w, h in sizes:
        for b in batch_sizes:
            if model.device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            model.txt2img(prompt="warm-up", seed=0, steps=steps, width=w, height=h, batch_size=b,
                          sampler_name=sampler)
            if model.device.type == "cuda":
                torch.cuda.synchronize()
            times[(w, h, b)] = time.perf_counter() - t0
    return times


_channels_last, _cuda_graphs = channels_last, cuda_graphs  # optimize()'s keyword arguments shadow these names


def optimize(model, *, compile: bool | None = None, channels_last: bool | None = None,
             cuda_graphs: bool | None = None, offload: bool | str = False, tf32: bool = True, mode: str | None = None,
             dynamic: bool | None = None, vae: bool = True):
    """The usual fast path in one call. Returns the model.

    On CUDA: TF32, the diffusers Inductor flags, channels_last, torch.compile of the UNet (and of
    `vae.decode` when `vae`), and a `CUDAGraphRunner` around the UNet. On the CPU nothing by default, since
    Inductor made the UNet 25% slower than eager there (bench/RESULTS.md); `compile=True` compiles anyway.
    `mode` is torch.compile's, default "default" (seconds to compile); "max-autotune-no-cudagraphs"
    autotunes conv/matmul kernels (minutes) and leaves the CUDA graphs to `CUDAGraphRunner`;
    "reduce-overhead" / "max-autotune" use Inductor's own CUDA graphs, so the runner is then left out
    (asking for both is an error). `dynamic` as in `compile_unet`.

    `offload=True` (or "sequential" / "model", see `enable_offload`) is the small-GPU mode instead: weights
    stay in CPU memory, nothing is compiled or captured.
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
    if inductor_graphs:
        cuda_graphs = False  # Inductor's graphs instead of the runner
    if tf32 and on_cuda:
        enable_tf32()
    if (on_cuda and compile) if channels_last is None else channels_last:
        _channels_last(model)
    if compile:
        mode = mode or "default"
        if on_cuda:
            inductor_flags()
        compile_unet(model, mode=mode, dynamic=dynamic)
        if vae:
            compile_vae_decode(model, mode=mode, dynamic=dynamic)
    if on_cuda if cuda_graphs is None else cuda_graphs:
        _cuda_graphs(model)
    return model
