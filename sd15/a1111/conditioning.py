"""Prompts -> CLIP conditioning tensors, as A1111 builds them (`modules/prompt_parser.py`,
`modules/sd_hijack_clip.py`): positive prompts split on AND, each subprompt expanded into its prompt schedule,
and the texts of one schedule encoded together: 75-token chunks in 77-token windows, emphasis weights on the
hidden states, then the "Original" mean restoration over that chunk batch; chunks concatenate to (77·k, 768).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from sd15.a1111.prompt import empty_chunk, prompt_schedules, schedule_index, split_and, tokenize_prompt


@torch.no_grad()
def encode_texts(model, texts: list[str], *, clip_skip: int = 1, emphasis: str = "Original",
                 embed_fn=None, embeddings=None) -> torch.Tensor:
    """Encode texts that share one emphasis mean (the variants of one prompt schedule) -> (N, 77k, 768).
    `embed_fn(tokens, chunks) -> inputs_embeds` lets textual inversion replace token vectors, `embeddings` is
    the finder that places them; when neither is given, the model's own (`model.embeddings`) are used."""
    return encode_groups(model, [texts], clip_skip=clip_skip, emphasis=emphasis, embed_fn=embed_fn,
                         embeddings=embeddings)[0]


@torch.no_grad()
def encode_groups(model, groups: list[list[str]], *, clip_skip: int = 1, emphasis: str = "Original",
                  embed_fn=None, embeddings=None, comma_padding_backtrack: int = 20) -> list[torch.Tensor]:
    """`encode_texts` of several groups (e.g. the schedules of the prompt and of the negative prompt) with one
    text-encoder forward per chunk position: each group keeps its own chunk count (its shorter texts padded
    with empty chunks) and its own emphasis mean, exactly as when encoded alone; only the forward is shared.
    Returns one (N_g, 77·k_g, 768) tensor per group. `comma_padding_backtrack`: A1111's option of that name
    (`chunk_tokens`)."""
    if embed_fn is None and embeddings is None and getattr(model, "embeddings", None) is not None:
        embeddings, embed_fn = model.embeddings.hooks(model, {})
    chunked = [[tokenize_prompt(t, model.tokenizer.encode, emphasis=emphasis, embeddings=embeddings,
                                comma_padding_backtrack=comma_padding_backtrack)[0] for t in texts]
               for texts in groups]
    n_chunks = [max(len(c) for c in group) for group in chunked]
    device = model.device
    outs: list[list[torch.Tensor]] = [[] for _ in groups]
    for i in range(max(n_chunks)):
        live = [g for g, n in enumerate(n_chunks) if i < n]  # groups that still have a chunk at position i
        rows = [[c[i] if i < len(c) else empty_chunk() for c in chunked[g]] for g in live]  # shorter: empty chunks
        chunks = [chunk for group_rows in rows for chunk in group_rows]
        tokens = torch.tensor([c.tokens for c in chunks], device=device)  # (R, 77), all live groups' rows
        embeds = embed_fn(tokens, chunks) if embed_fn is not None else None
        z_all = model.text_encoder(tokens, clip_skip=clip_skip, inputs_embeds=embeds)  # (R, 77, 768)
        for g, group_rows, z in zip(live, rows, z_all.split([len(r) for r in rows])):
            if emphasis in ("Original", "No norm"):
                w = torch.tensor([c.multipliers for c in group_rows], device=device, dtype=z.dtype)[:, :, None]
                mean_before = z.mean()  # (N_g, 77, 1) weights; the mean is over this group's chunk batch
                z = z * w
                if emphasis == "Original":
                    z = z * (mean_before / z.mean())
            outs[g].append(z)
    return [torch.cat(o, dim=1) for o in outs]  # (N_g, 77k_g, 768) each


@dataclass
class ScheduledCond:
    """One prompt's schedule: `conds[j]` is used while the model-call counter is <= `schedule[j][0]`."""
    schedule: list[tuple[int, str]]
    conds: torch.Tensor  # (len(schedule), 77k, 768)

    def at(self, step: int) -> torch.Tensor:
        return self.conds[schedule_index(self.schedule, step)]


def learned_conditioning(model, prompts: list[str], steps: int, *, hires_steps=None, use_old_scheduling=False,
                         cache: dict | None = None, **encode_kw) -> list[ScheduledCond]:
    """A1111 `get_learned_conditioning`: one ScheduledCond per prompt; identical prompts are encoded once, and
    all prompts not yet in `cache` share one text-encoder forward per chunk position (`encode_groups`)."""
    cache = {} if cache is None else cache
    keys = [(prompt, steps, hires_steps, use_old_scheduling, tuple(sorted(encode_kw.items()))) for prompt in prompts]
    todo = {key: prompt_schedules(key[0], steps, hires_steps, use_old_scheduling)
            for key in dict.fromkeys(keys) if key not in cache}
    if todo:
        encoded = encode_groups(model, [[text for _, text in schedule] for schedule in todo.values()], **encode_kw)
        for (key, schedule), conds in zip(todo.items(), encoded):
            cache[key] = ScheduledCond(schedule, conds)
    return [cache[key] for key in keys]


def stack_conds(tensors: list[torch.Tensor]) -> torch.Tensor:
    """Stack (L_i, 768) tensors; shorter ones are padded by repeating their last token vector (A1111)."""
    length = max(t.shape[0] for t in tensors)
    padded = [torch.cat([t, t[-1:].expand(length - t.shape[0], -1)]) if t.shape[0] < length else t for t in tensors]
    return torch.stack(padded)


def batch_conditioning(model, prompts: list[str], negative_prompts: list[str], steps: int, *, cache=None,
                       **kw) -> tuple["PromptConds", "NegativeConds"]:
    """The cond and uncond of one batch, all their texts encoded together (one text-encoder forward per chunk
    position instead of one per prompt); each prompt's result is what it would be alone. The positive prompts
    are split on AND (A1111 `get_multicond_learned_conditioning`), the negative ones are not."""
    unique: dict[str, int] = {}  # the AND-subprompts of all prompts, each once, in order
    conds_list_idx = [[(unique.setdefault(text, len(unique)), weight) for text, weight in split_and(prompt)]
                      for prompt in prompts]  # per image: [(index into unique, weight)]
    scheduled = learned_conditioning(model, [*unique, *negative_prompts], steps, cache=cache, **kw)
    return PromptConds(conds_list_idx, scheduled[:len(unique)]), NegativeConds(scheduled[len(unique):])


@dataclass
class PromptConds:
    """Positive prompts with AND composition: `(step) -> (cond [N, 77k, 768], conds_list)` for CFGDenoiser."""
    conds_list_idx: list  # per image: [(index into scheduled, weight)]
    scheduled: list[ScheduledCond]

    def __call__(self, step: int):
        tensors, conds_list = [], []  # conds_list: per image [(row in the stacked cond, weight)]
        for entries in self.conds_list_idx:
            conds_list.append([(len(tensors) + j, weight) for j, (_, weight) in enumerate(entries)])
            tensors.extend(self.scheduled[idx].at(step) for idx, _ in entries)
        return stack_conds(tensors), conds_list


@dataclass
class NegativeConds:
    """Negative prompts (no AND splitting, schedules apply): `(step) -> uncond [B, 77k, 768]`."""
    scheduled: list[ScheduledCond]

    def __call__(self, step: int):
        return stack_conds([s.at(step) for s in self.scheduled])
