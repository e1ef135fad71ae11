"""LoRA and textual-inversion files for tests, for the tiny checkpoint of `synthetic.write_tiny_checkpoint`.

The module tables below are written out by hand (diffusers path -> LDM path), independently of
`sd15.lora`'s name conversion, so a test that merges "by hand" with them checks that conversion.

* `kohya_lora(sd, ...)`: a kohya-format LoRA (lora_down / lora_up / alpha; conv LoRA with 3x3 down and 1x1 up;
  one LoCon Tucker module with lora_mid) over text-encoder and UNet modules of the tiny model.
* `peft_lora(kohya_tensors, ...)`: the same network in diffusers/PEFT naming (lora_A / lora_B, dotted paths,
  `unet.` / `text_encoder.` prefixes, lora_alpha in `lora_adapter_metadata`).
* `hand_merge(sd, tensors, te=..., unet=...)`: a state dict with W + mult * alpha/r * up @ down applied.
* `write_embedding_pt / _safetensors / _diffusers_bin`: textual-inversion files in the three formats.
"""
from __future__ import annotations

import json
import os

import torch

import synthetic

UNET = "model.diffusion_model."
TE = "cond_stage_model.transformer.text_model."

# (diffusers module path, LDM module path under model.diffusion_model.) for UNET_TINY:
# channel_mult (1, 2, 2), attention at the first two levels, two ResBlocks per level.
TINY_UNET_LINEAR = [
    ("down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q", "input_blocks.1.1.transformer_blocks.0.attn1.to_q"),
    ("down_blocks.0.attentions.1.transformer_blocks.0.attn2.to_k", "input_blocks.2.1.transformer_blocks.0.attn2.to_k"),
    ("down_blocks.1.attentions.1.proj_in", "input_blocks.5.1.proj_in"),  # a 1x1 conv in SD 1.x
    ("mid_block.attentions.0.transformer_blocks.0.attn2.to_v", "middle_block.1.transformer_blocks.0.attn2.to_v"),
    ("mid_block.attentions.0.proj_out", "middle_block.1.proj_out"),
    ("up_blocks.1.attentions.2.transformer_blocks.0.ff.net.0.proj",
     "output_blocks.5.1.transformer_blocks.0.ff.net.0.proj"),
    ("up_blocks.2.attentions.0.transformer_blocks.0.attn1.to_out.0",
     "output_blocks.6.1.transformer_blocks.0.attn1.to_out.0"),
    ("up_blocks.2.attentions.1.transformer_blocks.0.ff.net.2", "output_blocks.7.1.transformer_blocks.0.ff.net.2"),
    ("time_embedding.linear_1", "time_embed.0"),
    ("up_blocks.0.resnets.2.time_emb_proj", "output_blocks.2.0.emb_layers.1"),
]
TINY_UNET_CONV = [  # conv LoRA (LoCon / kohya conv_dim): 3x3 down, 1x1 up
    ("down_blocks.0.resnets.1.conv1", "input_blocks.2.0.in_layers.2"),
    ("down_blocks.1.resnets.0.conv_shortcut", "input_blocks.4.0.skip_connection"),
    ("down_blocks.0.downsamplers.0.conv", "input_blocks.3.0.op"),
    ("mid_block.resnets.1.conv2", "middle_block.2.out_layers.3"),
    ("up_blocks.0.upsamplers.0.conv", "output_blocks.2.1.conv"),  # no attention at that level
    ("up_blocks.1.upsamplers.0.conv", "output_blocks.5.2.conv"),
    ("up_blocks.2.resnets.2.conv2", "output_blocks.8.0.out_layers.3"),
    ("conv_in", "input_blocks.0.0"),
    ("conv_out", "out.2"),
]
TINY_UNET_TUCKER = [("down_blocks.1.resnets.1.conv1", "input_blocks.5.0.in_layers.2")]  # lora_mid


def tiny_te_pairs(layers: int = 3) -> list[tuple[str, str]]:
    """(transformers module path, LDM path under cond_stage_model.transformer.text_model.)."""
    out = []
    for i in range(layers):
        for sub in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj", "mlp.fc1",
                    "mlp.fc2"):
            out.append((f"text_model.encoder.layers.{i}.{sub}", f"encoder.layers.{i}.{sub}"))
    return out


def kohya_name(component: str, diffusers_path: str) -> str:
    return ("lora_unet_" if component == "unet" else "lora_te_") + diffusers_path.replace(".", "_")


def targets(tucker: bool = True):
    """[(component, diffusers path, full LDM key of the weight, style)] of the networks made here."""
    out = [("te", d, TE + l + ".weight", "plain") for d, l in tiny_te_pairs()]
    out += [("unet", d, UNET + l + ".weight", "plain") for d, l in TINY_UNET_LINEAR]
    out += [("unet", d, UNET + l + ".weight", "conv") for d, l in TINY_UNET_CONV]
    if tucker:
        out += [("unet", d, UNET + l + ".weight", "tucker") for d, l in TINY_UNET_TUCKER]
    return out


def kohya_lora(sd: dict, *, rank: int = 4, alpha: float = 2.0, seed: int = 0, std: float = 0.3,
               tucker: bool = True, alpha_dtype=torch.float16) -> dict[str, torch.Tensor]:
    """A kohya LoRA for the tiny checkpoint `sd` (its full state dict)."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for comp, dpath, key, style in targets(tucker):
        w = sd[key]
        name = kohya_name(comp, dpath)
        cout, cin = w.shape[0], w.shape[1]
        if w.dim() == 2:
            down, up = (rank, cin), (cout, rank)
        elif style == "tucker":
            down, up = (rank, cin, 1, 1), (cout, rank, 1, 1)
            out[name + ".lora_mid.weight"] = torch.randn(rank, rank, *w.shape[2:], generator=gen) * std
        else:
            down, up = (rank, cin, *w.shape[2:]), (cout, rank, 1, 1)
        out[name + ".lora_down.weight"] = torch.randn(down, generator=gen) * std
        out[name + ".lora_up.weight"] = torch.randn(up, generator=gen) * std
        out[name + ".alpha"] = torch.tensor(alpha, dtype=alpha_dtype)
    return out


def hand_merge(sd: dict, lora: dict, *, te: float = 1.0, unet: float = 1.0, dyn=None, tucker: bool = True) -> dict:
    """`sd` with the kohya LoRA `lora` merged by hand: W + mult * alpha/r * dW, in fp32."""
    out = dict(sd)
    for comp, dpath, key, style in targets(tucker):
        name = kohya_name(comp, dpath)
        if name + ".lora_down.weight" not in lora:
            continue
        down, up = lora[name + ".lora_down.weight"].float(), lora[name + ".lora_up.weight"].float()
        r = down.shape[0]
        scale = float(lora[name + ".alpha"]) / r
        if dyn is not None:
            down, up = down[:dyn], up[:, :dyn]
        w = out[key]
        if style == "tucker":
            mid = lora[name + ".lora_mid.weight"].float()
            if dyn is not None:
                mid = mid[:dyn, :dyn]
            # dW[o, i, kh, kw] = sum_{a, b} up[o, a] * mid[a, b, kh, kw] * down[b, i]
            dw = torch.einsum("oa,abhw,bi->oihw", up.flatten(1), mid, down.flatten(1))
        else:
            dw = (up.flatten(1) @ down.flatten(1)).reshape(w.shape)
        mult = te if comp == "te" else unet
        out[key] = (w.float() + mult * scale * dw).to(w.dtype)
    return out


def peft_lora(lora: dict, *, tucker: bool = False) -> tuple[dict, dict]:
    """The kohya network `lora` (made with tucker=False) in PEFT naming -> (tensors, metadata)."""
    out, alphas = {}, {}
    for comp, dpath, key, style in targets(tucker):
        name = kohya_name(comp, dpath)
        prefix = ("unet." if comp == "unet" else "text_encoder.") + dpath
        out[prefix + ".lora_A.weight"] = lora[name + ".lora_down.weight"]
        out[prefix + ".lora_B.weight"] = lora[name + ".lora_up.weight"]
        alphas[comp] = float(lora[name + ".alpha"])
    meta = {"lora_adapter_metadata": json.dumps({"unet": {"r": 4, "lora_alpha": alphas["unet"]},
                                                 "text_encoder": {"r": 4, "lora_alpha": alphas["te"]}})}
    return out, meta


def write_lora(path: str, tensors: dict, metadata: dict | None = None) -> str:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    if path.endswith(".safetensors"):
        synthetic.write_safetensors(path, [(k, v.shape, v.dtype, lambda v=v: v) for k, v in sorted(tensors.items())],
                                    metadata=metadata)
    else:
        torch.save(tensors, path)
    return path


def write_state_dict(path: str, sd: dict) -> str:
    """A checkpoint file from a full state dict (e.g. a hand-merged one)."""
    synthetic.write_safetensors(path, [(k, v.shape, v.dtype, lambda v=v: v) for k, v in sorted(sd.items())],
                                metadata={"format": "pt"})
    return path


# --- textual inversion ---------------------------------------------------------------------------

def write_embedding_pt(path: str, vectors: torch.Tensor, *, step: int = 500, checkpoint: str = "0123abcd",
                       checkpoint_name: str = "tiny", parameter_dict: bool = False) -> str:
    """A1111 / original textual_inversion `.pt`: string_to_param {"*": [n, width]}."""
    param = {"*": vectors.clone()}
    if parameter_dict:
        param = torch.nn.ParameterDict({"*": torch.nn.Parameter(vectors.clone())})
    torch.save({"string_to_token": {"*": 265}, "string_to_param": param, "name": "ignored-name", "step": step,
                "sd_checkpoint": checkpoint, "sd_checkpoint_name": checkpoint_name}, path)
    return path


def write_embedding_safetensors(path: str, vectors: torch.Tensor) -> str:
    """kohya sd-scripts: one tensor `emb_params` [n, width]."""
    return write_lora(path, {"emb_params": vectors.contiguous()})


def write_embedding_diffusers_bin(path: str, vector: torch.Tensor, token: str = "<concept>") -> str:
    """diffusers `learned_embeds.bin`: {token: [width]}."""
    torch.save({token: vector.clone()}, path)
    return path


class Evil:
    """Pickles to a call of os.system: loading it with a plain unpickler would run the command."""

    def __init__(self, command: str):
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


def write_evil_pickle(path: str, marker: str) -> str:
    """A torch.save file that creates `marker` when unpickled without weights_only."""
    torch.save({"string_to_param": {"*": Evil(f"touch {marker}")}, "lora_unet_x.alpha": Evil(f"touch {marker}")},
               path)
    return path
