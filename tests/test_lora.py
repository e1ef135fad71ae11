"""LoRA through `<lora:...>` tags: kohya and PEFT files, conv LoRA, exact apply/restore, listings, hashes, safety."""
import os
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import sd15
import synthetic
import synthetic_networks as sn
from sd15 import lora as L
from sd15.clip.text_encoder import CLIPTextModel
from sd15.pipeline import NetworkJob, generate
from sd15.schema import GenerationRequest as Params
from sd15.unet.unet import UNetModel

BASE = dict(seed=7, steps=3, width=64, height=64, negative_prompt="blurry")


@pytest.fixture(scope="module")
def tiny_sd():
    return synthetic.tiny_state_dict()


@pytest.fixture(scope="module")
def lora_tensors(tiny_sd):
    return sn.kohya_lora(tiny_sd)


@pytest.fixture(scope="module")
def dirs(tmp_path_factory, tiny_ckpt, lora_tensors):
    root = tmp_path_factory.mktemp("loras")
    loras = root / "Lora"
    sn.write_lora(str(loras / "style.safetensors"), lora_tensors,
                  metadata={"ss_output_name": "style_alias", "ss_network_dim": "4",
                            "ss_tag_frequency": '{"cat": {"a": 1}}', "sshs_model_hash": "abcdef0123456789" * 4})
    sn.write_lora(str(loras / "sub" / "second.safetensors"), sn.kohya_lora(synthetic.tiny_state_dict(), seed=5))
    return SimpleNamespace(root=root, loras=loras)


@pytest.fixture(scope="module")
def model(tiny_ckpt, dirs):
    return sd15.load(tiny_ckpt, device="cpu", dtype=torch.float32, lora_dir=dirs.loras)


def pixels(result):
    return np.stack([np.asarray(im) for im in result.images]).astype(np.int16)


def weights(model):
    return {k: v.clone() for net in ("unet", "text_encoder") for k, v in getattr(model, net).state_dict().items()
            if not k.endswith("position_ids")}


def assert_same_weights(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k


def merged_model_weights(model, sd):
    """The unet/text-encoder weights of `sd` keyed like model.unet / model.text_encoder state dicts."""
    unet_keys = set(model.unet.state_dict())
    return {k: sd[(sn.UNET if k in unet_keys else sn.TE) + k] for k in weights(model)}


# --- names --------------------------------------------------------------------------------------

def test_kohya_names_map_to_ldm_paths():
    assert L.ldm_candidates("lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn2_to_k")[0] == \
        "diffusion_model_input_blocks_4_1_transformer_blocks_0_attn2_to_k"
    assert L.ldm_candidates("lora_unet_up_blocks_3_attentions_2_proj_out")[0] == \
        "diffusion_model_output_blocks_11_1_proj_out"
    assert L.ldm_candidates("lora_unet_mid_block_resnets_1_time_emb_proj")[0] == \
        "diffusion_model_middle_block_2_emb_layers_1"
    assert L.ldm_candidates("lora_unet_down_blocks_2_downsamplers_0_conv")[0] == "diffusion_model_input_blocks_9_0_op"
    assert L.ldm_candidates("lora_unet_up_blocks_0_upsamplers_0_conv")[0] == "diffusion_model_output_blocks_2_1_conv"
    assert L.ldm_candidates("lora_unet_up_blocks_2_upsamplers_0_conv")[0] == "diffusion_model_output_blocks_8_2_conv"
    assert L.ldm_candidates("lora_unet_up_blocks_1_resnets_0_conv_shortcut")[0] == \
        "diffusion_model_output_blocks_3_0_skip_connection"
    assert L.ldm_candidates("lora_unet_input_blocks_1_1_proj_in")[-1] == "diffusion_model_input_blocks_1_1_proj_in"
    assert L.ldm_candidates("lora_te_text_model_encoder_layers_11_mlp_fc2") == \
        ["transformer_text_model_encoder_layers_11_mlp_fc2"]


@pytest.mark.parametrize("key, expected", [
    ("unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_out.0.lora_A.weight",
     ("lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_out_0", "lora_down.weight")),
    ("base_model.model.unet.mid_block.attentions.0.proj_in.lora_B.weight",
     ("lora_unet_mid_block_attentions_0_proj_in", "lora_up.weight")),
    ("text_encoder.text_model.encoder.layers.3.self_attn.q_proj.lora_linear_layer.up.weight",
     ("lora_te_text_model_encoder_layers_3_self_attn_q_proj", "lora_up.weight")),
    ("unet.up_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k.lora.down.weight",
     ("lora_unet_up_blocks_1_attentions_0_transformer_blocks_0_attn2_to_k", "lora_down.weight")),
    ("down_blocks.0.attentions.0.transformer_blocks.0.attn1.processor.to_out_lora.up.weight",
     ("lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_out_0", "lora_up.weight")),
    ("lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_B.weight",
     ("lora_te_text_model_encoder_layers_0_mlp_fc1", "lora_up.weight")),
    ("lora_unet_conv_in.alpha", ("lora_unet_conv_in", "alpha")),
    ("text_encoder.text_model.encoder.layers.0.mlp.fc1.alpha",
     ("lora_te_text_model_encoder_layers_0_mlp_fc1", "alpha")),
    ("unet.conv_in.lora_mid.weight", ("lora_unet_conv_in", "lora_mid.weight")),
    ("unet.conv_out.lora_up.weight", ("lora_unet_conv_out", "lora_up.weight")),
])
def test_key_normalisation(key, expected):
    assert L.normalize_key(key)[:2] == expected
    if "lora" in key:
        assert L.normalize_key(key.replace("lora", "other")) is None  # the same key without a LoRA part


def test_every_standard_sd15_module_resolves_on_the_full_model():
    """The 264 modules of a typical kohya SD 1.5 LoRA plus the conv (LoCon) ones all find their weight."""
    with torch.device("meta"):
        fake = SimpleNamespace(unet=UNetModel(), text_encoder=CLIPTextModel())
    lookup = L.model_lookup(fake)
    names = [f"lora_te_text_model_encoder_layers_{i}_{s}" for i in range(12)
             for s in ("self_attn_q_proj", "self_attn_k_proj", "self_attn_v_proj", "self_attn_out_proj", "mlp_fc1",
                       "mlp_fc2")]
    blocks = [f"down_blocks_{b}_attentions_{j}" for b in range(3) for j in range(2)] + ["mid_block_attentions_0"]
    blocks += [f"up_blocks_{b}_attentions_{j}" for b in (1, 2, 3) for j in range(3)]
    subs = ["proj_in", "proj_out"] + [f"transformer_blocks_0_{a}_{p}" for a in ("attn1", "attn2")
                                      for p in ("to_q", "to_k", "to_v", "to_out_0")]
    subs += ["transformer_blocks_0_ff_net_0_proj", "transformer_blocks_0_ff_net_2"]
    names += [f"lora_unet_{b}_{s}" for b in blocks for s in subs]
    assert len(blocks) == 16 and len(names) == 264
    conv = [f"lora_unet_down_blocks_{b}_resnets_{j}_{x}" for b in range(4) for j in range(2)
            for x in ("conv1", "conv2", "time_emb_proj")]
    conv += [f"lora_unet_up_blocks_{b}_resnets_{j}_{x}" for b in range(4) for j in range(3)
             for x in ("conv1", "conv2", "time_emb_proj", "conv_shortcut")]
    conv += [f"lora_unet_down_blocks_{b}_downsamplers_0_conv" for b in range(3)]
    conv += [f"lora_unet_up_blocks_{b}_upsamplers_0_conv" for b in range(3)]
    conv += ["lora_unet_down_blocks_1_resnets_0_conv_shortcut", "lora_unet_down_blocks_2_resnets_0_conv_shortcut",
             "lora_unet_mid_block_resnets_0_conv1", "lora_unet_mid_block_resnets_1_conv2", "lora_unet_conv_in",
             "lora_unet_conv_out", "lora_unet_time_embedding_linear_1", "lora_unet_time_embedding_linear_2"]
    missing = [n for n in names + conv if not any(c in lookup for c in L.ldm_candidates(n))]
    assert not missing
    # a few shapes: GEGLU proj is [8C, C]; attn2 k takes the 768-wide context; the last upsampler is 640 wide
    get = lambda n: next(lookup[c] for c in L.ldm_candidates(n) if c in lookup)[1].weight.shape  # noqa: E731
    assert get("lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_ff_net_0_proj") == (2560, 320)
    assert get("lora_unet_up_blocks_3_attentions_2_transformer_blocks_0_attn2_to_k") == (320, 768)
    assert get("lora_unet_up_blocks_2_upsamplers_0_conv") == (640, 640, 3, 3)


# --- merging maths ------------------------------------------------------------------------------

def test_activate_equals_hand_merge_and_restore_is_exact(model, tiny_sd, lora_tensors):
    before = weights(model)
    lf = model.loras.find("style")
    warnings = model.loras.activate(model, [(lf, L.LoraRequest("style", 0.7, 0.4))])
    assert warnings == []
    expected = merged_model_weights(model, sn.hand_merge(tiny_sd, lora_tensors, te=0.7, unet=0.4))
    got = weights(model)
    changed = 0
    for k in got:
        torch.testing.assert_close(got[k], expected[k], rtol=0, atol=1e-6, msg=k)
        changed += not torch.equal(got[k], before[k])
    assert changed == len(sn.targets())  # every target (TE, attention, conv, Tucker) moved; nothing else did
    model.loras.restore()
    assert_same_weights(weights(model), before)


def test_named_multipliers_dyn_and_several_loras_add_up(model, tiny_sd, lora_tensors):
    before = weights(model)
    second = sn.kohya_lora(synthetic.tiny_state_dict(), seed=5)
    job = NetworkJob(model, [("lora", "style", ["te=0", "unet=0.5", "dyn=2"]), ("lora", "second", ["0.3"])])
    job.activate()
    assert job.warnings == []
    merged = sn.hand_merge(tiny_sd, lora_tensors, te=0.0, unet=0.5, dyn=2)
    merged = sn.hand_merge(merged, second, te=0.3, unet=0.3)
    got = weights(model)
    for k, v in merged_model_weights(model, merged).items():
        torch.testing.assert_close(got[k], v, rtol=0, atol=2e-6, msg=k)
    job.finish()
    assert_same_weights(weights(model), before)


def test_peft_naming_equals_kohya(model, tiny_sd, tmp_path):
    kohya = sn.kohya_lora(tiny_sd, tucker=False, seed=3)
    tensors, meta = sn.peft_lora(kohya)
    folder = tmp_path / "peft"
    sn.write_lora(str(folder / "pytorch_lora_weights.safetensors"), tensors, meta)
    m = SimpleNamespace(unet=model.unet, text_encoder=model.text_encoder, loras=L.Loras(folder), embeddings=None)
    before = weights(model)
    job = NetworkJob(m, [("lora", "pytorch_lora_weights", ["0.8"])])
    job.activate()
    assert job.warnings == []
    expected = merged_model_weights(model, sn.hand_merge(tiny_sd, kohya, te=0.8, unet=0.8, tucker=False))
    got = weights(model)
    for k, v in expected.items():
        torch.testing.assert_close(got[k], v, rtol=0, atol=1e-6, msg=k)
    job.finish()
    assert_same_weights(weights(model), before)


def _linear_model(dtype=torch.float32):
    torch.manual_seed(0)
    te = torch.nn.Module()
    te.encoder = torch.nn.Module()
    te.encoder.layers = torch.nn.ModuleList([torch.nn.Module()])
    te.encoder.layers[0].mlp = torch.nn.Module()
    te.encoder.layers[0].mlp.fc1 = torch.nn.Linear(6, 8).to(dtype)
    unet = torch.nn.Module()
    unet.conv = torch.nn.Conv2d(4, 6, 3).to(dtype)
    return SimpleNamespace(unet=unet, text_encoder=te)


def test_fp16_weights_merge_in_fp32_and_restore_bit_exactly(tmp_path):
    m = _linear_model(torch.float16)
    g = torch.Generator().manual_seed(1)
    t = {"lora_te_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": torch.randn(2, 6, generator=g),
         "lora_te_text_model_encoder_layers_0_mlp_fc1.lora_up.weight": torch.randn(8, 2, generator=g),
         "lora_te_text_model_encoder_layers_0_mlp_fc1.alpha": torch.tensor(1.0),
         "lora_unet_conv.lora_down.weight": torch.randn(3, 4, 3, 3, generator=g).half(),
         "lora_unet_conv.lora_up.weight": torch.randn(6, 3, 1, 1, generator=g).half()}  # no alpha: scale 1
    sn.write_lora(str(tmp_path / "a.safetensors"), t)
    loras = L.Loras(tmp_path)
    w0, c0 = m.text_encoder.encoder.layers[0].mlp.fc1.weight.clone(), m.unet.conv.weight.clone()
    assert loras.activate(m, [(loras.find("a"), L.LoraRequest("a", 0.5, 2.0))]) == []
    d_te = t["lora_te_text_model_encoder_layers_0_mlp_fc1.lora_up.weight"] @ \
        t["lora_te_text_model_encoder_layers_0_mlp_fc1.lora_down.weight"]
    assert torch.equal(m.text_encoder.encoder.layers[0].mlp.fc1.weight, (w0.float() + 0.5 * 0.5 * d_te).half())
    d_conv = (t["lora_unet_conv.lora_up.weight"].float().flatten(1) @
              t["lora_unet_conv.lora_down.weight"].float().flatten(1)).reshape(6, 4, 3, 3)
    torch.testing.assert_close(m.unet.conv.weight, (c0.float() + 2.0 * d_conv).half(), rtol=0, atol=0)
    loras.restore()
    assert torch.equal(m.text_encoder.encoder.layers[0].mlp.fc1.weight, w0) and torch.equal(m.unet.conv.weight, c0)


def test_loha_lokr_full_and_unsupported(tmp_path):
    m = _linear_model()
    g = torch.Generator().manual_seed(2)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    fc = "lora_te_text_model_encoder_layers_0_mlp_fc1"
    loha = {f"{fc}.hada_w1_a": r(8, 2), f"{fc}.hada_w1_b": r(2, 6), f"{fc}.hada_w2_a": r(8, 2),
            f"{fc}.hada_w2_b": r(2, 6), f"{fc}.alpha": torch.tensor(1.0),
            "lora_unet_conv.diff": r(6, 4, 3, 3), "lora_unet_conv.diff_b": r(6)}
    lokr = {f"{fc}.lokr_w1": r(2, 3), f"{fc}.lokr_w2_a": r(4, 1), f"{fc}.lokr_w2_b": r(1, 2),
            f"{fc}.alpha": torch.tensor(0.5),
            "lora_unet_conv.lora_down.weight": r(2, 4, 3, 3), "lora_unet_conv.lora_up.weight": r(6, 2, 1, 1),
            "lora_unet_conv.dora_scale": r(1, 4, 1, 1)}
    sn.write_lora(str(tmp_path / "loha.safetensors"), loha)
    sn.write_lora(str(tmp_path / "lokr.safetensors"), lokr)
    loras = L.Loras(tmp_path)
    fc1 = m.text_encoder.encoder.layers[0].mlp.fc1
    w0, c0, b0 = fc1.weight.clone(), m.unet.conv.weight.clone(), m.unet.conv.bias.clone()
    assert loras.activate(m, [(loras.find("loha"), L.LoraRequest("loha", 1.0, 0.5))]) == []
    d = (loha[f"{fc}.hada_w1_a"] @ loha[f"{fc}.hada_w1_b"]) * (loha[f"{fc}.hada_w2_a"] @ loha[f"{fc}.hada_w2_b"])
    torch.testing.assert_close(fc1.weight, w0 + 0.5 * d)  # alpha 1 / rank 2
    torch.testing.assert_close(m.unet.conv.weight, c0 + 0.5 * loha["lora_unet_conv.diff"])
    torch.testing.assert_close(m.unet.conv.bias, b0 + 0.5 * loha["lora_unet_conv.diff_b"])
    warnings = loras.activate(m, [(loras.find("lokr"), L.LoraRequest("lokr", 1.0, 1.0))])
    assert torch.equal(m.unet.conv.bias, b0)  # switching sets restores first
    d = torch.kron(lokr[f"{fc}.lokr_w1"], lokr[f"{fc}.lokr_w2_a"] @ lokr[f"{fc}.lokr_w2_b"])
    torch.testing.assert_close(fc1.weight, w0 + 0.5 * d)  # alpha 0.5 / rank 1
    assert torch.equal(m.unet.conv.weight, c0) and any("DoRA" in w for w in warnings)
    loras.restore()
    assert torch.equal(fc1.weight, w0) and torch.equal(m.unet.conv.weight, c0) and torch.equal(m.unet.conv.bias, b0)


def test_lycoris_factorisations_scale_part_and_ignored_keys(tmp_path):
    """LoKr with a factored w1 and with a Tucker w2, LoHa with Tucker cores, kohya's explicit `scale` part,
    and a `bundle_emb` key that is ignored; expected deltas by matmul and broadcasting, not einsum or kron."""
    m = _linear_model()
    g = torch.Generator().manual_seed(3)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    fc = "lora_te_text_model_encoder_layers_0_mlp_fc1"
    cv = "lora_unet_conv"
    a = {f"{fc}.lokr_w1_a": r(2, 1), f"{fc}.lokr_w1_b": r(1, 3), f"{fc}.lokr_w2": r(4, 2),
         f"{fc}.alpha": torch.tensor(0.5),  # rank 1 (lokr_w1_b): scale 0.5
         f"{cv}.hada_w1_a": r(2, 6), f"{cv}.hada_w1_b": r(2, 4), f"{cv}.hada_t1": r(2, 2, 3, 3),
         f"{cv}.hada_w2_a": r(3, 6), f"{cv}.hada_w2_b": r(3, 4), f"{cv}.hada_t2": r(3, 3, 3, 3)}
    b = {f"{fc}.lora_down.weight": r(2, 6), f"{fc}.lora_up.weight": r(8, 2), f"{fc}.alpha": torch.tensor(1.0),
         f"{fc}.scale": torch.tensor(0.25),  # wins over alpha / rank
         f"{cv}.lokr_w1": r(2, 2), f"{cv}.lokr_w2_a": r(2, 3), f"{cv}.lokr_w2_b": r(2, 2),
         f"{cv}.lokr_t2": r(2, 2, 3, 3), f"{cv}.alpha": torch.tensor(1.0),  # rank 2 (lokr_w2_b): scale 0.5
         "bundle_emb.thing.string_to_param.*": r(1, 6)}
    sn.write_lora(str(tmp_path / "a.safetensors"), a)
    sn.write_lora(str(tmp_path / "b.safetensors"), b)
    loras = L.Loras(tmp_path)
    fc1 = m.text_encoder.encoder.layers[0].mlp.fc1
    w0, c0 = fc1.weight.clone(), m.unet.conv.weight.clone()

    def tucker(core, down, up):  # dW[p, q, k, l] = sum_ij core[i, j, k, l] up[i, p] down[j, q]
        return (up.T @ core.permute(2, 3, 0, 1) @ down).permute(2, 3, 0, 1)

    def kron(x, y):  # Kronecker product of a matrix x and the first two dimensions of a 4-d y
        big = x[:, None, :, None, None, None] * y[None, :, None, :]
        return big.reshape(x.shape[0] * y.shape[0], x.shape[1] * y.shape[1], *y.shape[2:])

    assert loras.activate(m, [(loras.find("a"), L.LoraRequest("a", 2.0, 1.0))]) == []
    w1 = a[f"{fc}.lokr_w1_a"] @ a[f"{fc}.lokr_w1_b"]
    d = kron(w1, a[f"{fc}.lokr_w2"][..., None, None])[..., 0, 0]
    torch.testing.assert_close(fc1.weight, w0 + 2.0 * 0.5 * d)
    d = tucker(a[f"{cv}.hada_t1"], a[f"{cv}.hada_w1_b"], a[f"{cv}.hada_w1_a"]) * \
        tucker(a[f"{cv}.hada_t2"], a[f"{cv}.hada_w2_b"], a[f"{cv}.hada_w2_a"])
    torch.testing.assert_close(m.unet.conv.weight, c0 + d)  # no alpha: scale 1
    assert loras.activate(m, [(loras.find("b"), L.LoraRequest("b", 1.0, 3.0))]) == []
    d = b[f"{fc}.lora_up.weight"] @ b[f"{fc}.lora_down.weight"]
    torch.testing.assert_close(fc1.weight, w0 + 0.25 * d)
    w2 = tucker(b[f"{cv}.lokr_t2"], b[f"{cv}.lokr_w2_b"], b[f"{cv}.lokr_w2_a"])
    torch.testing.assert_close(m.unet.conv.weight, c0 + 3.0 * 0.5 * kron(b[f"{cv}.lokr_w1"], w2))
    loras.restore()
    assert torch.equal(fc1.weight, w0) and torch.equal(m.unet.conv.weight, c0)


# --- through generate() -------------------------------------------------------------------------

def test_tag_equals_hand_merged_checkpoint_and_leaves_no_trace(model, tiny_sd, lora_tensors, tmp_path):
    before = weights(model)
    plain = generate(model, Params(prompt="a cat", **BASE))
    tagged = generate(model, Params(prompt="a cat <lora:style:0.7>", **BASE))
    assert tagged.warnings == []
    assert_same_weights(weights(model), before)  # restored after the job

    merged = sd15.load(sn.write_state_dict(str(tmp_path / "merged.safetensors"),
                                           sn.hand_merge(tiny_sd, lora_tensors, te=0.7, unet=0.7)),
                       device="cpu", dtype=torch.float32)
    by_hand = generate(merged, Params(prompt="a cat", **BASE))
    assert np.abs(pixels(tagged) - pixels(by_hand)).max() <= 2
    assert np.abs(pixels(tagged) - pixels(plain)).max() > 10  # the LoRA does change the image

    zero = generate(model, Params(prompt="a cat <lora:style:0>", **BASE))
    assert np.array_equal(pixels(zero), pixels(plain))
    again = generate(model, Params(prompt="a cat", **BASE))
    assert np.array_equal(pixels(again), pixels(plain))
    assert_same_weights(weights(model), before)

    # infotext: the prompt keeps its tag; "Lora hashes" uses the name as written and sshs_model_hash
    assert tagged.infotexts[0].startswith("a cat <lora:style:0.7>\n")
    assert 'Lora hashes: "style: abcdef012345"' in tagged.infotexts[0]
    assert "Lora hashes" not in plain.infotexts[0]


def test_keep_applied_does_not_remerge_and_a_prompt_without_tag_is_untouched(model, monkeypatch):
    before = weights(model)
    plain = generate(model, Params(prompt="a dog", **BASE))
    model.loras.keep_applied = True
    try:
        a = generate(model, Params(prompt="a dog <lora:style_alias:0.6>", **BASE))  # by its ss_output_name alias
        assert a.warnings == []
        calls = []
        monkeypatch.setattr(L, "delta", lambda *a, **k: calls.append(1) or (_ for _ in ()).throw(
            AssertionError("re-merged")))
        b = generate(model, Params(prompt="a dog <lora:style_alias:0.6>", **BASE))
        assert np.array_equal(pixels(a), pixels(b)) and not calls
        monkeypatch.undo()
        assert not torch.equal(weights(model)["input_blocks.0.0.weight"], before["input_blocks.0.0.weight"])
        c = generate(model, Params(prompt="a dog", **BASE))
        assert np.array_equal(pixels(c), pixels(plain))
        assert_same_weights(weights(model), before)
    finally:
        model.loras.keep_applied = False
        model.loras.restore()


def test_unknown_lora_warns_and_hires_prompt_networks(model):
    before = weights(model)
    r = generate(model, Params(prompt="a cat <lora:nope:1> <hypernet:foo:1>", **BASE))
    assert "Networks not found: nope" in r.warnings
    assert any("hypernet:foo" in w for w in r.warnings)
    plain = generate(model, Params(prompt="a cat", **BASE))
    assert np.array_equal(pixels(r), pixels(plain))
    # the hires pass switches to the hires prompt's networks; both appear in "Lora hashes"
    hr = generate(model, Params(prompt="a cat <lora:style:0.5>", hr_prompt="a cat <lora:second:0.5>", enable_hr=True,
                                hr_scale=1.5, denoising_strength=0.5, **{**BASE, "steps": 2}))
    assert hr.warnings == []
    assert "style: abcdef012345" in hr.infotexts[0] and "second: " in hr.infotexts[0]
    assert_same_weights(weights(model), before)


# --- listing, refresh, hashes -------------------------------------------------------------------

def test_listing_refresh_and_addnet_hash(tmp_path, lora_tensors):
    folder = tmp_path / "Lora"
    sn.write_lora(str(folder / "one.safetensors"), lora_tensors, {"ss_output_name": "first", "ss_tag_frequency":
                                                                  '{"x": {"y": 2}}'})
    loras = L.Loras(folder)
    listing = loras.list_api()
    assert listing == [{"name": "one", "alias": "first", "path": str((folder / "one.safetensors").resolve()),
                        "metadata": {"ss_output_name": "first", "ss_tag_frequency": {"x": {"y": 2}}}}]
    sn.write_lora(str(folder / "deep" / "two.pt"), lora_tensors)
    assert [x["name"] for x in loras.list_api()] == ["one"]
    loras.refresh()
    assert [x["name"] for x in loras.list_api()] == ["one", "two"]
    assert loras.list_api()[1]["metadata"] == {} and loras.list_api()[1]["alias"] == "two"
    from sd15.hashing import addnet_hash, model_hash
    assert loras.find("first").shorthash() == addnet_hash(str(folder / "one.safetensors"))[:12]
    assert loras.find("two").shorthash() == model_hash(str(folder / "deep" / "two.pt"))[:12]
    # an unknown name triggers one rescan, so a file dropped in later is found without refresh()
    sn.write_lora(str(folder / "three.safetensors"), lora_tensors)
    assert loras.find("three") is not None


# --- untrusted files ----------------------------------------------------------------------------

def test_names_cannot_escape_the_folder(tmp_path, lora_tensors):
    folder = tmp_path / "Lora"
    sn.write_lora(str(tmp_path / "secret.safetensors"), lora_tensors)
    sn.write_lora(str(folder / "ok.safetensors"), lora_tensors)
    (folder / "sub").mkdir()
    os.symlink(tmp_path / "secret.safetensors", folder / "link.safetensors")
    os.symlink(tmp_path, folder / "sub" / "up")
    os.symlink(folder, folder / "sub" / "loop")  # a link back into the folder is walked once
    loras = L.Loras(folder)
    for name in ("../secret", "..", "sub/../../secret", str(tmp_path / "secret"), "..\\secret", "link", "secret"):
        assert loras.find(name) is None, name
    assert [x["name"] for x in loras.list_api()] == ["ok"]
    job = NetworkJob(SimpleNamespace(loras=loras), [("lora", "../secret", ["1"])])
    assert job.warnings == ["Networks not found: ../secret"]


def test_pickle_with_code_is_refused(model, tmp_path):
    folder = tmp_path / "Lora"
    folder.mkdir()
    marker = tmp_path / "pwned"
    sn.write_evil_pickle(str(folder / "evil.pt"), str(marker))
    loras = L.Loras(folder)
    m = SimpleNamespace(unet=model.unet, text_encoder=model.text_encoder, loras=loras, embeddings=None)
    before = weights(model)
    job = NetworkJob(m, [("lora", "evil", ["1"])])
    job.activate()
    job.finish()
    assert not marker.exists()
    assert len(job.warnings) == 1 and "evil could not be loaded" in job.warnings[0]
    assert job.infotext_params() == {}  # no "Lora hashes" for a file that was not loaded
    assert_same_weights(weights(model), before)


def test_mismatched_and_foreign_loras_warn(tmp_path):
    m = _linear_model()
    fc = "lora_te_text_model_encoder_layers_0_mlp_fc1"
    sn.write_lora(str(tmp_path / "wrong.safetensors"), {f"{fc}.lora_down.weight": torch.ones(2, 768),
                                                        f"{fc}.lora_up.weight": torch.ones(8, 2),
                                                        "lora_unet_conv.lora_down.weight": torch.ones(1, 4, 3, 3),
                                                        "lora_unet_conv.lora_up.weight": torch.ones(6, 1, 1, 1)})
    sn.write_lora(str(tmp_path / "xl.safetensors"), {"lora_te2_text_model_encoder_layers_0_mlp_fc1.lora_down.weight":
                                                     torch.ones(2, 6), "unrelated": torch.ones(1)})
    loras = L.Loras(tmp_path)
    w0, c0 = m.text_encoder.encoder.layers[0].mlp.fc1.weight.clone(), m.unet.conv.weight.clone()
    warnings = loras.activate(m, [(loras.find("wrong"), L.LoraRequest("wrong")),
                                  (loras.find("xl"), L.LoraRequest("xl"))])
    assert any(w.startswith("LoRA wrong: 1 module(s) do not fit") for w in warnings)
    assert any(w.startswith("LoRA xl: none of its") for w in warnings)
    assert torch.equal(m.text_encoder.encoder.layers[0].mlp.fc1.weight, w0)
    assert torch.equal(m.unet.conv.weight, c0 + 1)  # the module that fits still applies: up @ down = ones
    loras.restore()
    assert torch.equal(m.unet.conv.weight, c0)
