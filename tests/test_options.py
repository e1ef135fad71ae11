"""server.options: A1111 v1.10.1's option keys, defaults and types; validation with pydantic v1's coercion; and
the `/sdapi/v1/options` endpoints through Starlette's TestClient (A1111's own `test_options_write`)."""
from __future__ import annotations

import base64
import io
import json
from typing import Any

import pytest
from PIL import Image
from starlette.testclient import TestClient

from server import options
from server.a1111 import ApiError
from server.app import create_app
from server.coerce import ValidationError
from test_server import API, SMALL, make_config, png_b64, write_model_folders

# A1111 v1.10.1 defaults as its documentation and real GET dumps show them (written out independently of the table).
KNOWN = {
    "sd_vae": "Automatic", "sd_vae_overrides_per_model_preferences": True, "CLIP_stop_at_last_layers": 1,
    "eta_noise_seed_delta": 0, "randn_source": "GPU", "eta_ancestral": 1.0, "eta_ddim": 0.0, "s_churn": 0.0,
    "s_tmin": 0.0, "s_tmax": 0.0, "s_noise": 1.0, "s_min_uncond": 0.0, "sigma_min": 0.0, "sigma_max": 0.0,
    "rho": 0.0, "samples_format": "png", "grid_format": "png", "jpeg_quality": 80, "samples_save": True,
    "grid_save": True, "return_grid": True, "grid_only_if_multiple": True, "enable_pnginfo": True,
    "add_model_hash_to_info": True, "add_model_name_to_info": True, "add_vae_hash_to_info": True,
    "add_vae_name_to_info": True, "add_version_to_infotext": True, "add_user_name_to_info": False,
    "live_previews_enable": True, "show_progress_every_n_steps": 10, "live_previews_image_format": "png",
    "face_restoration": False, "face_restoration_model": "CodeFormer", "tiling": False, "emphasis": "Original",
    "initial_noise_multiplier": 1.0, "inpainting_mask_weight": 1.0, "img2img_color_correction": False,
    "img2img_background_color": "#ffffff", "hide_samplers": [], "api_enable_requests": True,
    "api_forbid_local_requests": True, "api_useragent": "", "sd_checkpoints_limit": 1,
    "sd_checkpoints_keep_in_cpu": True, "send_seed": True, "send_size": True, "webp_lossless": False,
    "show_progress_type": "Approx NN", "live_preview_content": "Prompt", "token_merging_ratio": 0.0,
    "outdir_txt2img_samples": "outputs/txt2img-images", "sd_lora": "None", "upscaler_for_img2img": None,
}
TODAY = {"sd_model_checkpoint", "sd_checkpoint_hash", "sd_vae", "CLIP_stop_at_last_layers", "eta_noise_seed_delta",
         "randn_source", "eta_ancestral", "eta_ddim", "s_churn", "s_tmin", "s_tmax", "s_noise", "s_min_uncond",
         "initial_noise_multiplier", "samples_format", "enable_pnginfo", "live_previews_enable",
         "show_progress_every_n_steps"}


def test_table_has_every_a1111_key_with_its_default():
    assert len(options.OPTIONS) == 329  # shared_options.py + prompt comments + the built-in extensions
    d = options.defaults()
    for key, value in KNOWN.items():
        assert d[key] == value and type(d[key]) is type(value), key
    assert TODAY <= set(options.OPTIONS)


def test_types_follow_the_default_except_where_stated():
    o = options.OPTIONS
    assert o["send_seed"].type is bool and o["jpeg_quality"].type is int and o["eta_ddim"].type is float
    assert o["samples_filename_pattern"].type is str and o["hide_samplers"].type is list
    assert o["sd_webui_modal_lightbox_icon_opacity"].type is float  # default written 1, a 0..1 slider
    assert o["sd_vae_explanation"].type is Any and o["sd_vae_explanation"].default == ""  # an HTML entry


def test_every_default_and_every_get_value_validates_back_unchanged():
    d = options.defaults()
    for key, value in d.items():
        assert options.validate(key, value) == value, key
    for key, value in options.options_json(d).items():  # a client posting GET's answer back
        assert options.validate(key, value) == d[key], key


def test_get_shows_nonzero_int_defaults_as_floats():
    out = options.options_json(options.defaults())
    for key, value, kind in [("show_progress_every_n_steps", 10.0, float), ("CLIP_stop_at_last_layers", 1.0, float),
                             ("jpeg_quality", 80.0, float), ("n_rows", -1.0, float), ("eta_noise_seed_delta", 0, int),
                             ("sd_webui_modal_lightbox_icon_opacity", 1.0, float), ("send_seed", True, bool),
                             ("lora_in_memory_limit", 0, int)]:
        assert out[key] == value and type(out[key]) is kind, key


def test_validate_coerces_as_pydantic_v1():
    assert options.validate("send_seed", False) is False
    assert options.validate("send_seed", "false") is False and options.validate("send_seed", 1) is True
    assert options.validate("jpeg_quality", 80.0) == 80 and options.validate("jpeg_quality", True) == 1
    assert options.validate("CLIP_stop_at_last_layers", "2") == 2
    assert options.validate("eta_ddim", 1) == 1.0 and type(options.validate("eta_ddim", 1)) is float
    assert options.validate("samples_filename_pattern", 5) == "5"
    assert options.validate("realesrgan_enabled_models", ("R-ESRGAN 4x+",)) == ["R-ESRGAN 4x+"]
    assert options.validate("upscaler_for_img2img", None) is None


@pytest.mark.parametrize("key,value,msg", [
    ("send_seed", "maybe", "value could not be parsed to a boolean"),
    ("jpeg_quality", "high", "value is not a valid integer"),
    ("hide_samplers", "Euler", "value is not a valid list"),
    ("eta_ddim", "nan", "ensure this value is a finite number"),
    ("CLIP_stop_at_last_layers", 13, "ensure this value is less than or equal to 12"),
    ("jpeg_quality", 0, "ensure this value is greater than or equal to 1"),
    ("emphasis", "Loud", "must be one of: Original, No norm, Ignore, None"),
    ("randn_source", "XYZ", "must be one of: GPU, CPU, NV"),
    ("skip_early_cond", 1.5, "ensure this value is less than or equal to 1.0"),
    ("beta_dist_alpha", 0, "ensure this value is greater than or equal to 0.01"),
    ("comma_padding_backtrack", 75, "ensure this value is less than or equal to 74"),
    ("rho", -1, "ensure this value is greater than or equal to 0.0"),
])
def test_validate_refuses_with_pydantic_v1_words(key, value, msg):
    with pytest.raises(ValidationError) as e:
        options.validate(key, value)
    assert [(p["loc"], p["msg"]) for p in e.value.problems] == [(["body", key], msg)]


def test_options_that_set_a_request_field_have_its_default():
    """An option that sets a `sd15.schema` field starts where the field does (a field a request may leave
    empty starts at None, and the option at A1111's value for it)."""
    from sd15.schema import FIELDS
    for name, key in options.SETTING_OPTIONS.items():
        assert options.OPTIONS[key].default == FIELDS[name].default, key
    for name in options.SAMPLER_OPTIONS:
        assert FIELDS[name].default is None


def test_unknown_key_is_a_400_naming_it():
    with pytest.raises(ApiError) as e:
        options.validate("no_such_option", 1)
    assert e.value.status == 400 and "no_such_option" in e.value.detail


def test_read_only_keys():
    assert {"sd_checkpoint_hash", "api_enable_requests", "api_forbid_local_requests", "api_useragent",
            "sd_vae_explanation", "hypertile_explanation"} <= options.READ_ONLY_OPTIONS
    assert not options.READ_ONLY_OPTIONS & (TODAY - {"sd_checkpoint_hash"})


def test_defaults_are_fresh_copies():
    d = options.defaults()
    d["hide_samplers"].append("Euler")
    assert options.defaults()["hide_samplers"] == []


# --------------------------------------------------------------------------------------------------
# through the server
# --------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def client(tmp_path_factory):
    with TestClient(create_app(make_config(write_model_folders(tmp_path_factory.mktemp("server"))))) as c:
        yield c


def test_options_write(client):
    """A1111's `test/test_api.py::test_options_write`, as it is."""
    url = f"{API}/options"
    response = client.get(url)
    assert response.status_code == 200
    pre_value = response.json()["send_seed"]
    assert client.post(url, json={"send_seed": not pre_value}).status_code == 200
    response = client.get(url)
    assert response.status_code == 200
    assert response.json()["send_seed"] == (not pre_value)
    client.post(url, json={"send_seed": pre_value})


def test_get_lists_every_key_and_stored_values_echo(client):
    got = client.get(f"{API}/options").json()
    assert set(got) == set(options.OPTIONS)
    assert got["jpeg_quality"] == 80.0 and got["outdir_save"] == "log/images" and got["hide_samplers"] == []
    r = client.post(f"{API}/options", json={"hide_samplers": ["DDIM"], "jpeg_quality": "90", "font": 12})
    assert r.status_code == 200, r.text
    got = client.get(f"{API}/options").json()
    assert got["hide_samplers"] == ["DDIM"] and got["jpeg_quality"] == 90.0 and got["font"] == "12"
    client.post(f"{API}/options", json={"hide_samplers": [], "jpeg_quality": 80, "font": ""})


def test_unknown_key_names_it_and_applies_nothing(client):
    r = client.post(f"{API}/options", json={"send_size": False, "no_such_option": 1})
    assert 400 <= r.status_code < 500 and "no_such_option" in r.json()["detail"]
    assert client.get(f"{API}/options").json()["send_size"] is True


def test_wrong_type_is_a_422_in_fastapi_shape(client):
    r = client.post(f"{API}/options", json={"send_seed": "maybe"})
    assert r.status_code == 422
    assert r.json() == {"detail": [{"loc": ["body", "send_seed"], "msg": "value could not be parsed to a boolean",
                                    "type": "type_error.bool"}]}


def test_read_only_keys_are_skipped_silently(client):
    r = client.post(f"{API}/options", json={"api_useragent": "x", "sd_vae_explanation": "<b>hi</b>"})
    assert r.status_code == 200
    got = client.get(f"{API}/options").json()
    assert got["api_useragent"] == "" and got["sd_vae_explanation"] == ""


def _mask_b64() -> str:
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (16, 16, 48, 48))
    buf = io.BytesIO()
    mask.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def test_img2img_takes_a_boolean_inpainting_mask_invert(client):
    """A1111's img2img tests send `inpainting_mask_invert: true`; pydantic v1 makes it 1."""
    body = {"init_images": [png_b64()], "mask": _mask_b64(), "seed": 4, "inpainting_fill": 1, **SMALL}
    runs = {}
    for value in (True, 1, False):
        r = client.post(f"{API}/img2img", json={**body, "inpainting_mask_invert": value})
        assert r.status_code == 200, r.text
        runs[value] = r.json()
    assert runs[True]["parameters"]["inpainting_mask_invert"] == 1
    assert runs[False]["parameters"]["inpainting_mask_invert"] == 0
    assert runs[True]["images"] == runs[1]["images"]  # the same job as the integer flag
    assert runs[True]["images"] != runs[False]["images"]  # and the flag does invert the mask
    assert json.loads(runs[True]["info"])["infotexts"][0] == json.loads(runs[1]["info"])["infotexts"][0]


def test_override_settings_accept_stored_only_keys_and_check_types(client):
    r = client.post(f"{API}/txt2img", json={**SMALL, "seed": 1, "override_settings": {"send_seed": False}})
    assert r.status_code == 200, r.text
    r = client.post(f"{API}/txt2img", json={**SMALL, "override_settings": {"jpeg_quality": "best"}})
    assert r.status_code == 422 and r.json()["detail"][0]["msg"] == "value is not a valid integer"
