"""The `sd15` command: PNGs with A1111's `parameters` chunk, every bad argument refused before the model loads
with one line and exit code 2, the list commands, --help without torch, progress and Ctrl-C."""
import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest
import torch
from PIL import Image

import sd15
import sd15.model
from sd15.__main__ import main

A1111_UPSCALERS = ["Latent", "Latent (antialiased)", "Latent (bicubic)", "Latent (bicubic antialiased)",
                   "Latent (nearest)", "Latent (nearest-exact)", "None", "Lanczos", "Nearest"]


def _run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def _user_comment(path) -> str:
    with Image.open(path) as im:
        raw = im.getexif().get_ifd(0x8769)[0x9286]
    assert raw[:8] == b"UNICODE\0"
    return raw[8:].decode("utf-16-be")


def test_txt2img_writes_png_with_parameters(tiny_ckpt, tmp_path, capsys):
    out = tmp_path / "cat.png"
    code, stdout, err = _run(capsys, "txt2img", "--ckpt", tiny_ckpt, "--prompt", "a cat", "--steps", "3", "--width",
                             "64", "--height", "64", "--seed", "7", "--sampler", "Euler a", "--out", out)
    assert code == 0 and stdout.strip() == str(out)
    assert "sd15: seed" not in err  # only a random seed is reported
    with Image.open(out) as im:
        assert im.size == (64, 64)
        assert im.text["parameters"].startswith("a cat\nSteps: 3, Sampler: Euler a, Schedule type: Automatic, "
                                                "CFG scale: 7.0, Seed: 7, Size: 64x64")


def test_batch_into_folder_and_img2img_progress(tiny_ckpt, tmp_path, capsys):
    folder = tmp_path / "out"
    code, stdout, _ = _run(capsys, "txt2img", "--ckpt", tiny_ckpt, "--steps", "2", "--width", "64", "--height", "64",
                           "--seed", "3", "--batch-size", "2", "--out", folder)
    paths = stdout.split()
    assert code == 0 and [os.path.basename(p) for p in paths] == ["00000-3.png", "00001-4.png"]
    code, stdout, err = _run(capsys, "img2img", "--ckpt", tiny_ckpt, "--init", paths[0], "--denoising-strength",
                             "0.5", "--steps", "4", "--width", "64", "--height", "64", "--seed", "1",
                             "--out", tmp_path / "i2i.jpg")
    assert code == 0
    assert "Denoising strength: 0.5" in _user_comment(stdout.strip())
    # A1111 runs int(0.5 * 4) + 1 = 3 of the 4 steps; the bar counts those
    assert re.search(r"\b3/3\b", err) and "/4" not in err


def test_random_seed_is_printed_and_low_cfg_warns(tiny_ckpt, tmp_path, capsys):
    code, stdout, err = _run(capsys, "txt2img", "--ckpt", tiny_ckpt, "--steps", "1", "--width", "64", "--height",
                             "64", "--cfg-scale", "-5", "--out", tmp_path / "x.png")
    assert code == 0
    seed = re.search(r"^sd15: seed (\d+)$", err, re.M).group(1)
    warning = "sd15: warning: --cfg-scale -5.0: a negative scale steers the image away from the prompt"
    assert warning in err.splitlines()
    with Image.open(stdout.strip()) as im:
        assert f"Seed: {seed}," in im.text["parameters"] and "CFG scale: -5.0" in im.text["parameters"]


@pytest.fixture
def no_load(monkeypatch):
    """Bad input must be refused before the model loads."""
    def load(*a, **k):
        raise AssertionError("the model was loaded")
    monkeypatch.setattr(sd15.model, "load", load)


# (command, extra arguments, the exact message); {tmp} is the test's folder. Later flags win over the defaults.
BAD_INPUTS = [
    ("txt2img", ["--out", "{tmp}/missing/x.png"], "--out {tmp}/missing/x.png: folder {tmp}/missing does not exist"),
    ("txt2img", ["--out", "{tmp}/missing/deeper"], "--out {tmp}/missing/deeper: folder {tmp}/missing does not exist"),
    ("txt2img", ["--out", "{tmp}/afile/sub"], "--out {tmp}/afile/sub: {tmp}/afile is not a folder"),
    ("txt2img", ["--out", "{tmp}/afile/x.jpg"], "--out {tmp}/afile/x.jpg: {tmp}/afile is not a folder"),
    ("txt2img", ["--out", "{tmp}/afile"], "--out {tmp}/afile: exists and is not a folder"),
    ("txt2img", ["--out", "{tmp}/fox.gif"], "--out {tmp}/fox.gif: unknown image type '.gif' "
                                            "(use .png, .jpg, .jpeg, .webp, or a folder)"),
    ("txt2img", ["--width", "65"], "--width 65: must be a multiple of 8 (the latent is 1/8 of the image; "
                                   "try 64 or 72)"),
    ("txt2img", ["--height", "100"], "--height 100: must be a multiple of 8 (the latent is 1/8 of the image; "
                                     "try 96 or 104)"),
    ("txt2img", ["--width", "8192", "--height", "8192"],
     "--width: 8192x8192 is 67108864 pixels; the limit is 4194304 (--max-pixels)"),
    ("txt2img", ["--width", "1024", "--height", "1024", "--max-pixels", "100000"],
     "--width: 1024x1024 is 1048576 pixels; the limit is 100000 (--max-pixels)"),
    ("txt2img", ["--width", "0"], "--width: ensure this value is greater than or equal to 8"),
    ("txt2img", ["--steps", "0"], "--steps: ensure this value is greater than or equal to 1"),
    ("txt2img", ["--seed", "-5"], "--seed: ensure this value is greater than or equal to -1 (-1: random)"),
    ("txt2img", ["--cfg-scale", "150"], "--cfg-scale: ensure this value is less than or equal to 100.0"),
    ("txt2img", ["--device", "foo"], "--device foo: unknown device (use cpu, cuda, cuda:N or mps)"),
    ("txt2img", ["--device", "cpu", "--precision", "fp16"], "--precision fp16: needs a GPU; on the CPU use fp32 "
                                                            "(the default)"),
    ("txt2img", ["--device", "cpu", "--precision", "bf16"], "--precision bf16: needs a GPU; on the CPU use fp32 "
                                                            "(the default)"),
    ("txt2img", ["--ckpt", "{tmp}/dir"], "--ckpt {tmp}/dir: is a folder, not a file"),
    ("txt2img", ["--ckpt", "{tmp}/short.safetensors"],
     "--ckpt {tmp}/short.safetensors: truncated or not a checkpoint (100 bytes)"),
    ("txt2img", ["--ckpt", "{tmp}/cut.safetensors"],
     "--ckpt {tmp}/cut.safetensors: truncated or not a checkpoint (100 bytes)"),
    ("txt2img", ["--ckpt", "{tmp}/short.ckpt"], "--ckpt {tmp}/short.ckpt: truncated or not a checkpoint (100 bytes)"),
    ("txt2img", ["--vae", "{tmp}/nope.safetensors"], "--vae {tmp}/nope.safetensors: no such file"),
    ("img2img", ["--init", "{tmp}/dir"], "--init {tmp}/dir: is a folder, not a file"),
    ("img2img", ["--init", "{tmp}/nope.png"], "--init {tmp}/nope.png: no such file"),
    ("img2img", ["--init", "{tmp}/short.ckpt"],
     "--init {tmp}/short.ckpt: not an image (cannot identify image file '{tmp}/short.ckpt')"),
    ("img2img", ["--mask", "{tmp}/nomask.png"], "--mask {tmp}/nomask.png: no such file"),
    ("img2img", ["--denoising-strength", "1.5"],
     "--denoising-strength: ensure this value is less than or equal to 1.0"),
]


@pytest.mark.parametrize("command, args, message", BAD_INPUTS, ids=[m.split(":")[0] for _, _, m in BAD_INPUTS])
def test_bad_input_one_line_exit_2(tiny_ckpt, tmp_path, capsys, no_load, command, args, message):
    (tmp_path / "dir").mkdir()
    (tmp_path / "short.safetensors").write_bytes(bytes(100))
    (tmp_path / "short.ckpt").write_bytes(b"x" * 100)
    with open(tiny_ckpt, "rb") as f:  # the first 100 bytes of a real checkpoint
        (tmp_path / "cut.safetensors").write_bytes(f.read(100))
    (tmp_path / "afile").write_bytes(b"")
    argv = [command, "--ckpt", tiny_ckpt, "--steps", "1", "--width", "64", "--height", "64",
            "--out", tmp_path / "x.png"]
    if command == "img2img":
        Image.new("RGB", (64, 64)).save(tmp_path / "init.png")
        argv += ["--init", tmp_path / "init.png"]
    code, out, err = _run(capsys, *argv, *[a.format(tmp=tmp_path) for a in args])
    assert code == 2 and out == ""
    assert err == f"sd15: error: {message.format(tmp=tmp_path)}\n"


@pytest.mark.parametrize("argv, message", [
    (["txt2img", "--ckpt", "x", "--emphasis", "Bad"], "sd15 txt2img: error: argument --emphasis: invalid choice: "
     "'Bad' (choose from 'Original', 'No norm', 'Ignore', 'None')"),
    (["txt2img", "--ckpt", "x", "--steps", "abc"], "sd15 txt2img: error: argument --steps: invalid int value: 'abc'"),
    (["txt2img"], "sd15 txt2img: error: the following arguments are required: --ckpt"),
    (["bogus"], "sd15: error: argument {txt2img,img2img,samplers,schedulers,upscalers}: invalid choice: 'bogus' "
     "(choose from 'txt2img', 'img2img', 'samplers', 'schedulers', 'upscalers')")])
def test_argument_errors_are_one_line_exit_2(capsys, argv, message):
    """argparse's own errors (bad choice or type, missing flag, unknown command) are one line too, no usage."""
    with pytest.raises(SystemExit) as e:
        main(argv)
    out, err = capsys.readouterr()
    assert e.value.code == 2 and out == "" and err == message + "\n"


def test_unknown_sampler(tiny_ckpt, tmp_path, capsys, no_load):
    code, _, err = _run(capsys, "txt2img", "--ckpt", tiny_ckpt, "--sampler", "Eulerish", "--out", tmp_path)
    assert code == 2 and err.count("\n") == 1
    assert err.startswith("sd15: error: Unknown sampler 'Eulerish'. Valid samplers: DPM++ 2M, DPM++ SDE, ")


def test_missing_checkpoint_says_where_to_get_it(tmp_path, capsys, monkeypatch, no_load):
    monkeypatch.delenv("SD15_MODEL_URL", raising=False)
    path = tmp_path / "v1-5-pruned-emaonly.safetensors"
    code, _, err = _run(capsys, "txt2img", "--ckpt", path)
    assert code == 2 and err == (
        f"sd15: error: --ckpt {path}: no such file; download https://huggingface.co/stable-diffusion-v1-5/"
        f"stable-diffusion-v1-5/resolve/main/v1-5-pruned-emaonly.safetensors into {tmp_path} "
        f"(or start sd15-server, which fetches it on its first run)\n")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_without_cuda(tiny_ckpt, tmp_path, capsys, no_load):
    code, _, err = _run(capsys, "txt2img", "--ckpt", tiny_ckpt, "--device", "cuda", "--out", tmp_path)
    assert code == 2 and err == (f"sd15: error: --device cuda: this torch build has no CUDA (torch "
                                 f"{torch.__version__}); use --device cpu\n" if torch.version.cuda is None else
                                 f"sd15: error: --device cuda: no CUDA device is visible (torch "
                                 f"{torch.__version__}); use --device cpu\n")


@pytest.mark.skipif(os.geteuid() == 0, reason="root can write anywhere")
def test_unwritable_out_folder(tiny_ckpt, tmp_path, capsys, no_load):
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o500)
    code, _, err = _run(capsys, "txt2img", "--ckpt", tiny_ckpt, "--out", folder / "x.png")
    assert code == 2 and err == f"sd15: error: --out {folder}/x.png: folder {folder} is not writable\n"


def test_help_shows_defaults_and_version(capsys):
    with pytest.raises(SystemExit) as e:
        main(["txt2img", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert e.value.code == 0
    assert "--steps STEPS sampling steps (default: 50)" in out
    assert "--cfg-scale CFG_SCALE classifier-free guidance scale (default: 7.0)" in out
    assert "--out OUT a folder (NNNNN-SEED.png files) or a .png/.jpg/.webp file (default: outputs)" in out
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out == "sd15 0.1.0\n"


def test_list_commands(capsys):
    code, out, _ = _run(capsys, "upscalers")
    assert code == 0 and out.splitlines() == A1111_UPSCALERS
    code, out, _ = _run(capsys, "samplers")
    lines = out.splitlines()
    assert code == 0 and len(lines) == 20 and lines[0] == "DPM++ 2M  (aliases: k_dpmpp_2m)"
    assert "Euler a  (aliases: k_euler_a, k_euler_ancestral)" in lines and "LCM  (aliases: k_lcm)" in lines
    code, out, _ = _run(capsys, "schedulers")
    assert code == 0 and out.splitlines()[:3] == ["Automatic  (automatic)", "Uniform  (uniform)", "Karras  (karras)"]


def test_help_does_not_import_torch():
    proc = subprocess.run([sys.executable, "-X", "importtime", "-m", "sd15", "--help"], capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0 and "txt2img" in proc.stdout
    imported = {line.rsplit("|", 1)[-1].strip() for line in proc.stderr.splitlines() if line.startswith("import time")}
    assert "sd15" in imported and "torch" not in imported and "PIL" not in imported


def test_result_save_writes_the_infotext(tiny_ckpt, tmp_path):
    model = sd15.load(tiny_ckpt)
    result = model.txt2img(prompt="a cat", steps=1, width=64, height=64, seed=11, batch_size=2)
    assert result.save(tmp_path / "cat.png") == [f"{tmp_path}/cat-0.png", f"{tmp_path}/cat-1.png"]
    for i in range(2):
        with Image.open(tmp_path / f"cat-{i}.png") as im:
            assert im.format == "PNG" and im.text["parameters"] == result.infotexts[i]
    folder = tmp_path / "outputs"
    folder.mkdir()
    (folder / "00007-1.png").write_bytes(b"")  # A1111 numbers after the highest number present
    assert result.save(folder) == [f"{folder}/00008-11.png", f"{folder}/00009-12.png"]
    assert result.save(tmp_path / "one.webp")[0].endswith("one-0.webp")
    assert _user_comment(tmp_path / "one-1.webp") == result.infotexts[1]


def test_ctrl_c_saves_what_was_made(tiny_ckpt, tmp_path):
    out = tmp_path / "x.png"
    proc = subprocess.Popen([sys.executable, "-m", "sd15", "txt2img", "--ckpt", tiny_ckpt, "--prompt", "a cat",
                             "--steps", "5000", "--width", "64", "--height", "64", "--seed", "2", "--out", out],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=os.getcwd())
    seen, deadline = b"", time.time() + 120
    while b"2/5000" not in seen and time.time() < deadline:  # two steps done: sampling is under way
        seen += os.read(proc.stderr.fileno(), 256)
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr
    assert stdout.decode().strip() == str(out) and b"sd15: interrupted; saved 1 image(s)" in stderr
    assert b"Traceback" not in stderr
    with Image.open(out) as im:
        assert im.size == (64, 64) and im.text["parameters"].startswith("a cat\nSteps: 5000, ")


def test_schema_help_and_checks_do_not_import_torch(tiny_ckpt, tmp_path):
    """The request schema, `txt2img --help` and every check that fails before the model loads run without
    torch (its import costs 1-2 s); `--version` last, as a control that the script does see imports."""
    script = """if True:
        import json, sys
        import sd15.schema
        from sd15.__main__ import main
        seen = ["torch" in sys.modules]
        for argv in json.loads(sys.argv[1]):
            try:
                main(argv)
            except SystemExit:
                pass
            seen.append("torch" in sys.modules)
        import torch
        seen.append("torch" in sys.modules)
        print(json.dumps(seen))"""
    ckpt = ["--ckpt", tiny_ckpt]
    cases = [["txt2img", "--help"], ["img2img", "--help"], ["txt2img", *ckpt, "--steps", "0"],
             ["txt2img", *ckpt, "--sampler", "Eulerish"],
             ["txt2img", *ckpt, "--hr-upscaler", "x", "--enable-hr"],
             ["txt2img", *ckpt, "--out", str(tmp_path / "x.gif")],
             ["txt2img", "--ckpt", str(tmp_path / "no.ckpt")],
             ["img2img", *ckpt, "--init", str(tmp_path / "none.png")]]
    proc = subprocess.run([sys.executable, "-c", script, json.dumps(cases)], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout.splitlines()[-1]) == [False] * (len(cases) + 1) + [True]
    assert proc.stderr.count("sd15: error:") == len(cases) - 2


def test_module_entry_point_reports_errors_without_traceback(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "sd15", "txt2img", "--ckpt", str(tmp_path), "--prompt", "x"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stderr == f"sd15: error: --ckpt {tmp_path}: is a folder, not a file\n"


def test_progress_total_is_the_steps_that_run():
    from sd15.__main__ import _steps_run
    from sd15.schema import GenerationRequest, resolve

    init = [Image.new("RGB", (64, 64))]
    assert _steps_run(resolve(GenerationRequest(steps=20))) == 20
    # A1111 img2img: int(0.6 * 20) + 1 = 13 steps of the 20-step schedule
    assert _steps_run(resolve(GenerationRequest(steps=20, init_images=init, denoising_strength=0.6))) == 13
    # the hires pass runs exactly its own steps; two batches of both passes
    assert _steps_run(resolve(GenerationRequest(steps=20, enable_hr=True, hr_second_pass_steps=7, n_iter=2))) == 54
    assert _steps_run(resolve(GenerationRequest(steps=20, sampler_name="DPM adaptive"))) is None  # its own count
