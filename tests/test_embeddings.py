"""Textual-inversion embeddings: file formats, listing, placement in the 75-token chunks, images, hashes, safety."""
import os

import numpy as np
import pytest
import torch

import sd15
import synthetic_networks as sn
from sd15.a1111.conditioning import encode_texts
from sd15.embeddings import EmbeddingDatabase, load_embedding_file
from sd15.pipeline import generate
from sd15.schema import GenerationRequest as Params
from sd15.a1111.prompt import tokenize_prompt

BASE = dict(seed=3, steps=3, width=64, height=64, negative_prompt="")
WIDTH = 64  # CLIP_TINY


@pytest.fixture(scope="module")
def emb_dir(tmp_path_factory, tiny_ckpt):
    folder = tmp_path_factory.mktemp("emb") / "embeddings"
    folder.mkdir()
    plain = sd15.load(tiny_ckpt, device="cpu", dtype=torch.float32)
    table = plain.text_encoder.embeddings.token_embedding.weight
    tok = plain.tokenizer.encode
    sn.write_embedding_pt(str(folder / "catdogemb.pt"), table[tok("cat dog")])  # the vectors of two words
    sn.write_embedding_safetensors(str(folder / "sub" / "tenvec.safetensors"),
                                   table[tok("red green blue yellow black white pink brown gray orange")])
    sn.write_embedding_diffusers_bin(str(folder / "houseemb.bin"), table[tok("house")[0]])
    sn.write_embedding_pt(str(folder / "oldstyle.pt"), torch.randn(2, WIDTH), parameter_dict=True, step=12)
    sn.write_embedding_pt(str(folder / "sd2thing.pt"), torch.randn(3, 1024))
    torch.save({"clip_l": torch.randn(2, 768), "clip_g": torch.randn(2, 1280)}, folder / "xlthing.pt")
    (folder / "empty.pt").write_bytes(b"")
    (folder / "notes.txt").write_text("not an embedding")
    return folder


@pytest.fixture(scope="module")
def model(tiny_ckpt, emb_dir):
    return sd15.load(tiny_ckpt, device="cpu", dtype=torch.float32, embeddings_dir=emb_dir)


def pixels(result):
    return np.stack([np.asarray(im) for im in result.images]).astype(np.int16)


def test_formats_listing_and_wrong_width(model):
    listing = model.embeddings.api_listing()
    assert sorted(listing["loaded"]) == ["catdogemb", "houseemb", "oldstyle", "tenvec"]
    assert listing["loaded"]["catdogemb"] == {"step": 500, "sd_checkpoint": "0123abcd", "sd_checkpoint_name": "tiny",
                                              "shape": WIDTH, "vectors": 2}
    assert listing["loaded"]["tenvec"] == {"step": None, "sd_checkpoint": None, "sd_checkpoint_name": None,
                                           "shape": WIDTH, "vectors": 10}
    assert listing["loaded"]["houseemb"]["vectors"] == 1
    assert listing["loaded"]["oldstyle"]["step"] == 12  # torch.nn.ParameterDict of the original TI repo
    assert listing["skipped"] == {
        "sd2thing": {"step": 500, "sd_checkpoint": "0123abcd", "sd_checkpoint_name": "tiny", "shape": 1024,
                     "vectors": 3},
        "xlthing": {"step": None, "sd_checkpoint": None, "sd_checkpoint_name": None, "shape": 2048, "vectors": 2}}
    assert "1024" in model.embeddings.skipped["sd2thing"].reason
    assert model.embeddings.loaded["catdogemb"].vectors.dtype == torch.float32


def test_embedding_of_two_words_equals_the_words(model):
    a = encode_texts(model, ["a photo of catdogemb, (CatDogEmb:1.3)"])
    b = encode_texts(model, ["a photo of cat dog, (cat dog:1.3)"])
    assert torch.equal(a, b)
    one = encode_texts(model, ["houseemb on a hill"])
    assert torch.equal(one, encode_texts(model, ["house on a hill"]))
    ra = generate(model, Params(prompt="a photo of catdogemb", **BASE))
    rb = generate(model, Params(prompt="a photo of cat dog", **BASE))
    assert np.array_equal(pixels(ra), pixels(rb))
    h = load_embedding_file(model.embeddings.loaded["catdogemb"].path).shorthash()
    assert ra.infotexts[0].count("TI hashes") == 1 and f'TI hashes: "catdogemb: {h}"' in ra.infotexts[0]
    assert "TI hashes" not in rb.infotexts[0]


def test_negative_prompt_embeddings_are_used_and_hashed(model):
    r = generate(model, Params(prompt="a tree", **{**BASE, "negative_prompt": "houseemb"}))
    plain = generate(model, Params(prompt="a tree", **{**BASE, "negative_prompt": "house"}))
    assert np.array_equal(pixels(r), pixels(plain))
    assert 'TI hashes: "houseemb: ' in r.infotexts[0]


def test_multi_vector_embeddings_count_toward_chunks(model):
    finder = model.embeddings.finder(model.tokenizer)
    enc = model.tokenizer.encode
    chunks, n = tokenize_prompt("x " * 60 + "tenvec", enc, embeddings=finder)
    assert len(chunks) == 1 and n == 70
    assert chunks[0].fixes[0][0] == 60 and chunks[0].tokens[61:71] == [0] * 10
    chunks, n = tokenize_prompt("x " * 70 + "tenvec", enc, embeddings=finder)
    assert len(chunks) == 2 and n == 85  # the 10 vectors do not fit after 70 tokens: they open chunk 2
    assert chunks[0].fixes == [] and chunks[1].fixes[0][0] == 0 and chunks[1].tokens[1:11] == [0] * 10
    z = encode_texts(model, ["x " * 70 + "tenvec"])
    assert z.shape == (1, 154, WIDTH)
    words = "red green blue yellow black white pink brown gray orange"
    assert torch.equal(z[:, 77:], encode_texts(model, [words]))
    assert torch.equal(z[:, :77], encode_texts(model, ["x " * 70]))
    weighted, _ = tokenize_prompt("(tenvec:1.5)", enc, embeddings=finder)
    assert weighted[0].multipliers[1:11] == [1.5] * 10


def test_refresh_picks_up_new_files_between_jobs(model, emb_dir):
    table = model.text_encoder.embeddings.token_embedding.weight
    path = emb_dir / "laterword.pt"
    try:
        sn.write_embedding_pt(str(path), table[model.tokenizer.encode("cat")])
        model.embeddings.refresh_if_changed()  # what generate() does first
        assert "laterword" in model.embeddings.api_listing()["loaded"]
        assert torch.equal(encode_texts(model, ["laterword"]), encode_texts(model, ["cat"]))
    finally:
        path.unlink()
        model.embeddings.refresh()
    assert "laterword" not in model.embeddings.loaded


def test_untrusted_files(tmp_path):
    folder = tmp_path / "embeddings"
    folder.mkdir()
    marker = tmp_path / "pwned"
    sn.write_evil_pickle(str(folder / "evil.pt"), str(marker))
    sn.write_embedding_pt(str(tmp_path / "outside.pt"), torch.randn(1, WIDTH))
    os.symlink(tmp_path / "outside.pt", folder / "linked.pt")
    torch.save({"a": torch.randn(WIDTH), "b": torch.randn(WIDTH)}, folder / "twoterms.bin")
    db = EmbeddingDatabase(folder, expected_width=WIDTH)
    listing = db.api_listing()
    assert listing == {"loaded": {}, "skipped": {}}
    assert not marker.exists()
    assert "not a loadable file" in db.errors["evil"] and "exactly one tensor" in db.errors["twoterms"]
    assert "linked" not in db.errors  # never opened: it resolves outside the folder
