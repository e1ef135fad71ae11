"""`sd15.load(path)`: one SD 1.x checkpoint file -> the three networks, the tokenizer and the schedule."""
from __future__ import annotations

import inspect
import os

import torch

from sd15 import checkpoint as ckpt
from sd15.clip.text_encoder import CLIPTextConfig, CLIPTextModel
from sd15.clip.tokenizer import Tokenizer
from sd15.embeddings import EmbeddingDatabase
from sd15.lora import Loras
from sd15.pipeline import generate
from sd15.schema import GenerationRequest, signature
from sd15.unet.unet import UNetConfig, UNetModel
from sd15.vae.vae import AutoencoderKL, VAEConfig


def _device_and_dtype(device, dtype) -> tuple[torch.device, torch.dtype]:
    """CUDA when present; fp16 there (what A1111 runs by default), fp32 on the CPU, where half precision is
    slow."""
    device = torch.device(device if device is not None else "cuda" if torch.cuda.is_available() else "cpu")
    return device, dtype or (torch.float16 if device.type == "cuda" else torch.float32)


class StableDiffusion:
    """The loaded model: `.unet`, `.vae`, `.text_encoder`, `.tokenizer`, `.alphas_cumprod`, `.device`, `.dtype`."""

    def __init__(self, unet: UNetModel, vae: AutoencoderKL, text_encoder: CLIPTextModel, tokenizer: Tokenizer,
                 alphas_cumprod: torch.Tensor, *, device: torch.device, dtype: torch.dtype, path: str | None = None,
                 vae_path: str | None = None, lora_dir=None, embeddings_dir=None):
        self.unet = unet
        self.vae = vae
        self.text_encoder = text_encoder
        self.tokenizer = tokenizer
        self.alphas_cumprod = alphas_cumprod  # (1000,) float32, from the file when it carries one
        self.device = device
        self.dtype = dtype
        self.path = path
        self.vae_path = vae_path
        # extra networks: `<lora:NAME:...>` prompt tags (sd15.lora) and textual-inversion words (sd15.embeddings)
        self.loras = Loras(lora_dir)
        self.embeddings = EmbeddingDatabase(embeddings_dir, expected_width=text_encoder.cfg.hidden_size)

    def __repr__(self):
        n = sum(p.numel() for m in (self.unet, self.vae, self.text_encoder) for p in m.parameters())
        return (f"StableDiffusion({os.path.basename(self.path or '?')}, {n / 1e6:.0f}M parameters, "
                f"device={self.device}, dtype={self.dtype})")

    def txt2img(self, *, state=None, callback=None, model_hash=None, vae_hash=None, **request):
        """A1111 txt2img: keyword arguments are `sd15.schema.GenerationRequest` fields -> `sd15.pipeline.Result`.
        `model_hash` / `vae_hash`: short hashes for the infotext (`sd15.hashing`)."""
        if request.get("init_images") is not None:
            raise TypeError("txt2img takes no init_images; use img2img")
        return generate(self, GenerationRequest(**request), state=state, callback=callback,
                        model_hash=model_hash, vae_hash=vae_hash)

    def img2img(self, *, init_images, state=None, callback=None, model_hash=None, vae_hash=None, **request):
        """A1111 img2img / inpainting (`mask=`): `init_images` are PIL images or base64 strings, the other
        keyword arguments `sd15.schema.GenerationRequest` fields -> `sd15.pipeline.Result`."""
        return generate(self, GenerationRequest(init_images=list(init_images), **request), state=state,
                        callback=callback, model_hash=model_hash, vae_hash=vae_hash)

    def load_vae(self, path) -> None:
        """Replace the VAE by a standalone VAE file (`load_vae`)."""
        self.vae = load_vae(path, device=self.device, dtype=self.dtype)
        self.vae_path = os.fspath(path)


def _signatures():
    """model.txt2img / model.img2img list the schema's fields as their parameters (help(), tab completion)."""
    shared = ("prompt", "seeds", "sampling", "size", "settings")
    job = tuple(inspect.Parameter(n, inspect.Parameter.KEYWORD_ONLY, default=None)
                for n in ("state", "callback", "model_hash", "vae_hash"))
    self_ = inspect.Parameter("self", inspect.Parameter.POSITIONAL_OR_KEYWORD)
    t2i = signature(*shared, "hires", extra=job)
    StableDiffusion.txt2img.__signature__ = t2i.replace(parameters=[self_, *t2i.parameters.values()])
    i2i = signature(*shared, "img2img", extra=job)
    params = [p.replace(default=inspect.Parameter.empty) if p.name == "init_images" else p
              for p in i2i.parameters.values()]
    params.sort(key=lambda p: p.default is not inspect.Parameter.empty)  # the required init_images first
    StableDiffusion.img2img.__signature__ = i2i.replace(parameters=[self_, *params])


_signatures()


def load_vae(path, *, device=None, dtype=None) -> AutoencoderKL:
    """A standalone VAE file (e.g. vae-ft-mse-840000-ema-pruned.safetensors)."""
    device, dtype = _device_and_dtype(device, dtype)
    path = os.fspath(path)
    entries = ckpt.vae_entries(ckpt.open_checkpoint(path))
    return ckpt.load_module(AutoencoderKL, VAEConfig, entries, device=device, dtype=dtype, path=path, what="VAE")


def load(path, *, vae=None, device=None, dtype=None, lora_dir=None, embeddings_dir=None) -> StableDiffusion:
    """Load an SD 1.x checkpoint (`.safetensors`, or `.ckpt`/`.pt` through the weights-only unpickler).

    The architecture is read off the tensor shapes, so the real 4 GB file and tiny test files take the
    same path. `vae=` replaces the built-in VAE with a standalone VAE file. `device` defaults to CUDA when
    present, `dtype` to fp16 on CUDA and fp32 on the CPU. `lora_dir` / `embeddings_dir`: the folders of LoRA
    files (`<lora:NAME:weight>` tags) and textual-inversion embeddings (`model.loras`, `model.embeddings`).
    Raises `sd15.CheckpointError` with a one-line reason for anything it cannot use.
    """
    device, dtype = _device_and_dtype(device, dtype)
    path = os.fspath(path)
    entries = ckpt.fix_old_clip_prefix(ckpt.open_checkpoint(path))
    parts, extras = ckpt.split_components(entries, path)
    kw = dict(device=device, dtype=dtype, path=path)
    unet = ckpt.load_module(UNetModel, UNetConfig, parts["unet"], what="UNet", **kw)
    text_encoder = ckpt.load_module(CLIPTextModel, CLIPTextConfig, parts["text_encoder"], what="text encoder", **kw)
    if vae is None:
        vae_model = ckpt.load_module(AutoencoderKL, VAEConfig, parts["vae"], what="VAE", **kw)
    else:
        vae_model = load_vae(vae, device=device, dtype=dtype)
    return StableDiffusion(unet, vae_model, text_encoder, Tokenizer(), ckpt.alphas_cumprod_from(extras),
                           device=device, dtype=dtype, path=path, vae_path=None if vae is None else os.fspath(vae),
                           lora_dir=lora_dir, embeddings_dir=embeddings_dir)
