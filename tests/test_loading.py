"""sd15.load on tiny files in the real layout: every real-world variant it must accept, every bad file it
must refuse with a clear one-line CheckpointError, and the layout contract with the real checkpoint."""
import json
import os
import pickle

import pytest
import torch
from safetensors.torch import load_file, save_file

import sd15
import synthetic
from sd15.checkpoint import PREFIXES, CheckpointError
from sd15.clip.text_encoder import CLIPTextModel
from sd15.unet.unet import UNetModel
from sd15.vae.vae import AutoencoderKL

CLIP = PREFIXES["text_encoder"]


def test_full_size_modules_have_the_real_key_layout():
    """Our module names *are* the checkpoint's keys: compare with the real file's key list."""
    real = {e["key"]: e["shape"] for e in synthetic.layout("sd15")}
    with torch.device("meta"):
        nets = {"unet": UNetModel(), "vae": AutoencoderKL(), "text_encoder": CLIPTextModel()}
    ours = {PREFIXES[n] + k: list(p.shape) for n, net in nets.items() for k, p in net.state_dict().items()}
    assert {k: real[k] for k in ours if k in real} == ours
    leftover = sorted(set(real) - set(ours))
    assert len(leftover) == 15  # 12 schedule buffers, 2 model_ema scalars, position_ids
    assert all(k in synthetic.SCHEDULE_KEYS or k.startswith("model_ema.") or k.endswith("position_ids") for k in leftover)


def test_standalone_vae_layout():
    real = {e["key"]: e["shape"] for e in synthetic.layout("vae") if not e["key"].startswith("model_ema.")}
    with torch.device("meta"):
        vae = AutoencoderKL()
    assert {k: list(p.shape) for k, p in vae.state_dict().items()} == real


def _write(tmp_path, sd, name="m.safetensors"):
    path = str(tmp_path / name)
    save_file({k: v.contiguous() for k, v in sd.items()}, path)
    return path


def _reference_output(path):
    m = sd15.load(path, device="cpu")
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    return m.unet(x, torch.tensor([10.0]), torch.ones(1, 77, 64))


def test_loads_and_reads_schedule(tiny_ckpt):
    m = sd15.load(tiny_ckpt, device="cpu")
    assert m.device == torch.device("cpu") and m.dtype == torch.float32
    assert torch.equal(m.alphas_cumprod, load_file(tiny_ckpt)["alphas_cumprod"])
    assert all(not p.requires_grad for p in m.unet.parameters())
    assert not any(p.is_meta for net in (m.unet, m.vae, m.text_encoder) for p in net.parameters())


@pytest.mark.parametrize("variant", ["old_clip_prefix", "no_position_ids", "float_position_ids", "no_extras",
                                     "no_schedule", "full_ema_copies", "ckpt", "ckpt_state_dict",
                                     "ckpt_legacy", "fp16", "bf16"])
def test_real_world_variants(tiny_ckpt, tmp_path, variant):
    sd = load_file(tiny_ckpt)
    expected = _reference_output(tiny_ckpt)
    name = "m.safetensors"
    if variant == "old_clip_prefix":
        sd = {k.replace(CLIP, "cond_stage_model.transformer."): v for k, v in sd.items()}
    elif variant == "no_position_ids":
        sd.pop(CLIP + "embeddings.position_ids")
    elif variant == "float_position_ids":
        sd[CLIP + "embeddings.position_ids"] = torch.arange(77.0)[None] + 1e-4
    elif variant == "no_extras":
        sd = {k: v for k, v in sd.items() if any(k.startswith(p) for p in PREFIXES.values())}
    elif variant == "no_schedule":
        del sd["alphas_cumprod"]
    elif variant == "full_ema_copies":  # a non-pruned file: flattened EMA copies of every UNet weight
        sd.update({"model_ema." + k[len("model."):].replace(".", ""): v.clone()
                   for k, v in sd.items() if k.startswith(PREFIXES["unet"])})
    elif variant in ("fp16", "bf16"):
        dt = torch.float16 if variant == "fp16" else torch.bfloat16
        sd = {k: v.to(dt) if v.is_floating_point() else v for k, v in sd.items()}
    if variant.startswith("ckpt"):
        name = "m.ckpt"
        path = str(tmp_path / name)
        torch.save({"state_dict": sd, "global_step": 470000} if variant == "ckpt_state_dict" else sd, path,
                   _use_new_zipfile_serialization=variant != "ckpt_legacy")  # legacy: not memory-mappable
    else:
        path = _write(tmp_path, sd, name)
    m = sd15.load(path, device="cpu")
    assert m.dtype == torch.float32  # fp16/bf16 files are upcast to the requested dtype
    key = "output_blocks.3.1.transformer_blocks.0.attn2.to_k.weight"
    assert torch.equal(m.unet.state_dict()[key], sd[PREFIXES["unet"] + key].float())  # upcasting is exact
    if variant not in ("fp16", "bf16"):  # half-precision files hold rounded weights, so other outputs
        # Same weights; the tensors sit at other addresses in the mapped file, and BLAS kernels round by
        # alignment, so outputs agree to float rounding rather than bit for bit.
        assert (_reference_output(path) - expected).abs().max() <= 1e-5 * expected.abs().max()
    if variant == "no_schedule":
        assert torch.allclose(m.alphas_cumprod, load_file(tiny_ckpt)["alphas_cumprod"], rtol=1e-6)


def test_dtype_argument(tiny_ckpt):
    m = sd15.load(tiny_ckpt, device="cpu", dtype=torch.bfloat16)
    assert m.dtype == torch.bfloat16
    assert {p.dtype for net in (m.unet, m.vae, m.text_encoder) for p in net.parameters()} == {torch.bfloat16}


def test_external_vae_replaces_builtin(tiny_ckpt, tmp_path):
    sd = load_file(tiny_ckpt)
    prefix = PREFIXES["vae"]
    vae_sd = {k[len(prefix):]: v * 1.5 for k, v in sd.items() if k.startswith(prefix)}
    vae_sd["model_ema.decay"] = torch.tensor(0.9999)
    vae_sd["model_ema.num_updates"] = torch.tensor(7, dtype=torch.int32)
    vae_path = _write(tmp_path, vae_sd, "vae.safetensors")
    m = sd15.load(tiny_ckpt, vae=vae_path, device="cpu")
    assert torch.equal(m.vae.decoder.conv_out.weight, vae_sd["decoder.conv_out.weight"])
    m2 = sd15.load(tiny_ckpt, device="cpu")
    m2.load_vae(vae_path)
    assert torch.equal(m2.vae.encoder.conv_in.weight, vae_sd["encoder.conv_in.weight"])


# --- bad files: one clear error each -------------------------------------------------------------

def _error(path, **kw) -> str:
    with pytest.raises(CheckpointError) as e:
        sd15.load(path, device="cpu", **kw)
    msg = str(e.value)
    assert "\n" not in msg
    return msg


def test_missing_path(tmp_path):
    assert "no such file" in _error(str(tmp_path / "nope.safetensors"))


def test_not_a_checkpoint(tmp_path):
    p = tmp_path / "notes.safetensors"
    p.write_text("this is not a checkpoint at all")
    assert "not a safetensors file" in _error(str(p))
    p.write_bytes(b"\x20\x00\x00\x00\x00\x00\x00\x00" + b"{not json at all, truly not json}")
    assert "not JSON" in _error(str(p))


def test_unaligned_safetensors_data(tmp_path):
    """Old writers did not pad the header: tensors whose data is not aligned to their dtype still read."""
    from sd15.checkpoint import open_checkpoint

    t = torch.arange(6, dtype=torch.float32).reshape(2, 3)
    header = json.dumps({"x": {"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 24]}}).encode()
    header += b" " * ((1 - 8 - len(header)) % 4)  # data starts at 1 mod 4
    p = tmp_path / "old.safetensors"
    p.write_bytes(len(header).to_bytes(8, "little") + header + t.numpy().tobytes())
    assert (8 + len(header)) % 4 == 1 and torch.equal(open_checkpoint(str(p))["x"].read(), t)


def test_truncated(tiny_ckpt, tmp_path):
    data = open(tiny_ckpt, "rb").read()
    p = tmp_path / "cut.safetensors"
    p.write_bytes(data[: len(data) - 1000])
    assert "truncated" in _error(str(p))


def test_missing_weights(tiny_ckpt, tmp_path):
    sd = load_file(tiny_ckpt)
    del sd[PREFIXES["unet"] + "middle_block.1.proj_out.weight"]
    msg = _error(_write(tmp_path, sd))
    assert "missing UNet weights" in msg and "middle_block.1.proj_out.weight" in msg


def test_unexpected_weights(tiny_ckpt, tmp_path):
    sd = load_file(tiny_ckpt)
    sd[PREFIXES["vae"] + "decoder.extra_layer.weight"] = torch.zeros(3)
    sd["some_adapter.weight"] = torch.zeros(3)
    assert "unexpected tensors some_adapter.weight" in _error(_write(tmp_path, sd))
    del sd["some_adapter.weight"]
    msg = _error(_write(tmp_path, sd))
    assert "unexpected VAE weights" in msg and "decoder.extra_layer.weight" in msg


def test_wrong_shape(tiny_ckpt, tmp_path):
    sd = load_file(tiny_ckpt)
    key = PREFIXES["unet"] + "input_blocks.1.1.transformer_blocks.0.attn2.to_v.weight"
    sd[key] = torch.zeros(32, 48)
    msg = _error(_write(tmp_path, sd))
    assert "wrongly shaped UNet weights" in msg and "attn2.to_v.weight [32, 48]" in msg


def test_not_sd15(tmp_path):
    assert "SD 1.x" in _error(_write(tmp_path, {"model.diffusion_model.x": torch.zeros(1)}))


def test_pickle_with_code_is_refused(tmp_path):
    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned > " + str(tmp_path / "pwned"),))

    p = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {"x": Evil()}}, str(p))
    assert "not a loadable checkpoint" in _error(str(p))
    assert not (tmp_path / "pwned").exists()
    p2 = tmp_path / "evil2.ckpt"
    p2.write_bytes(pickle.dumps(Evil(), protocol=2))
    _error(str(p2))
    assert not (tmp_path / "pwned").exists()


def test_bad_vae_file(tiny_ckpt, tmp_path):
    sd = load_file(tiny_ckpt)
    vae = {k[len(PREFIXES["vae"]):]: v for k, v in sd.items() if k.startswith(PREFIXES["vae"])}
    del vae["decoder.conv_out.bias"]
    assert "missing VAE weights: decoder.conv_out.bias" in _error(tiny_ckpt, vae=_write(tmp_path, vae, "v.safetensors"))


def test_header_offsets_beyond_data(tmp_path):
    header = json.dumps({"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 12]}}).encode()
    p = tmp_path / "bad.safetensors"
    p.write_bytes(len(header).to_bytes(8, "little") + header + b"\0" * 16)
    assert "12 bytes for shape [4]" in _error(str(p))
