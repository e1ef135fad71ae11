"""txt2img and img2img the way AUTOMATIC1111 runs them (generation.md §0.1, §5, §8–§10).

One request is a `Params` (the A1111 API field names and defaults, plus the A1111 options that change the
numbers: randn_source, eta_noise_seed_delta, clip_skip). `generate(model, params)` runs `n_iter` batches of
`batch_size` images:

    seeds -> per batch: prompts (network tags stripped) -> cond / uncond schedules (sd15.conditioning)
          -> ImageRNG (sd15.rng) -> sampler (sd15.samplers.sample) -> [hires pass] -> VAE decode -> PIL

and returns a `Result` with the images, seeds, A1111 infotexts and info dict.

Hooks for researchers, none of which need an edit here: `callback(step, sigma, x, denoised)` after every
sampler step; `state` (a `JobState`) whose `interrupt()` / `skip()` may be called from another thread and are
checked between steps; attention capture or replacement through `sd15.attention.use_attention_backend`; and
`Result.latents`, the final latents of every image before decoding.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from sd15 import images as imgs
from sd15 import infotext
from sd15.conditioning import NegativeConds, PromptConds
from sd15.lora import NetworkJob
from sd15.prompt import extract_networks
from sd15.rng import ImageRNG
from sd15.samplers import A1111_DEFAULTS, CFGDenoiser, EpsDenoiser, sample
from sd15.vae.tiled import tiled_decode, tiled_encode
from sd15.vae.vae import SCALE_FACTOR


@dataclass
class Params:
    """One A1111 txt2img / img2img request. Field names and defaults are A1111's API ones (a1111-api.md §4–§5)."""
    prompt: str = ""
    negative_prompt: str = ""
    seed: int = -1
    subseed: int = -1
    subseed_strength: float = 0.0
    seed_resize_from_h: int = -1
    seed_resize_from_w: int = -1
    sampler_name: str | None = None  # None -> "Euler", the API default (sampler_index)
    scheduler: str | None = None  # None -> "Automatic"
    batch_size: int = 1
    n_iter: int = 1
    steps: int = 50
    cfg_scale: float = 7.0
    width: int = 512
    height: int = 512
    eta: float | None = None
    s_churn: float | None = None
    s_tmin: float | None = None
    s_tmax: float | None = None
    s_noise: float | None = None
    s_min_uncond: float | None = None
    denoising_strength: float | None = None
    # hires fix (txt2img)
    enable_hr: bool = False
    hr_scale: float = 2.0
    hr_upscaler: str | None = None  # None -> "Latent"
    hr_second_pass_steps: int = 0
    hr_resize_x: int = 0
    hr_resize_y: int = 0
    hr_sampler_name: str | None = None
    hr_scheduler: str | None = None
    hr_prompt: str = ""
    hr_negative_prompt: str = ""
    # img2img / inpainting
    init_images: list | None = None
    resize_mode: int = 0
    mask: Any = None
    mask_blur: int | None = None
    mask_blur_x: int = 4
    mask_blur_y: int = 4
    mask_round: bool = True
    inpainting_fill: int = 0
    inpaint_full_res: bool = True
    inpaint_full_res_padding: int = 0
    inpainting_mask_invert: int = 0
    initial_noise_multiplier: float | None = None
    # A1111 settings that change the numbers
    randn_source: str = "GPU"  # "GPU" | "CPU" | "NV"
    eta_noise_seed_delta: int = 0
    clip_skip: int = 1

    @classmethod
    def from_kwargs(cls, **kw) -> "Params":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(kw) - names)
        if unknown:
            raise TypeError(f"unknown generation parameter(s): {', '.join(unknown)}")
        return cls(**kw)


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


class JobState:
    """Progress and control of the running job. Plain attributes: another thread (the server) may read them
    and call `interrupt()` / `skip()` at any time; the pipeline checks the flags between sampler steps."""

    def __init__(self):
        self.interrupted = False
        self.skipped = False
        self.job_no = 0
        self.job_count = 0
        self.sampling_step = 0
        self.sampling_steps = 0
        self.current_latent = None

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


# ------------------------------------------------------------------------------------------------
# VAE
# ------------------------------------------------------------------------------------------------

# Above this many latent pixels (1024 x 1024 images) the VAE runs in tiles (sd15.vae.tiled, exact mode: the same
# result up to float rounding, with memory bounded by the tile size).
TILED_VAE_LATENT_PIXELS = 128 * 128


def _vae_decode(model, z: torch.Tensor) -> torch.Tensor:
    if z.shape[-2] * z.shape[-1] > TILED_VAE_LATENT_PIXELS:
        return tiled_decode(model.vae, z)
    try:
        return model.vae.decode(z)
    except torch.OutOfMemoryError:  # a smaller GPU: retry in tiles, keeping the big maps in host memory
        torch.cuda.empty_cache()
        return tiled_decode(model.vae, z, storage="cpu")


@torch.no_grad()
def decode_latents(model, latents: torch.Tensor) -> torch.Tensor:
    """Sampler latents (B, 4, h, w) -> images (B, 3, 8h, 8w) in about [-1, 1], float32, one image at a time.

    The latent is cast to the VAE dtype; a half-precision VAE whose output has NaNs is retried in fp32
    (A1111's auto_vae_precision). Large images are decoded in tiles.
    """
    vae_dtype = next(model.vae.parameters()).dtype
    out = []
    for z in latents:
        z = z[None].to(model.device)
        x = _vae_decode(model, z.to(vae_dtype) / SCALE_FACTOR)
        if vae_dtype != torch.float32 and torch.isnan(x).any():
            model.vae.float()
            try:
                x = _vae_decode(model, z.float() / SCALE_FACTOR)
            finally:
                model.vae.to(vae_dtype)
        out.append(x.float())
    return torch.cat(out)


@torch.no_grad()
def encode_images(model, pixels: torch.Tensor) -> torch.Tensor:
    """Images (B, 3, H, W) in [0, 1] -> latents (B, 4, H/8, W/8) * 0.18215, one image at a time.

    A1111 samples the posterior with the global CPU generator; the VAE's logvar is tiny, so we use the mean
    (generation.md §8.2, Appendix B.3), which makes img2img reproducible. Large images are encoded in tiles.
    """
    vae_dtype = next(model.vae.parameters()).dtype
    out = []
    for img in pixels:
        x = img[None].to(model.device, vae_dtype) * 2 - 1
        if x.shape[-2] * x.shape[-1] > TILED_VAE_LATENT_PIXELS * 64 and x.shape[-2] % 8 == 0 == x.shape[-1] % 8:
            mean, _ = tiled_encode(model.vae, x)
        else:
            mean, _ = model.vae.encode(x)
        out.append(mean.float() * SCALE_FACTOR)
    return torch.cat(out)


# ------------------------------------------------------------------------------------------------
# img2img inputs
# ------------------------------------------------------------------------------------------------

def _as_image(value, mode="RGB"):
    from PIL import Image

    return value if isinstance(value, Image.Image) else imgs.load_image(value, mode=mode)


class Img2ImgInit:
    """The init images, mask and overlays of an img2img job, prepared once as A1111's img2img `init` does
    (generation.md §8.2–§8.4); `latent()` encodes them once, `finish()` pastes results back."""

    def __init__(self, p: Params, batch_size: int):
        from PIL import Image

        images = [_as_image(im, mode=None) for im in p.init_images]
        if len(images) > batch_size and len(images) > 1:
            raise ValueError(f"bad number of images passed: {len(images)} init images for batch_size {batch_size}")
        self.batch_size = len(images) if len(images) > 1 else batch_size
        self.p = p
        self.inpaint = None
        if p.mask is not None:
            blur = p.mask_blur if p.mask_blur is not None else (p.mask_blur_x, p.mask_blur_y)
            mask = imgs.prepare_mask(_as_image(p.mask, mode=None), blur, invert=bool(p.inpainting_mask_invert),
                                     mask_round=p.mask_round)
            inpaint = imgs.prepare_inpaint_mask(mask, p.width, p.height, p.resize_mode, p.inpaint_full_res,
                                                p.inpaint_full_res_padding)
            self.inpaint = inpaint if inpaint["image_mask"] is not None else None  # blank "only masked" mask
        self.images, self.overlays = [], []
        for im in images:
            if not isinstance(im, Image.Image):
                raise ValueError("init image is not an image")
            image, overlay, mask_for_overlay = imgs.prepare_init_image(
                im, p.width, p.height, p.resize_mode, self.inpaint, p.inpainting_fill)
            if self.inpaint is not None:
                self.inpaint["mask_for_overlay"] = mask_for_overlay
            self.images.append(image)
            self.overlays.append(overlay)
        if len(self.images) == 1:  # a single init image is repeated over the batch
            self.images *= self.batch_size
            self.overlays *= self.batch_size
        self._latent = None
        self._masks = None

    @property
    def has_mask(self) -> bool:
        return self.inpaint is not None

    def latent(self, model, first_seeds, rng_kw) -> torch.Tensor:
        """The init latent (B, 4, H/8, W/8), with the latent side of "masked content" applied."""
        if self._latent is None:
            p = self.p
            z = encode_images(model, imgs.pil_to_unit_tensor(self.images))
            if p.resize_mode == 3:  # "Just resize (latent upscale)": encoded at its own size, resized as a latent
                z = imgs.upscale_latent(z, "Latent", p.width, p.height)
            if self.has_mask:
                mask, nmask = self.latent_masks(model)
                noise = None
                if p.inpainting_fill == 2:  # "latent noise": the first draw for the first batch's seeds
                    noise = ImageRNG(tuple(z.shape[1:]), first_seeds, **rng_kw).first()
                z = imgs.apply_masked_content(z, mask, nmask, p.inpainting_fill, noise)
            self._latent = z
        return self._latent

    def latent_masks(self, model):
        """(mask, nmask), each (1, 1, h, w): mask is 1 where the original is kept, nmask 1 where it is redrawn."""
        if self._masks is None and self.has_mask:
            mask, nmask = imgs.latent_mask(self.inpaint["latent_mask"], self.p.height // 8, self.p.width // 8,
                                           self.p.mask_round)
            self._masks = (mask.to(model.device), nmask.to(model.device))
        return self._masks

    def blend(self, x: torch.Tensor) -> torch.Tensor:
        mask, nmask = self._masks
        return imgs.blend_inpaint_latent(x, self._latent, mask, nmask)

    def finish(self, images: list) -> list:
        """Paste one batch's results back into the originals (inpainting overlays, "only masked" crop)."""
        if not self.has_mask:
            return images
        paste_to = self.inpaint.get("paste_to")
        return [imgs.apply_overlay(im, paste_to, overlay) for im, overlay in zip(images, self.overlays)]


# ------------------------------------------------------------------------------------------------
# Generation
# ------------------------------------------------------------------------------------------------

RANDN_SOURCES = {"GPU": "gpu", "CPU": "cpu", "NV": "nv"}


@dataclass
class _Pass:
    """What one sampling pass needs besides the latent: sampler, schedule, prompts, step count."""
    sampler: str
    scheduler: str
    steps: int
    prompts: list[str]
    negative_prompts: list[str]


def validate(p: Params) -> None:
    """Raise ValueError with a one-line reason for a request that cannot run (before any model work)."""
    if not 1 <= p.steps <= 10000:
        raise ValueError(f"steps must be between 1 and 10000, got {p.steps}")
    if p.width < 8 or p.height < 8:
        raise ValueError(f"width and height must be at least 8, got {p.width}x{p.height}")
    if p.batch_size < 1 or p.n_iter < 1:
        raise ValueError("batch_size and n_iter must be at least 1")
    if p.randn_source not in RANDN_SOURCES:
        raise ValueError(f"randn_source must be one of {', '.join(RANDN_SOURCES)}, got {p.randn_source!r}")
    if p.init_images is not None and not p.init_images:
        raise ValueError("img2img needs init_images")
    strength = p.denoising_strength
    if strength is not None and not 0.0 <= strength <= 1.0:
        raise ValueError(f"denoising_strength must be between 0 and 1, got {strength}")
    if not 1 <= p.clip_skip <= 12:
        raise ValueError(f"clip_skip must be between 1 and 12, got {p.clip_skip}")
    _resolve_names(p.sampler_name, p.scheduler)
    if p.enable_hr and p.init_images is None:
        _resolve_names(p.hr_sampler_name or p.sampler_name, p.hr_scheduler or p.scheduler)
        imgs.resolve_hr_upscaler(p.hr_upscaler)


def schedule_steps(sampler: str, steps: int) -> int:
    """Steps that prompt-editing schedules count: doubled for second-order samplers (generation.md §7.5)."""
    return steps * (2 if A1111_DEFAULTS[sampler].second_order else 1)


def _sample_batch(model, ps: _Pass, p: Params, rng: ImageRNG, state: JobState, callback, cache, *,
                  init_latent=None, strength=None, fix_steps=False, sched=None, mask=None):
    """One sampler run over one batch: conditioning, CFG, the sampler; returns the latents (B, 4, h, w).

    `sched` holds the step counts prompt schedules resolve against (`steps`, and `hires_steps` in a hires pass).
    """
    sched = sched or dict(steps=schedule_steps(ps.sampler, ps.steps))
    enc = dict(clip_skip=p.clip_skip, cache=cache)
    cond = PromptConds(model, ps.prompts, **sched, **enc)
    uncond = NegativeConds(model, ps.negative_prompts, **sched, **enc)
    eps = EpsDenoiser(model.unet, model.alphas_cumprod.to(model.device))
    denoiser = CFGDenoiser(eps, cond, uncond, p.cfg_scale, s_min_uncond=p.s_min_uncond or 0.0)
    if mask is not None:
        denoiser.set_mask(*mask, init_latent)

    def on_step(d):
        state.sampling_step = d["i"] + 1
        state.current_latent = d["denoised"]
        if callback is not None:
            callback(d["i"], d["sigma"], d["x"], d["denoised"])
        if state.interrupted or state.skipped:
            raise Interrupted

    state.sampling_step = 0
    state.sampling_steps = ps.steps
    try:
        return sample(ps.sampler, denoiser, rng, ps.steps, scheduler=ps.scheduler, init_latent=init_latent,
                      denoising_strength=strength if strength is not None else 0.75, fix_steps=fix_steps,
                      eta=p.eta, s_churn=p.s_churn, s_tmin=p.s_tmin, s_tmax=p.s_tmax, s_noise=p.s_noise,
                      initial_noise_multiplier=p.initial_noise_multiplier, callback=on_step)
    except Interrupted:
        latent = state.current_latent  # A1111 keeps the last denoised estimate
        if latent is None:  # stopped before the first step finished
            latent = init_latent if init_latent is not None else torch.zeros(len(rng.seeds), *rng.shape,
                                                                              device=rng.device)
        return latent


def _resolve_names(sampler_name, scheduler):
    """A1111 names (old combined ones too) -> (sampler, scheduler label); unknown names raise ValueError."""
    return infotext.resolve_sampler(sampler_name or "Euler", scheduler)


def generate(model, p: Params, *, state: JobState | None = None, callback: Callable | None = None) -> Result:
    """Run one A1111 request (txt2img, or img2img when `p.init_images` is set) -> Result."""
    try:
        return _generate(model, p, state=state, callback=callback)
    finally:  # LoRA weights merged for the job are restored bit for bit, even when it fails (sd15.lora)
        if getattr(model, "loras", None) is not None:
            model.loras.finish_job()


@torch.no_grad()
def _generate(model, p: Params, *, state: JobState | None = None, callback: Callable | None = None) -> Result:
    state = state or JobState()
    is_img2img = p.init_images is not None
    validate(p)
    sampler, scheduler = _resolve_names(p.sampler_name, p.scheduler)
    hr_sampler, hr_scheduler = (_resolve_names(p.hr_sampler_name or sampler, p.hr_scheduler or scheduler)
                                if p.enable_hr and not is_img2img else (None, None))
    source = RANDN_SOURCES[p.randn_source]
    B = p.batch_size
    init = None
    if is_img2img:
        init = Img2ImgInit(p, B)  # resized init images, masks, crop region
        B = init.batch_size
    n = B * p.n_iter
    seed, subseed = infotext.fixed_seed(p.seed), infotext.fixed_seed(p.subseed)
    all_seeds, all_subseeds = infotext.job_seeds(seed, subseed, p.subseed_strength, n)
    prompt, networks = extract_networks(p.prompt)
    hr_prompt, hr_networks = extract_networks(p.hr_prompt or p.prompt)
    nets = NetworkJob(model, networks, hr_networks if hr_sampler else None)  # LoRA tags, embeddings (sd15.lora)
    warnings = nets.warnings
    w8, h8 = p.width // 8, p.height // 8
    cache: dict = {}
    rng_kw = dict(subseed_strength=p.subseed_strength, seed_resize_from_h=p.seed_resize_from_h,
                  seed_resize_from_w=p.seed_resize_from_w, eta_noise_seed_delta=p.eta_noise_seed_delta,
                  source=source, device=model.device)

    state.job_count = p.n_iter * (2 if hr_sampler else 1)
    latents, images, kept = [], [], []  # kept: job-wide indices of the images returned
    for it in range(p.n_iter):
        if state.interrupted:
            break
        state.skipped = False
        state.job_no = it * (2 if hr_sampler else 1)
        seeds, subseeds = all_seeds[it * B:(it + 1) * B], all_subseeds[it * B:(it + 1) * B]
        rng = ImageRNG((4, h8, w8), seeds, subseeds=subseeds, **rng_kw)
        nets.first_pass()  # merge the prompt's LoRAs (nothing to do when they already are)
        first = _Pass(sampler, scheduler, p.steps, [prompt] * B, [p.negative_prompt] * B)
        if is_img2img:
            x = _sample_batch(model, first, p, rng, state, callback, cache,
                              init_latent=init.latent(model, all_seeds[:B], rng_kw),
                              strength=p.denoising_strength if p.denoising_strength is not None else 0.75,
                              mask=init.latent_masks(model))
            if init.has_mask:
                x = init.blend(x)
        else:
            x = _sample_batch(model, first, p, rng, state, callback, cache)
        if state.skipped:
            continue
        if hr_sampler and not state.interrupted:
            state.job_no += 1
            nets.hires_pass()  # the hires prompt's LoRAs
            x = _hires_pass(model, p, x, seeds, subseeds, rng_kw, state, callback, cache,
                            _Pass(hr_sampler, hr_scheduler, p.hr_second_pass_steps or p.steps,
                                  [hr_prompt] * B, [p.hr_negative_prompt or p.negative_prompt] * B), sampler)
        latents.append(x)
        decoded = decode_latents(model, x)
        batch_images = imgs.tensor_to_pil(decoded)
        if is_img2img:
            batch_images = init.finish(batch_images)
        images.extend(batch_images)
        kept.extend(range(it * B, it * B + len(batch_images)))
    state.job_no = state.job_count

    gp = _generation_params(model, p, seed=seed, subseed=subseed, batch_size=B, sampler=sampler, scheduler=scheduler,
                            is_img2img=is_img2img, hr_sampler=hr_sampler, hr_scheduler=hr_scheduler,
                            has_mask=bool(init is not None and init.has_mask), networks_extra=nets.infotext_params())
    texts = [infotext.create_infotext(gp, i) for i in kept]
    info = infotext.create_info(gp, texts, job_timestamp=infotext.job_timestamp())
    return Result(images=images, seeds=[all_seeds[i] for i in kept], subseeds=[all_subseeds[i] for i in kept],
                  infotexts=texts, info=info, prompts=[p.prompt] * len(images),
                  negative_prompts=[p.negative_prompt] * len(images),
                  latents=torch.cat(latents) if latents else None, warnings=warnings, interrupted=state.interrupted)


def _generation_params(model, p: Params, *, seed, subseed, batch_size, sampler, scheduler, is_img2img,
                       hr_sampler, hr_scheduler, has_mask, networks_extra=None) -> infotext.GenerationParams:
    """What the infotexts and the info dict say about this job."""
    extra = dict(networks_extra or {})  # "Lora hashes", "TI hashes"
    if p.s_min_uncond:
        extra["NGMS"] = p.s_min_uncond
    hr = dict(enable_hr=True, hr_scale=p.hr_scale, hr_upscaler=p.hr_upscaler or "Latent",
              hr_second_pass_steps=p.hr_second_pass_steps, hr_resize_x=p.hr_resize_x, hr_resize_y=p.hr_resize_y,
              hr_sampler_name=None if hr_sampler == sampler else hr_sampler,
              hr_scheduler=None if hr_scheduler == scheduler else hr_scheduler) if hr_sampler else {}
    img2img = dict(mask_blur_x=p.mask_blur if p.mask_blur is not None else p.mask_blur_x,
                   mask_blur_y=p.mask_blur if p.mask_blur is not None else p.mask_blur_y,
                   inpainting_fill=p.inpainting_fill, inpaint_full_res=p.inpaint_full_res,
                   inpaint_full_res_padding=p.inpaint_full_res_padding,
                   inpainting_mask_invert=p.inpainting_mask_invert) if has_mask else {}
    strength = p.denoising_strength
    if (is_img2img or hr_sampler) and strength is None:
        strength = 0.75
    return infotext.GenerationParams.for_job(
        p.prompt, p.negative_prompt, seed=seed, subseed=subseed, subseed_strength=p.subseed_strength,
        batch_size=batch_size, n_iter=p.n_iter, hr_prompt=p.hr_prompt, hr_negative_prompt=p.hr_negative_prompt,
        is_img2img=is_img2img, sampler_name=sampler, scheduler=scheduler, steps=p.steps, cfg_scale=p.cfg_scale,
        width=p.width, height=p.height, seed_resize_from_w=p.seed_resize_from_w,
        seed_resize_from_h=p.seed_resize_from_h, eta=p.eta, denoising_strength=strength if (is_img2img or hr) else None,
        has_mask=has_mask, initial_noise_multiplier=p.initial_noise_multiplier if is_img2img else None,
        clip_skip=p.clip_skip, eta_noise_seed_delta=p.eta_noise_seed_delta, randn_source=p.randn_source,
        extra_generation_params=extra, **model_infotext_fields(model), **hr, **img2img)


def model_infotext_fields(model) -> dict:
    """Model / VAE name and short hash for infotexts: the hashes a loader kept (`model.sha256`,
    `model.vae_sha256`, so a file moved or deleted since does not matter), else cached beside the files."""
    import os

    out = {}
    if getattr(model, "path", None):
        out["sd_model_name"] = os.path.splitext(os.path.basename(model.path))[0]
        out["sd_model_hash"] = infotext.short_hash(getattr(model, "sha256", None) or infotext.cached_hash(model.path))
    if getattr(model, "vae_path", None):
        out["sd_vae_name"] = os.path.basename(model.vae_path)
        out["sd_vae_hash"] = infotext.short_hash(getattr(model, "vae_sha256", None)
                                                 or infotext.cached_hash(model.vae_path))
    return out


def _hires_pass(model, p: Params, x, seeds, subseeds, rng_kw, state, callback, cache, ps: _Pass, first_sampler: str):
    """Upscale the first-pass latents and run an img2img pass at the target size (generation.md §9)."""
    hr_w, hr_h, trunc_x, trunc_y = imgs.hires_target_size(p.width, p.height, p.hr_scale, p.hr_resize_x, p.hr_resize_y)
    upscaler = p.hr_upscaler or "Latent"
    if upscaler in imgs.LATENT_UPSCALE_MODES:
        z = imgs.upscale_latent(x, upscaler, hr_w, hr_h)
    else:
        pixels = [imgs.upscale_image(im, upscaler, hr_w, hr_h) for im in imgs.tensor_to_pil(decode_latents(model, x))]
        z = encode_images(model, imgs.pil_to_unit_tensor(pixels))
    z = imgs.truncate_latent(z, trunc_x, trunc_y)  # crop to the requested aspect ratio, centrally
    rng = ImageRNG(tuple(z.shape[1:]), seeds, subseeds=subseeds, **rng_kw)  # a new RNG at the hires shape
    strength = p.denoising_strength if p.denoising_strength is not None else 0.75
    return _sample_batch(model, ps, dataclasses.replace(p, initial_noise_multiplier=None), rng, state, callback,
                         cache, init_latent=z, strength=strength, fix_steps=True,
                         sched=dict(steps=schedule_steps(first_sampler, p.steps),
                                    hires_steps=schedule_steps(ps.sampler, ps.steps)))


def png_bytes(image, text: str | None = None) -> bytes:
    """PNG bytes carrying the infotext as A1111's `parameters` tEXt chunk."""
    import io

    from PIL.PngImagePlugin import PngInfo

    meta = None
    if text:
        meta = PngInfo()
        meta.add_text("parameters", text)
    buf = io.BytesIO()
    image.save(buf, format="PNG", pnginfo=meta)
    return buf.getvalue()


def save_png(image, path: str, text: str | None = None) -> None:
    with open(path, "wb") as f:
        f.write(png_bytes(image, text))

