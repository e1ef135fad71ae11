"""Prompts -> CLIP conditioning tensors, the way A1111 builds them.

For each prompt: network tags are stripped (by the caller), the text is split on AND (positive prompts only),
every subprompt is expanded into a prompt schedule (prompt editing / alternation), and the texts of one
schedule are encoded *together*: 75-token chunks in 77-token windows, each chunk position through the text
encoder as one batch, emphasis weights multiplied onto the hidden states, then the "Original" mean
restoration over that whole chunk batch. Chunks are concatenated along the sequence: (77·k, 768).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from sd15.a1111.prompt import empty_chunk, prompt_schedules, schedule_index, split_and, tokenize_prompt

EMPHASIS_MODES = ("Original", "No norm", "Ignore", "None")


@torch.no_grad()
def encode_texts(model, texts: list[str], *, clip_skip: int = 1, emphasis: str = "Original",
                 embed_fn=None, embeddings=None) -> torch.Tensor:
    """Encode texts that share one emphasis mean (the variants of one prompt schedule) -> (N, 77k, 768).

    `embed_fn(tokens, chunks) -> inputs_embeds` lets textual inversion replace token vectors (None: plain ids);
    `embeddings` is the `chunk_tokens` finder that places them. When neither is given, the model's
    textual-inversion embeddings (`model.embeddings`, sd15.embeddings) are used.
    """
    if emphasis not in EMPHASIS_MODES:
        raise ValueError(f"unknown emphasis mode {emphasis!r}; choose one of {', '.join(EMPHASIS_MODES)}")
    if embed_fn is None and embeddings is None and getattr(model, "embeddings", None) is not None:
        embeddings, embed_fn = model.embeddings.hooks(model, {})
    chunked = [tokenize_prompt(t, model.tokenizer.encode, emphasis=emphasis, embeddings=embeddings)[0] for t in texts]
    n_chunks = max(len(c) for c in chunked)
    device = model.device
    outs = []
    for i in range(n_chunks):
        chunks = [c[i] if i < len(c) else empty_chunk() for c in chunked]  # shorter prompts get empty chunks
        tokens = torch.tensor([c.tokens for c in chunks], device=device)  # (N, 77)
        embeds = embed_fn(tokens, chunks) if embed_fn is not None else None
        z = model.text_encoder(tokens, clip_skip=clip_skip, inputs_embeds=embeds)  # (N, 77, 768)
        if emphasis in ("Original", "No norm"):
            w = torch.tensor([c.multipliers for c in chunks], device=device, dtype=z.dtype)[:, :, None]  # (N, 77, 1)
            mean_before = z.mean()
            z = z * w
            if emphasis == "Original":
                z = z * (mean_before / z.mean())  # restore the mean over the whole chunk batch
        outs.append(z)
    return torch.cat(outs, dim=1)  # (N, 77k, 768)


@dataclass
class ScheduledCond:
    """One prompt's schedule: `conds[j]` is used while the model-call counter is <= `schedule[j][0]`."""
    schedule: list[tuple[int, str]]
    conds: torch.Tensor  # (len(schedule), 77k, 768)

    def at(self, step: int) -> torch.Tensor:
        return self.conds[schedule_index(self.schedule, step)]


def learned_conditioning(model, prompts: list[str], steps: int, *, hires_steps=None, use_old_scheduling=False,
                         cache: dict | None = None, **encode_kw) -> list[ScheduledCond]:
    """A1111 `get_learned_conditioning`: one ScheduledCond per prompt; identical prompts are encoded once."""
    cache = {} if cache is None else cache
    out = []
    for prompt in prompts:
        key = (prompt, steps, hires_steps, use_old_scheduling, tuple(sorted(encode_kw.items())))
        if key not in cache:
            schedule = prompt_schedules(prompt, steps, hires_steps, use_old_scheduling)
            conds = encode_texts(model, [text for _, text in schedule], **encode_kw)
            cache[key] = ScheduledCond(schedule, conds)
        out.append(cache[key])
    return out


def stack_conds(tensors: list[torch.Tensor]) -> torch.Tensor:
    """Stack (L_i, 768) tensors; shorter ones are padded by repeating their last token vector (A1111)."""
    length = max(t.shape[0] for t in tensors)
    padded = [torch.cat([t, t[-1:].expand(length - t.shape[0], -1)]) if t.shape[0] < length else t for t in tensors]
    return torch.stack(padded)


class PromptConds:
    """Positive prompts with AND composition: `(step) -> (cond [N, 77k, 768], conds_list)` for CFGDenoiser."""

    def __init__(self, model, prompts: list[str], steps: int, cache=None, **kw):
        self.conds_list_idx = []  # per image: [(index into unique subprompts, weight)]
        unique: dict[str, int] = {}
        for prompt in prompts:
            entries = []
            for text, weight in split_and(prompt):
                entries.append((unique.setdefault(text, len(unique)), weight))
            self.conds_list_idx.append(entries)
        self.scheduled = learned_conditioning(model, list(unique), steps, cache=cache, **kw)

    def __call__(self, step: int):
        tensors, conds_list = [], []
        for entries in self.conds_list_idx:
            rows = []
            for idx, weight in entries:
                rows.append((len(tensors), weight))
                tensors.append(self.scheduled[idx].at(step))
            conds_list.append(rows)
        return stack_conds(tensors), conds_list


class NegativeConds:
    """Negative prompts (no AND splitting, schedules apply): `(step) -> uncond [B, 77k, 768]`."""

    def __init__(self, model, prompts: list[str], steps: int, cache=None, **kw):
        self.scheduled = learned_conditioning(model, prompts, steps, cache=cache, **kw)

    def __call__(self, step: int):
        return stack_conds([s.at(step) for s in self.scheduled])
