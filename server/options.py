"""Every option key of A1111 v1.10.1's `/sdapi/v1/options`, with A1111's default and type.

`_TABLE` lists the options registered by A1111's `modules/shared_options.py`, its prompt-comments script
and its built-in extensions (Lora, LDSR, ScuNET, SwinIR, canvas-zoom-and-pan, extra-options-section,
hypertile), in registration order (not listed: the `prioritized_callbacks_*` keys A1111's settings page adds
at runtime). A plain entry is A1111's default, its type the default's type; an `Option` entry gives the type
where it is not the default's, or choices. The options that set a request field take that field's range
from `sd15.schema` (the README lists what sd15 honours; every other key is stored and echoed back by GET, as
A1111 does). A POSTed value is coerced with pydantic v1's rules (server.coerce); an unknown key is a 400
naming it, a wrong type a 422 in FastAPI's shape.
GET shows an integer option whose default is non-zero as a float (A1111's OptionsModel types them `float`).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Optional

from sd15.a1111.images import IMAGE_FORMATS
from sd15.schema import EMPHASIS_MODES, FIELDS, RANDN_SOURCES, fields_of, range_problem
from server.coerce import ValidationError, convert

HTML = object()  # an HTML explanation entry of A1111's settings page: no value of its own (shown as "")


@dataclass(frozen=True)
class Option:
    default: Any
    type: Any  # a field type server.coerce understands
    lo: Optional[float] = None
    hi: Optional[float] = None
    choices: Optional[tuple] = None


_TABLE = {
    "samples_save": True,
    "samples_format": Option("png", str, choices=tuple(IMAGE_FORMATS)),  # what A1111's API can encode
    "samples_filename_pattern": "",
    "save_images_add_number": True,
    "save_images_replace_action": "Replace",
    "grid_save": True,
    "grid_format": Option("png", str, choices=tuple(IMAGE_FORMATS)),
    "grid_extended_filename": False,
    "grid_only_if_multiple": True,
    "grid_prevent_empty_spots": False,
    "grid_zip_filename_pattern": "",
    "n_rows": -1,
    "font": "",
    "grid_text_active_color": "#000000",
    "grid_text_inactive_color": "#999999",
    "grid_background_color": "#ffffff",
    "save_images_before_face_restoration": False,
    "save_images_before_highres_fix": False,
    "save_images_before_color_correction": False,
    "save_mask": False,
    "save_mask_composite": False,
    "jpeg_quality": Option(80, int, 1, 100),
    "webp_lossless": False,
    "export_for_4chan": True,
    "img_downscale_threshold": 4.0,
    "target_side_length": 4000,
    "img_max_size_mp": 200,
    "use_original_name_batch": True,
    "use_upscaler_name_as_suffix": False,
    "save_selected_only": True,
    "save_write_log_csv": True,
    "save_init_img": False,
    "temp_dir": "",
    "clean_temp_dir_at_start": False,
    "save_incomplete_images": False,
    "notification_audio": True,
    "notification_volume": 100,
    "outdir_samples": "",
    "outdir_txt2img_samples": "outputs/txt2img-images",
    "outdir_img2img_samples": "outputs/img2img-images",
    "outdir_extras_samples": "outputs/extras-images",
    "outdir_grids": "",
    "outdir_txt2img_grids": "outputs/txt2img-grids",
    "outdir_img2img_grids": "outputs/img2img-grids",
    "outdir_save": "log/images",
    "outdir_init_images": "outputs/init-images",
    "save_to_dirs": True,
    "grid_save_to_dirs": True,
    "use_save_to_dirs_for_ui": False,
    "directories_filename_pattern": "[date]",
    "directories_max_prompt_words": 8,
    "ESRGAN_tile": 192,
    "ESRGAN_tile_overlap": 8,
    "realesrgan_enabled_models": ["R-ESRGAN 4x+", "R-ESRGAN 4x+ Anime6B"],
    "dat_enabled_models": ["DAT x2", "DAT x3", "DAT x4"],
    "DAT_tile": 192,
    "DAT_tile_overlap": 8,
    "upscaler_for_img2img": Option(None, Optional[str]),
    "set_scale_by_when_changing_upscaler": False,
    "face_restoration": False,
    "face_restoration_model": "CodeFormer",
    "code_former_weight": 0.5,
    "face_restoration_unload": False,
    "auto_launch_browser": "Local",
    "enable_console_prompts": False,
    "show_warnings": False,
    "show_gradio_deprecation_warnings": True,
    "memmon_poll_rate": 8,
    "samples_log_stdout": False,
    "multiple_tqdm": True,
    "enable_upscale_progressbar": True,
    "print_hypernet_extra": False,
    "list_hidden_files": True,
    "disable_mmap_load_safetensors": False,
    "hide_ldm_prints": True,
    "dump_stacks_on_signal": False,
    "profiling_explanation": HTML,
    "profiling_enable": False,
    "profiling_activities": ["CPU"],
    "profiling_record_shapes": True,
    "profiling_profile_memory": True,
    "profiling_with_stack": True,
    "profiling_filename": "trace.json",
    "api_enable_requests": True,
    "api_forbid_local_requests": True,
    "api_useragent": "",
    "unload_models_when_training": False,
    "pin_memory": False,
    "save_optimizer_state": False,
    "save_training_settings_to_txt": True,
    "dataset_filename_word_regex": "",
    "dataset_filename_join_string": " ",
    "training_image_repeats_per_epoch": 1,
    "training_write_csv_every": 500,
    "training_xattention_optimizations": False,
    "training_enable_tensorboard": False,
    "training_tensorboard_save_images": False,
    "training_tensorboard_flush_every": 120,
    "sd_model_checkpoint": Option("", str),  # the server sets it to the loaded checkpoint's title
    "sd_checkpoints_limit": 1,
    "sd_checkpoints_keep_in_cpu": True,
    "sd_checkpoint_cache": 0,
    "sd_unet": "Automatic",
    "enable_quantization": False,
    "emphasis": Option("Original", str, choices=EMPHASIS_MODES),
    "enable_batch_seeds": True,
    "comma_padding_backtrack": 20,
    "sdxl_clip_l_skip": False,
    "CLIP_stop_at_last_layers": 1,
    "upcast_attn": False,
    "randn_source": Option("GPU", str, choices=RANDN_SOURCES),
    "tiling": False,
    "hires_fix_refiner_pass": "second pass",
    "sdxl_crop_top": 0,
    "sdxl_crop_left": 0,
    "sdxl_refiner_low_aesthetic_score": 2.5,
    "sdxl_refiner_high_aesthetic_score": 6.0,
    "sd3_enable_t5": False,
    "sd_vae_explanation": HTML,
    "sd_vae_checkpoint_cache": 0,
    "sd_vae": Option("Automatic", str),  # checked against the VAE folder by the server
    "sd_vae_overrides_per_model_preferences": True,
    "auto_vae_precision_bfloat16": False,
    "auto_vae_precision": True,
    "sd_vae_encode_method": "Full",
    "sd_vae_decode_method": "Full",
    "inpainting_mask_weight": 1.0,
    "initial_noise_multiplier": 1.0,
    "img2img_extra_noise": 0.0,
    "img2img_color_correction": False,
    "img2img_fix_steps": False,
    "img2img_background_color": "#ffffff",
    "img2img_editor_height": 720,
    "img2img_sketch_default_brush_color": "#ffffff",
    "img2img_inpaint_mask_brush_color": "#ffffff",
    "img2img_inpaint_sketch_default_brush_color": "#ffffff",
    "return_mask": False,
    "return_mask_composite": False,
    "img2img_batch_show_results_limit": 32,
    "overlay_inpaint": True,
    "cross_attention_optimization": "Automatic",
    "s_min_uncond": 0.0,
    "s_min_uncond_all": False,
    "token_merging_ratio": 0.0,
    "token_merging_ratio_img2img": 0.0,
    "token_merging_ratio_hr": 0.0,
    "pad_cond_uncond": False,
    "pad_cond_uncond_v0": False,
    "persistent_cond_cache": True,
    "batch_cond_uncond": True,
    "fp8_storage": "Disable",
    "cache_fp16_weight": False,
    "auto_backcompat": True,
    "use_old_emphasis_implementation": False,
    "use_old_karras_scheduler_sigmas": False,
    "no_dpmpp_sde_batch_determinism": False,
    "use_old_hires_fix_width_height": False,
    "hires_fix_use_firstpass_conds": False,
    "use_old_scheduling": False,
    "use_downcasted_alpha_bar": False,
    "refiner_switch_by_sample_steps": False,
    "interrogate_keep_models_in_memory": False,
    "interrogate_return_ranks": False,
    "interrogate_clip_num_beams": 1,
    "interrogate_clip_min_length": 24,
    "interrogate_clip_max_length": 48,
    "interrogate_clip_dict_limit": 1500,
    "interrogate_clip_skip_categories": [],
    "interrogate_deepbooru_score_threshold": 0.5,
    "deepbooru_sort_alpha": True,
    "deepbooru_use_spaces": True,
    "deepbooru_escape": True,
    "deepbooru_filter_tags": "",
    "extra_networks_show_hidden_directories": True,
    "extra_networks_dir_button_function": False,
    "extra_networks_hidden_models": "When searched",
    "extra_networks_default_multiplier": 1.0,
    "extra_networks_card_width": 0,
    "extra_networks_card_height": 0,
    "extra_networks_card_text_scale": 1.0,
    "extra_networks_card_show_desc": True,
    "extra_networks_card_description_is_html": False,
    "extra_networks_card_order_field": "Path",
    "extra_networks_card_order": "Ascending",
    "extra_networks_tree_view_style": "Dirs",
    "extra_networks_tree_view_default_enabled": True,
    "extra_networks_tree_view_default_width": 180,
    "extra_networks_add_text_separator": " ",
    "ui_extra_networks_tab_reorder": "",
    "textual_inversion_print_at_load": False,
    "textual_inversion_add_hashes_to_infotext": True,
    "sd_hypernetwork": "None",
    "keyedit_precision_attention": 0.1,
    "keyedit_precision_extra": 0.05,
    "keyedit_delimiters": ".,\\/!?%^*;:{}=`~() ",
    "keyedit_delimiters_whitespace": ["Tab", "Carriage Return", "Line Feed"],
    "keyedit_move": True,
    "disable_token_counters": False,
    "include_styles_into_token_counters": True,
    "return_grid": True,
    "do_not_show_images": False,
    "js_modal_lightbox": True,
    "js_modal_lightbox_initially_zoomed": True,
    "js_modal_lightbox_gamepad": False,
    "js_modal_lightbox_gamepad_repeat": 250,
    "sd_webui_modal_lightbox_icon_opacity": Option(1, float),  # a 0..1 slider whose default is written as 1
    "sd_webui_modal_lightbox_toolbar_opacity": 0.9,
    "gallery_height": "",
    "open_dir_button_choice": "Subdirectory",
    "compact_prompt_box": False,
    "samplers_in_dropdown": True,
    "dimensions_and_batch_together": True,
    "sd_checkpoint_dropdown_use_short": False,
    "hires_fix_show_sampler": False,
    "hires_fix_show_prompts": False,
    "txt2img_settings_accordion": False,
    "img2img_settings_accordion": False,
    "interrupt_after_current": True,
    "localization": "None",
    "quicksettings_list": ["sd_model_checkpoint"],
    "ui_tab_order": [],
    "hidden_tabs": [],
    "ui_reorder_list": [],
    "gradio_theme": "Default",
    "gradio_themes_cache": True,
    "show_progress_in_title": True,
    "send_seed": True,
    "send_size": True,
    "enable_reloading_ui_scripts": False,
    "infotext_explanation": HTML,
    "enable_pnginfo": True,
    "save_txt": False,
    "add_model_name_to_info": True,
    "add_model_hash_to_info": True,
    "add_vae_name_to_info": True,
    "add_vae_hash_to_info": True,
    "add_user_name_to_info": False,
    "add_version_to_infotext": True,
    "disable_weights_auto_swap": True,
    "infotext_skip_pasting": [],
    "infotext_styles": "Apply if any",
    "show_progressbar": True,
    "live_previews_enable": True,
    "live_previews_image_format": "png",
    "show_progress_grid": True,
    "show_progress_every_n_steps": Option(10, int, -1, 1000),
    "show_progress_type": Option("Approx NN", str, choices=("Full", "Approx NN", "Approx cheap", "TAESD")),
    "live_preview_allow_lowvram_full": False,
    "live_preview_content": Option("Prompt", str, choices=("Combined", "Prompt", "Negative prompt")),
    "live_preview_refresh_period": 1000,
    "live_preview_fast_interrupt": False,
    "js_live_preview_in_modal_lightbox": False,
    "prevent_screen_sleep_during_generation": True,
    "hide_samplers": [],
    "eta_ddim": 0.0,
    "eta_ancestral": 1.0,
    "ddim_discretize": "uniform",
    "s_churn": 0.0,
    "s_tmin": 0.0,
    "s_tmax": 0.0,
    "s_noise": 1.0,
    "sigma_min": 0.0,
    "sigma_max": 0.0,
    "rho": 0.0,
    "eta_noise_seed_delta": 0,
    "always_discard_next_to_last_sigma": False,
    "sgm_noise_multiplier": False,
    "uni_pc_variant": "bh1",
    "uni_pc_skip_type": "time_uniform",
    "uni_pc_order": 3,
    "uni_pc_lower_order_final": True,
    "sd_noise_schedule": "Default",
    "skip_early_cond": 0.0,
    "beta_dist_alpha": 0.6,
    "beta_dist_beta": 0.6,
    "postprocessing_enable_in_main_ui": [],
    "postprocessing_disable_in_extras": [],
    "postprocessing_operation_order": [],
    "upscaling_max_images_in_cache": 5,
    "postprocessing_existing_caption_action": "Ignore",
    "disabled_extensions": [],
    "disable_all_extensions": "none",
    "restore_config_state_file": "",
    "sd_checkpoint_hash": "",
    "enable_prompt_comments": True,
    "ldsr_steps": 100,
    "ldsr_cached": False,
    "sd_lora": "None",
    "lora_preferred_name": "Alias from file",
    "lora_add_hashes_to_infotext": True,
    "lora_bundled_ti_to_infotext": True,
    "lora_show_all": False,
    "lora_hide_unknown_for_versions": [],
    "lora_in_memory_limit": 0,
    "lora_not_found_warning_console": False,
    "lora_not_found_gradio_warning": False,
    "lora_functional": False,
    "SCUNET_tile": 256,
    "SCUNET_tile_overlap": 8,
    "SWIN_tile": 192,
    "SWIN_tile_overlap": 8,
    "SWIN_torch_compile": False,
    "canvas_hotkey_zoom": "Alt",
    "canvas_hotkey_adjust": "Ctrl",
    "canvas_hotkey_shrink_brush": "Q",
    "canvas_hotkey_grow_brush": "W",
    "canvas_hotkey_move": "F",
    "canvas_hotkey_fullscreen": "S",
    "canvas_hotkey_reset": "R",
    "canvas_hotkey_overlap": "O",
    "canvas_show_tooltip": True,
    "canvas_auto_expand": True,
    "canvas_blur_prompt": False,
    "canvas_disabled_functions": ["Overlap"],
    "settings_in_ui": HTML,
    "extra_options_txt2img": [],
    "extra_options_img2img": [],
    "extra_options_cols": 1,
    "extra_options_accordion": False,
    "hypertile_explanation": HTML,
    "hypertile_enable_unet": False,
    "hypertile_enable_unet_secondpass": False,
    "hypertile_max_depth_unet": 3,
    "hypertile_max_tile_unet": 256,
    "hypertile_swap_size_unet": 3,
    "hypertile_enable_vae": False,
    "hypertile_max_depth_vae": 3,
    "hypertile_max_tile_vae": 128,
    "hypertile_swap_size_vae": 3,
}

OPTIONS: dict[str, Option] = {
    key: v if isinstance(v, Option) else Option("", Any) if v is HTML else Option(v, type(v))
    for key, v in _TABLE.items()
}
# The options that set a request's `sd15.schema` field: its "settings" fields (each under its own name but
# CLIP skip), and the sampler parameters a request may leave empty. Their ranges are the schema's.
SETTING_OPTIONS = {**{f.name: f.name for f in fields_of("settings")}, "clip_skip": "CLIP_stop_at_last_layers"}
SAMPLER_OPTIONS = ("s_churn", "s_tmin", "s_tmax", "s_noise", "s_min_uncond", "initial_noise_multiplier")
for _name, _key in [*SETTING_OPTIONS.items(), *zip(SAMPLER_OPTIONS, SAMPLER_OPTIONS)]:
    _meta = FIELDS[_name].metadata
    OPTIONS[_key] = dataclasses.replace(OPTIONS[_key], lo=_meta["lo"], hi=_meta["hi"])
# Keys a POST silently skips, as A1111 does: HTML entries, `restrict_api` keys and the loaded file's hash.
READ_ONLY_OPTIONS = frozenset({"sd_checkpoint_hash", "api_enable_requests", "api_forbid_local_requests",
                               "api_useragent", *(key for key, v in _TABLE.items() if v is HTML)})


def defaults() -> dict:
    """Every option at its default (a fresh dict; lists are copied so callers may change them)."""
    return {key: list(opt.default) if isinstance(opt.default, list) else opt.default for key, opt in OPTIONS.items()}


def validate(key: str, value):
    """One POSTed option value -> the value to store; ApiError 400 for an unknown key, ValidationError (422)
    for a value that does not coerce to the option's type or is outside its range or choices."""
    from server.a1111 import ApiError  # (a1111 imports this module)

    opt = OPTIONS.get(key)
    if opt is None:
        raise ApiError(400, f"unknown option {key!r}; GET /sdapi/v1/options lists the options this server has")
    value = convert(key, value, opt.type)
    problem = range_problem(key, value, opt.lo, opt.hi)
    if problem:
        raise ValidationError.one(*problem)
    if opt.choices is not None and value not in opt.choices:
        raise ValidationError.one(key, f"must be one of: {', '.join(map(str, opt.choices))}")
    return value


def options_json(values: dict) -> dict:
    """GET /options: every key; an int option whose default is non-zero shows as a float (A1111's quirk)."""
    out = {}
    for key, opt in OPTIONS.items():
        value = values.get(key, opt.default)
        if opt.type in (int, float) and opt.default != 0 and type(value) is int:
            value = float(value)
        out[key] = value
    return out
