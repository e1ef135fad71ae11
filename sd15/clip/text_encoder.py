"""The CLIP ViT-L/14 text tower that conditions SD 1.5 (Radford et al. 2021, "Learning Transferable Visual
Models From Natural Language Supervision"), in the layout of `transformers`' CLIPTextModel that LDM's
FrozenCLIPEmbedder wraps: attribute names are the checkpoint keys under
`cond_stage_model.transformer.text_model.` (`sd15.checkpoint` handles old checkpoints without `text_model.`).
SD 1.5: 49408 tokens, 77 positions, width 768, 12 pre-norm layers of 12 causal heads, MLP 3072 with
quick_gelu; output after `final_layer_norm`.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from sd15.attention import attention


@dataclass(frozen=True)
class CLIPTextConfig:
    vocab_size: int = 49408
    max_position_embeddings: int = 77
    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    layer_norm_eps: float = 1e-5

    @staticmethod
    def from_state_dict(sd: dict) -> "CLIPTextConfig":
        """Read the architecture off the tensor shapes (keys without the checkpoint prefix)."""
        vocab, width = sd["embeddings.token_embedding.weight"].shape
        layers = 1 + max(int(k.split(".")[2]) for k in sd if k.startswith("encoder.layers."))
        return CLIPTextConfig(
            vocab_size=vocab, max_position_embeddings=sd["embeddings.position_embedding.weight"].shape[0],
            hidden_size=width, intermediate_size=sd["encoder.layers.0.mlp.fc1.weight"].shape[0],
            num_hidden_layers=layers,
            num_attention_heads=max(1, width // 64),  # CLIP text towers use 64-wide heads (768 -> 12)
        )


CLIP_TINY = CLIPTextConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=1)


class CLIPEmbeddings(nn.Module):
    def __init__(self, cfg: CLIPTextConfig):
        super().__init__()
        # `_weight` skips the random init: the tables come from the checkpoint (and initialising on the meta
        # device would import torch's compiler stack, seconds of load time)
        self.token_embedding = nn.Embedding(cfg.vocab_size, cfg.hidden_size,
                                            _weight=torch.empty(cfg.vocab_size, cfg.hidden_size))
        self.position_embedding = nn.Embedding(cfg.max_position_embeddings, cfg.hidden_size,
                                               _weight=torch.empty(cfg.max_position_embeddings, cfg.hidden_size))

    def forward(self, tokens=None, inputs_embeds=None):
        """tokens: (B, L) ids, or inputs_embeds: (B, L, C) already looked up (textual inversion) -> (B, L, C)."""
        x = self.token_embedding(tokens) if inputs_embeds is None else inputs_embeds
        return x + self.position_embedding.weight[: x.shape[1]].to(x.dtype)


class CLIPAttention(nn.Module):
    def __init__(self, cfg: CLIPTextConfig):
        super().__init__()
        self.heads = cfg.num_attention_heads
        c = cfg.hidden_size
        self.q_proj = nn.Linear(c, c)
        self.k_proj = nn.Linear(c, c)
        self.v_proj = nn.Linear(c, c)
        self.out_proj = nn.Linear(c, c)

    def forward(self, x):
        b, l, c = x.shape
        h = self.heads
        q, k, v = (p(x).view(b, l, h, c // h).transpose(1, 2) for p in (self.q_proj, self.k_proj, self.v_proj))  # (B, H, L, D)
        y = attention(q, k, v, causal=True)  # a token sees only itself and earlier tokens
        return self.out_proj(y.transpose(1, 2).reshape(b, l, c))  # (B, L, C)


class CLIPMLP(nn.Module):
    def __init__(self, cfg: CLIPTextConfig):
        super().__init__()
        self.fc1 = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.fc2 = nn.Linear(cfg.intermediate_size, cfg.hidden_size)

    def forward(self, x):
        x = self.fc1(x)
        return self.fc2(x * torch.sigmoid(1.702 * x))  # CLIP-L uses quick_gelu, not erf GELU


class CLIPEncoderLayer(nn.Module):
    def __init__(self, cfg: CLIPTextConfig):
        super().__init__()
        self.self_attn = CLIPAttention(cfg)
        self.layer_norm1 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.mlp = CLIPMLP(cfg)
        self.layer_norm2 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def forward(self, x):
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class CLIPEncoder(nn.Module):
    def __init__(self, cfg: CLIPTextConfig):
        super().__init__()
        self.layers = nn.ModuleList([CLIPEncoderLayer(cfg) for _ in range(cfg.num_hidden_layers)])


class CLIPTextModel(nn.Module):
    def __init__(self, cfg: CLIPTextConfig = CLIPTextConfig()):
        super().__init__()
        self.cfg = cfg
        self.embeddings = CLIPEmbeddings(cfg)
        self.encoder = CLIPEncoder(cfg)
        self.final_layer_norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def forward(self, tokens: torch.Tensor | None = None, clip_skip: int = 1, inputs_embeds=None) -> torch.Tensor:
        """tokens: (B, 77) ids -> (B, 77, 768). A1111's "Clip skip" n takes the n-th hidden state from the end
        (n = 1: the last), then final_layer_norm."""
        n_layers = len(self.encoder.layers)
        if not 1 <= clip_skip <= n_layers:
            raise ValueError(f"clip_skip must be between 1 and {n_layers}, got {clip_skip}")
        x = self.embeddings(tokens, inputs_embeds)  # (B, L, C)
        for layer in self.encoder.layers[: n_layers - clip_skip + 1]:
            x = layer(x)
        return self.final_layer_norm(x)  # (B, L, C)
