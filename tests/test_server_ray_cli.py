"""`sd15-server --ray` without Ray installed: one line naming the extra, exit code 2 (runs with or without Ray:
Ray's absence is simulated)."""
import sys

import server
from server.__main__ import main
from test_server import write_model_folders


def test_ray_flag_without_ray_is_one_line_and_exit_2(tmp_path, monkeypatch, capsys):
    folders = write_model_folders(tmp_path)
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` raises ImportError
    monkeypatch.delitem(sys.modules, "server.ray_serve", raising=False)  # imported by an earlier test
    monkeypatch.delattr(server, "ray_serve", raising=False)
    assert main(["--ray", "--replicas", "2", "--ckpt-dir", folders["ckpt_dir"], "--no-download"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("sd15-server: error: --ray needs Ray Serve")
    assert err[0].endswith('pip install "sd15[ray]"')


def test_ray_flag_checks_replicas(tmp_path, capsys):
    folders = write_model_folders(tmp_path)
    assert main(["--ray", "--replicas", "0", "--ckpt-dir", folders["ckpt_dir"], "--no-download"]) == 2
    assert capsys.readouterr().err.strip() == "sd15-server: error: --replicas must be at least 1"
