"""The reference stack the parity tests compare against: diffusers' own LDM converters feeding
`UNet2DConditionModel` / `AutoencoderKL`, and transformers' `CLIPTextModel`, all built from configs that
match an sd15 config (full size or tiny) and loaded with strict=True."""
from __future__ import annotations

import torch

from sd15.clip.text_encoder import CLIPTextConfig
from sd15.unet.unet import UNetConfig
from sd15.vae.vae import VAEConfig


def rel_err(ours: torch.Tensor, ref: torch.Tensor) -> float:
    """max |ours - ref| / max |ref|: the error relative to the reference's scale."""
    ours, ref = ours.double(), ref.double()
    return ((ours - ref).abs().max() / ref.abs().max().clamp(min=1e-30)).item()


def diffusers_unet(sd: dict, cfg: UNetConfig):
    from diffusers import UNet2DConditionModel
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    ds = [2**i for i in range(len(cfg.channel_mult))]
    down = tuple("CrossAttnDownBlock2D" if d in cfg.attention_resolutions else "DownBlock2D" for d in ds)
    up = tuple("CrossAttnUpBlock2D" if d in cfg.attention_resolutions else "UpBlock2D" for d in reversed(ds))
    config = dict(
        sample_size=64, in_channels=cfg.in_channels, out_channels=cfg.out_channels, flip_sin_to_cos=True, freq_shift=0,
        down_block_types=down, up_block_types=up, mid_block_type="UNetMidBlock2DCrossAttn",
        block_out_channels=tuple(cfg.model_channels * m for m in cfg.channel_mult), layers_per_block=cfg.num_res_blocks,
        downsample_padding=1, mid_block_scale_factor=1, act_fn="silu", norm_num_groups=32, norm_eps=1e-5,
        cross_attention_dim=cfg.context_dim, attention_head_dim=cfg.num_heads,  # diffusers' name for SD1's head count
        transformer_layers_per_block=cfg.transformer_depth, use_linear_projection=False,
    )
    with torch.device("meta"):
        model = UNet2DConditionModel(**config)
    model.load_state_dict(convert_ldm_unet_checkpoint(sd, config), strict=True, assign=True)
    return model.eval().requires_grad_(False)


def diffusers_vae(sd: dict, cfg: VAEConfig):
    from diffusers import AutoencoderKL
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    n = len(cfg.ch_mult)
    config = dict(
        in_channels=cfg.in_channels, out_channels=cfg.out_ch, latent_channels=cfg.z_channels,
        down_block_types=("DownEncoderBlock2D",) * n, up_block_types=("UpDecoderBlock2D",) * n,
        block_out_channels=tuple(cfg.ch * m for m in cfg.ch_mult), layers_per_block=cfg.num_res_blocks,
        act_fn="silu", norm_num_groups=32, sample_size=512, scaling_factor=0.18215,
    )
    with torch.device("meta"):
        model = AutoencoderKL(**config)
    model.load_state_dict(convert_ldm_vae_checkpoint(sd, config), strict=True, assign=True)
    return model.eval().requires_grad_(False)


def transformers_clip(sd: dict, cfg: CLIPTextConfig):
    import transformers
    from diffusers.loaders.single_file_utils import convert_ldm_clip_checkpoint

    config = transformers.CLIPTextConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_hidden_layers, num_attention_heads=cfg.num_attention_heads,
        max_position_embeddings=cfg.max_position_embeddings, hidden_act="quick_gelu", layer_norm_eps=cfg.layer_norm_eps,
        bos_token_id=49406, eos_token_id=49407, pad_token_id=1,
    )
    model = transformers.CLIPTextModel(config).eval().requires_grad_(False)
    state = convert_ldm_clip_checkpoint(sd)
    if not hasattr(model, "text_model"):  # transformers >= 5.6 flattened CLIPTextModel
        state = {k.removeprefix("text_model."): v for k, v in state.items()}
    persistent = set(model.state_dict())
    state = {k: v for k, v in state.items() if k in persistent or not k.endswith("position_ids")}
    model.load_state_dict(state, strict=True)
    return model


def clip_hidden(model, tokens: torch.Tensor, clip_skip: int = 1) -> torch.Tensor:
    """A1111's conditioning from transformers: last_hidden_state, or final_layer_norm(hidden_states[-n])."""
    out = model(input_ids=tokens, output_hidden_states=True)
    if clip_skip == 1:
        return out.last_hidden_state
    text_model = getattr(model, "text_model", model)
    return text_model.final_layer_norm(out.hidden_states[-clip_skip])
