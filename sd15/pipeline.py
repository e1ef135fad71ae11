"""txt2img and img2img the way AUTOMATIC1111 runs them: `generate(model, request) -> Result`.

One request reads top to bottom in `generate` and `_generate`: validate and resolve it once (sd15.schema),
prepare the image side once (img2img: `sd15.a1111.inpaint.InitImages`), then per batch of `batch_size` images,
`n_iter` times: noise (sd15.rng.ImageRNG) -> conditioning -> sampler -> [hires pass] -> VAE decode ->
paste-back; last the infotexts (sd15.a1111.infotext).

Hooks for researchers, none of which need an edit here: `callback(step, sigma, x, denoised)` after every
sampler step; `state` (a `JobState`) whose `interrupt()` / `skip()` may be called from another thread and are
checked between steps; attention capture or replacement through `sd15.attention.use_attention_backend`; and
`Result.latents`, the final latents of every image before decoding. Nothing here touches the disk.
"""
from __future__ import annotations

import copy
import os
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Callable, Optional

import torch
import torch.nn as nn

from sd15.a1111 import images as imgs
from sd15.a1111 import infotext
from sd15.a1111.conditioning import batch_conditioning
from sd15.a1111.inpaint import InitImages
from sd15.a1111.prompt import extract_networks, network_multipliers
from sd15.lora import LORA_KINDS, LoraRequest
from sd15.rng import ImageRNG
from sd15.samplers import make_denoiser, sample
from sd15.schema import GenerationRequest, ResolvedRequest, resolve, validate
from sd15.vae.tiled import tiled_decode, tiled_encode
from sd15.vae.vae import SCALE_FACTOR


@dataclass
class Result:
    images: list  # PIL images
    seeds: list[int]
    subseeds: list[int]
    infotexts: list[str]
    info: dict
    prompts: list[str] = field(default_factory=list)
    negative_prompts: list[str] = field(default_factory=list)
    latents: torch.Tensor | None = None  # (N, 4, h, w) final latents (after the hires pass), before decoding
    warnings: list[str] = field(default_factory=list)
    interrupted: bool = False

    def save(self, out: str) -> list[str]:
        """Write the images with their infotexts (PNG `parameters` chunk, as A1111 does) -> the paths written.
        `out`: a file name (`cat.png`, `.jpg`, `.webp`; several images become `cat-0.png`, `cat-1.png`, ...) or
        a folder (created; `NNNNN-SEED.png` numbered after the files there)."""
        return imgs.save_images(self.images, self.infotexts, self.seeds, out)


class JobState:
    """Progress and control of the running job. Another thread (the server) may read the attributes and call
    `interrupt()` / `skip()` at any time; both keep the running batch's last denoised estimate (A1111), and
    skip then goes on with the next batch."""

    def __init__(self):
        self.interrupted = False
        self.skipped = False
        self.job_no = 0
        self.job_count = 0
        self.sampling_step = 0
        self.sampling_steps = 0
        self.current_latent = None
        self.preview_latent = None  # content -> the running sampler's x0 for a live preview (CFGDenoiser)

    def interrupt(self):
        self.interrupted = True

    def skip(self):
        self.skipped = True

    def progress(self) -> float:
        if not self.job_count:
            return 0.0
        per_job = self.sampling_step / self.sampling_steps if self.sampling_steps else 0.0
        return min(1.0, (self.job_no + per_job) / self.job_count)


class Interrupted(Exception):
    """Raised between sampler steps to stop sampling; the pipeline keeps the last denoised estimate."""


def generate(model, request: GenerationRequest | ResolvedRequest, *, state: Optional[JobState] = None,
             callback: Optional[Callable] = None, model_hash: Optional[str] = None,
             vae_hash: Optional[str] = None, upscalers=None) -> Result:
    """Run one A1111 request (txt2img, or img2img when `init_images` is set) -> Result.

    A plain request is validated and resolved here (hires upscalers: the latent modes and `upscalers.names()`,
    or the built-in pixel upscalers without a list). `model_hash` / `vae_hash` (10 hex digits, `sd15.hashing`)
    are the infotext's "Model hash" / "VAE hash"; `upscalers` (`sd15.upscale.Upscalers`) run the hires
    pass."""
    if isinstance(request, GenerationRequest):
        validate(request)
        request = resolve(request, upscalers=upscalers.names() if upscalers is not None else None)
    with Job(model, request) as job, seamless(model, job.tiling):
        return _generate(model, request, job, state or JobState(), callback, model_hash, vae_hash, upscalers)


@torch.no_grad()
def _generate(model, r: ResolvedRequest, job: Job, state: JobState, callback, model_hash, vae_hash,
              upscalers) -> Result:
    B, passes = r.batch_size, 2 if r.hires else 1
    init, img2img = None, {}
    if r.is_img2img:  # the image side, once
        def latent_noise(shape):  # "latent noise": A1111's `create_random_tensors(shape, all_seeds[:B])`, with
            # no variation seed and no seed resize
            return ImageRNG(shape, r.seeds[:B], source=r.randn_source.lower(), device=model.device).first()
        init = InitImages(r, encode=partial(encode_images, model, job=job), noise=latent_noise)
        img2img = dict(init_latent=init.latent, mask=init.mask, nmask=init.nmask,
                       noise_multiplier=r.initial_noise_multiplier)
    state.job_count = r.n_iter * passes
    latents, images, kept = [], [], []  # kept: job-wide indices of the images returned
    for it in range(r.n_iter):
        if state.interrupted:
            break
        state.skipped = False  # a skip ends the running batch early (its partial images are kept), not the job
        state.job_no = it * passes
        seeds, subseeds = r.seeds[it * B:(it + 1) * B], r.subseeds[it * B:(it + 1) * B]
        rng = _image_rng(model, r, (4, r.height // 8, r.width // 8), seeds, subseeds)
        job.networks.activate()  # merge the prompt's LoRAs (nothing to do when they already are)
        cond = job.conditioning([job.prompt] * B, [r.negative_prompt] * B,
                                _schedule_steps(r.sampler, r.steps))
        x = _sample(model, job, r, cond, r.sampler, r.scheduler, r.steps, rng, state, callback, **img2img)
        if init is not None:
            x = init.blend(x)
        if r.hires and not state.interrupted:  # after a skip too: A1111 upscales what the first pass has
            state.job_no += 1
            job.networks.activate(hires=True)  # the hires prompt's LoRAs
            x = _hires_pass(model, job, r, x, seeds, subseeds, state, callback, upscalers)
        latents.append(x)
        batch_images = imgs.tensor_to_pil(decode_latents(model, x, job))
        if init is not None:
            batch_images = init.finish(batch_images)
        images.extend(batch_images)
        kept.extend(range(it * B, it * B + len(batch_images)))
    state.job_no = state.job_count
    state.skipped = False

    extra = {**job.networks.infotext_params(), **job.infotext_params}
    info_kw = dict(model=_model_entries(model, model_hash, vae_hash), extra=extra,
                   has_mask=init is not None and init.mask is not None)
    texts = [infotext.create_infotext(r, i, **info_kw) for i in kept]
    info = infotext.create_info(r, texts, job_timestamp=infotext.job_timestamp(), **info_kw)
    return Result(images=images, seeds=[r.seeds[i] for i in kept], subseeds=[r.subseeds[i] for i in kept],
                  infotexts=texts, info=info, prompts=[r.prompt] * len(images),
                  negative_prompts=[r.negative_prompt] * len(images),
                  latents=torch.cat(latents) if latents else None, warnings=job.networks.warnings,
                  interrupted=state.interrupted)


def _image_rng(model, r: ResolvedRequest, shape, seeds, subseeds=None) -> ImageRNG:
    """A1111's per-image noise for `seeds` at `shape` (C, h, w), with the request's variation seeds, seed
    resize, ENSD and noise source."""
    return ImageRNG(shape, seeds, subseeds=subseeds, subseed_strength=r.subseed_strength,
                    seed_resize_from_h=r.seed_resize_from_h, seed_resize_from_w=r.seed_resize_from_w,
                    eta_noise_seed_delta=r.eta_noise_seed_delta, source=r.randn_source.lower(), device=model.device)


def _schedule_steps(sampler, steps: int) -> int:
    """Steps that prompt-editing schedules count: doubled for second-order samplers (A1111's
    `total_steps` of `get_conds_with_caching`)."""
    return steps * (2 if sampler.second_order else 1)


def _sample(model, job: Job, r: ResolvedRequest, cond, sampler, scheduler, steps: int, rng: ImageRNG,
            state: JobState, callback, *, init_latent=None, mask=None, nmask=None, fix_steps=False,
            noise_multiplier=None):
    """One sampler run over one batch with its `cond = (cond, uncond)` -> latents (B, 4, h, w); img2img starts
    from `init_latent` and keeps it where `mask` is 1. The denoiser notes its skips in the job's infotext."""
    denoiser = make_denoiser(sampler.name, model.unet, model.alphas_cumprod.to(model.device), *cond,
                             r.cfg_scale, s_min_uncond=r.s_min_uncond or 0.0,
                             s_min_uncond_all=r.s_min_uncond_all, skip_early_cond=r.skip_early_cond,
                             infotext=job.infotext_params)
    denoiser.set_mask(mask, nmask, init_latent)
    state.preview_latent = denoiser.preview_latent

    def on_step(d):
        state.sampling_step = d["i"] + 1
        state.current_latent = d["denoised"]
        if callback is not None:
            callback(d["i"], d["sigma"], d["x"], d["denoised"])
        if state.interrupted or state.skipped:
            raise Interrupted

    state.sampling_step = 0
    state.sampling_steps = steps
    state.current_latent = init_latent  # A1111's `last_latent` before the first step: the init latent (img2img)
    if init_latent is not None and (state.interrupted or state.skipped):
        return init_latent  # A1111's denoiser stops at its first call (a hires pass after a skip)
    try:
        return sample(sampler.name, denoiser, rng, steps, scheduler=scheduler.label, init_latent=init_latent,
                      denoising_strength=r.strength, fix_steps=fix_steps, eta=r.eta_of(sampler),
                      s_churn=r.s_churn, s_tmin=r.s_tmin, s_tmax=r.s_tmax, s_noise=r.s_noise,
                      initial_noise_multiplier=noise_multiplier, callback=on_step, sigma_min=r.sigma_min,
                      sigma_max=r.sigma_max, rho=r.rho, beta_alpha=r.beta_dist_alpha, beta_beta=r.beta_dist_beta,
                      always_discard_penultimate=r.always_discard_next_to_last_sigma)
    except Interrupted:  # A1111 keeps the last denoised estimate
        if state.current_latent is None:  # txt2img stopped before its first step finished
            return torch.zeros(len(rng.seeds), *rng.shape, device=rng.device)
        return state.current_latent


def _hires_pass(model, job: Job, r: ResolvedRequest, x, seeds, subseeds, state, callback, upscalers):
    """Upscale the first-pass latents and run an img2img pass at the target size (A1111's
    `StableDiffusionProcessingTxt2Img.sample_hr_pass`). A pixel upscaler named in `upscalers` (sd15.upscale)
    runs through its `resize`, the built-ins without a list through `sd15.a1111.images.upscale_image`."""
    hr = r.hires
    if hr.upscaler in imgs.LATENT_UPSCALE_MODES:
        z = imgs.upscale_latent(x, hr.upscaler, hr.width, hr.height)
    else:
        first = imgs.tensor_to_pil(decode_latents(model, x, job))
        if upscalers is not None and hr.upscaler in upscalers.names():
            pixels = [upscalers.resize(im, hr.upscaler, hr.width, hr.height, interrupted=lambda: state.interrupted)
                      for im in first]
        else:
            pixels = [imgs.upscale_image(im, hr.upscaler, hr.width, hr.height) for im in first]
        z = encode_images(model, imgs.pil_to_unit_tensor(pixels), job)
    z = imgs.truncate_latent(z, hr.truncate_x, hr.truncate_y)  # crop to the requested aspect ratio, centrally
    B = r.batch_size
    steps = dict(steps=_schedule_steps(r.sampler, r.steps), hires_steps=_schedule_steps(hr.sampler, hr.steps))
    cond = job.conditioning([job.hr_prompt] * B, [hr.negative_prompt] * B, **steps)
    rng = _image_rng(model, r, tuple(z.shape[1:]), seeds, subseeds)  # a new RNG at the hires shape
    return _sample(model, job, r, cond, hr.sampler, hr.scheduler, hr.steps, rng, state, callback,
                   init_latent=z, fix_steps=True)


def _model_entries(model, model_hash, vae_hash) -> dict:
    """Model / VAE names (from the file names) and the caller's short hashes, for the infotext."""
    out = {}
    if getattr(model, "path", None):
        out.update(sd_model_name=os.path.splitext(os.path.basename(model.path))[0], sd_model_hash=model_hash)
    if getattr(model, "vae_path", None):
        out.update(sd_vae_name=os.path.basename(model.vae_path), sd_vae_hash=vae_hash)
    return out


# Above this many latent pixels (1024 x 1024 images) the VAE runs in tiles (sd15.vae.tiled, exact mode: the same
# result up to float rounding, with memory bounded by the tile size).
TILED_VAE_LATENT_PIXELS = 128 * 128


def _vae_decode(vae, z: torch.Tensor, tiles: bool = True) -> torch.Tensor:
    if not tiles:  # a seamless-tiling job: tiles would each wrap around themselves
        return vae.decode(z)
    if z.shape[-2] * z.shape[-1] > TILED_VAE_LATENT_PIXELS:
        return torch.cat([tiled_decode(vae, zi[None]) for zi in z])
    try:
        return vae.decode(z)
    except torch.OutOfMemoryError:  # a smaller GPU: retry in tiles, keeping the big maps in host memory
        torch.cuda.empty_cache()
        return torch.cat([tiled_decode(vae, zi[None], storage="cpu") for zi in z])


@torch.no_grad()
def decode_latents(model, latents: torch.Tensor, job: Optional[Job] = None) -> torch.Tensor:
    """Sampler latents (B, 4, h, w) -> images (B, 3, 8h, 8w) in about [-1, 1], float32, the batch in one call.
    A half-precision VAE whose output has NaNs is retried with the job's fp32 copy (A1111's
    auto_vae_precision; the model's VAE is never changed). Large images are decoded in tiles, one at a time
    (never in a seamless-tiling job)."""
    tiles = not (job is not None and job.tiling)
    vae_dtype = next(model.vae.parameters()).dtype
    z = latents.to(model.device)
    x = _vae_decode(model.vae, z.to(vae_dtype) / SCALE_FACTOR, tiles)
    if vae_dtype != torch.float32 and torch.isnan(x).any():
        vae = job.vae_fp32() if job is not None else copy.deepcopy(model.vae).float()
        x = _vae_decode(vae, z.float() / SCALE_FACTOR, tiles)
    return x.float()


@torch.no_grad()
def encode_images(model, pixels: torch.Tensor, job: Job) -> torch.Tensor:
    """Images (B, 3, H, W) in [0, 1] -> latents (B, 4, H/8, W/8) * 0.18215, one image at a time. A1111 samples
    the posterior with the global CPU generator; the VAE's logvar is tiny, so we take the mean, which makes
    img2img reproducible. Large images are encoded in tiles."""
    vae_dtype = next(model.vae.parameters()).dtype
    out = []
    for img in pixels:
        x = img[None].to(model.device, vae_dtype) * 2 - 1
        big = x.shape[-2] * x.shape[-1] > TILED_VAE_LATENT_PIXELS * 64
        if big and x.shape[-2] % 8 == 0 == x.shape[-1] % 8 and not job.tiling:
            mean, _ = tiled_encode(model.vae, x)
        else:
            mean, _ = model.vae.encode(x)
        out.append(mean.float() * SCALE_FACTOR)
    return torch.cat(out)


class Job:
    """The state of one generation that must not live on the model: the prompts without their network tags,
    the LoRAs merged for it (restored bit for bit when its `with` block ends), the textual-inversion
    embeddings its prompts matched, the conditioning cache (`encode`: the text options of
    `batch_conditioning`), and an fp32 copy of a half-precision VAE made only when a decode overflows.
    `tiling`: a seamless-tiling job; `infotext_params`: the entries noted while it runs ("Emphasis", and the
    CFG denoiser's "Skip Early CFG" / "NGMS"), in the order A1111 adds them."""

    def __init__(self, model, r: ResolvedRequest):
        self.model = model
        self._vae_fp32 = None
        self.tiling = r.tiling
        self.prompt, networks = extract_networks(r.prompt)
        self.hr_prompt, hr_networks = extract_networks(r.hires.prompt) if r.hires else (self.prompt, None)
        self.networks = NetworkJob(model, networks, hr_networks)
        self.encode = dict(cache={}, clip_skip=r.clip_skip, emphasis=r.emphasis,
                           comma_padding_backtrack=r.comma_padding_backtrack, **self.networks.text_hooks())
        self.infotext_params: dict[str, Any] = {}

    def conditioning(self, prompts: list[str], negative_prompts: list[str], steps: int, **kw):
        """`batch_conditioning` with this job's text options. Notes "Emphasis" as A1111's
        `FrozenCLIPEmbedderWithCustomWordsBase.forward` does: a mode other than "Original" and an encoded text
        (a prompt schedule's, after AND splitting) with "(" or "[" in it."""
        cond, uncond = batch_conditioning(self.model, prompts, negative_prompts, steps, **kw, **self.encode)
        texts = [text for s in cond.scheduled + uncond.scheduled for _, text in s.schedule]
        if self.encode["emphasis"] != "Original" and any("(" in t or "[" in t for t in texts):
            self.infotext_params["Emphasis"] = self.encode["emphasis"]
        return cond, uncond

    def vae_fp32(self):
        if self._vae_fp32 is None:
            self._vae_fp32 = copy.deepcopy(self.model.vae).float()
        return self._vae_fp32

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.networks.finish()


class NetworkJob:
    """The extra networks of one `generate()` call: the LoRA tags of the prompt (`networks`, from
    `sd15.a1111.prompt.extract_networks`) and of the hires prompt (`hr_networks`; None: the same), merged by
    `activate(hires)` (a no-op when they already are) and restored by `finish()` (unless
    `model.loras.keep_applied`); the textual-inversion embeddings its prompts match (`text_hooks()`); their
    infotext hashes (`infotext_params()`), and `warnings` (unknown names, unsupported modules, ...)."""

    def __init__(self, model, networks, hr_networks=None):
        self.model = model
        self.loras = getattr(model, "loras", None)  # sd15.lora.Loras
        self.warnings: list[str] = []
        self._hashes: dict[str, str] = {}
        self.first = self._resolve(networks)
        self.hr = self._resolve(hr_networks) if hr_networks is not None else self.first
        self.embeddings_used: dict = {}  # textual-inversion embeddings this job's prompts matched
        self.embeddings = getattr(model, "embeddings", None)  # sd15.embeddings.EmbeddingDatabase
        if self.embeddings is not None:
            self.embeddings.refresh_if_changed()

    def text_hooks(self) -> dict:
        """`embeddings=` / `embed_fn=` for `encode_texts`, recording this job's matches."""
        if self.embeddings is None:
            return dict(embeddings=None, embed_fn=None)
        find, embed_fn = self.embeddings.hooks(self.model, self.embeddings_used)
        return dict(embeddings=find, embed_fn=embed_fn)

    def _warn(self, text: str) -> None:
        if text not in self.warnings:
            self.warnings.append(text)

    def _resolve(self, networks) -> list:
        out, missing = [], []
        for kind, name, args in networks or ():
            if kind not in LORA_KINDS:
                self._warn(f"extra network <{kind}:{name}> is not supported here and was ignored")
                continue
            try:
                te, unet, dyn = network_multipliers(args)
            except ValueError:
                self._warn(f"<{kind}:{name}:{':'.join(args)}>: cannot read the multipliers; tag ignored")
                continue
            lora = self.loras.find(name) if self.loras is not None else None
            if lora is None:
                if name not in missing:
                    missing.append(name)
                continue
            out.append((lora, LoraRequest(name, te, unet, dyn)))
        if missing:
            self._warn("Networks not found: " + ", ".join(missing))
        return out

    def activate(self, hires: bool = False) -> None:
        """Merge the LoRAs of the prompt, or of the hires prompt."""
        if self.loras is None:
            return
        for w in self.loras.activate(self.model, self.hr if hires else self.first):
            self._warn(w)
        for lora, req in self.loras.applied:  # the ones that could be read
            if req.name not in self._hashes and (h := lora.shorthash()):
                self._hashes[req.name] = h

    def finish(self) -> None:
        if self.loras is not None and not self.loras.keep_applied:
            self.loras.restore()

    def infotext_params(self) -> dict[str, Any]:
        """"Lora hashes" (names as written in the tags) and "TI hashes" (embeddings the prompts matched)."""
        out: dict[str, Any] = {}
        if self._hashes:
            out["Lora hashes"] = infotext.format_hashes(self._hashes.items())
        ti = self.embeddings.infotext_hashes(self.embeddings_used) if self.embeddings is not None else None
        if ti:
            out["TI hashes"] = ti
        return out


@contextmanager
def circular_padding(*modules: nn.Module):
    """A1111's "Tiling" (`modules/sd_hijack.py`, `apply_circular`): within the block every `nn.Conv2d` under
    `modules` pads circularly, so the image wraps around and tiles like a texture. Convs without padding, and
    the explicit zero pad of the VAE encoder's stride-2 downsampling, are unaffected (as in A1111)."""
    saved = {m: m.padding_mode for mod in modules for m in mod.modules() if isinstance(m, nn.Conv2d)}
    try:
        for conv in saved:
            conv.padding_mode = "circular"  # Conv2d.forward: F.pad(mode="circular"), then a padding=0 conv
        yield
    finally:
        for conv, mode in saved.items():
            conv.padding_mode = mode


@contextmanager
def seamless(model, enabled: bool = True):
    """`circular_padding` of the UNet and the VAE. A compiled or CUDA-graph forward installed by `sd15.fast`
    (an instance attribute shadowing the class method) was traced with zero padding and would replay it, so
    the eager class methods run inside the block; the installed ones are put back afterwards."""
    if not enabled:
        yield
        return
    installed = [(m, name, m.__dict__.pop(name)) for m, name in ((model.unet, "forward"), (model.vae, "decode"))
                 if name in m.__dict__]
    try:
        with circular_padding(model.unet, model.vae):
            yield
    finally:
        for m, name, fn in installed:
            setattr(m, name, fn)
