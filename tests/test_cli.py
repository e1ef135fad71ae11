"""The `sd15` command: PNGs with A1111's `parameters` chunk, and one-line errors instead of tracebacks."""
import subprocess
import sys

import pytest
from PIL import Image

from sd15.__main__ import main


def _run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_txt2img_writes_png_with_parameters(tiny_ckpt, tmp_path, capsys):
    out = tmp_path / "cat.png"
    code, stdout, _ = _run(capsys, "txt2img", "--ckpt", tiny_ckpt, "--prompt", "a cat", "--steps", "3", "--width", "64",
                           "--height", "64", "--seed", "7", "--sampler", "Euler a", "--out", str(out))
    assert code == 0 and stdout.strip() == str(out)
    with Image.open(out) as im:
        assert im.size == (64, 64)
        assert im.text["parameters"].startswith("a cat\nSteps: 3, Sampler: Euler a, Schedule type: Automatic, "
                                                "CFG scale: 7.0, Seed: 7, Size: 64x64")


def test_batch_into_folder_and_img2img(tiny_ckpt, tmp_path, capsys):
    folder = tmp_path / "out"
    code, stdout, _ = _run(capsys, "txt2img", "--ckpt", tiny_ckpt, "--steps", "2", "--width", "64", "--height", "64",
                           "--seed", "3", "--batch-size", "2", "--out", str(folder))
    paths = stdout.split()
    assert code == 0 and len(paths) == 2 and paths[0].endswith("-3.png") and paths[1].endswith("-4.png")
    code, stdout, _ = _run(capsys, "img2img", "--ckpt", tiny_ckpt, "--init", paths[0], "--denoising-strength", "0.5",
                           "--steps", "4", "--width", "64", "--height", "64", "--seed", "1",
                           "--out", str(tmp_path / "i2i.png"))
    assert code == 0
    with Image.open(stdout.strip()) as im:
        assert "Denoising strength: 0.5" in im.text["parameters"]


@pytest.mark.parametrize("args, message", [
    (["--ckpt", "/nonexistent/model.safetensors"], "no such file"),
    (["--sampler", "Eulerish"], "unknown sampler"),
    (["--width", "0"], "width: ensure this value is greater than or equal to 8"),
    (["--steps", "0"], "steps: ensure this value is greater than or equal to 1"),
])
def test_one_line_errors(tiny_ckpt, tmp_path, capsys, args, message):
    argv = ["txt2img", "--ckpt", tiny_ckpt, "--steps", "1", "--width", "64", "--height", "64",
            "--out", str(tmp_path / "x.png")]
    for i in range(0, len(args), 2):  # later flags override earlier ones
        argv += args[i:i + 2]
    code, _, err = _run(capsys, *argv)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("sd15: error:") and message in lines[0].lower()


def test_module_entry_point_reports_errors_without_traceback(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "sd15", "txt2img", "--ckpt", str(tmp_path / "missing.ckpt"),
                           "--prompt", "x"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr and proc.stderr.count("\n") == 1
