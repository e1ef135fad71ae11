"""server/ui.py through Starlette's TestClient: the page and its assets, the token counter, history."""
from __future__ import annotations

import os
import time

import pytest
from PIL import Image, PngImagePlugin
from starlette.testclient import TestClient

from server.app import create_app
from test_server import make_config, write_model_folders


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("ui")
    folders = write_model_folders(root)
    outdir = root / "outputs"
    config = make_config(folders, outdir=str(outdir), api_auth=[("u", "p")])
    with TestClient(create_app(config)) as c:
        c.auth = ("u", "p")
        yield c, outdir


def tokens(client, prompt, **kw):
    r = client.post("/sd15/v1/tokens", json={"prompt": prompt, **kw})
    assert r.status_code == 200, r.text
    return r.json()


def test_page_and_assets(env):
    client, _ = env
    r = client.get("/")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    assert '<script type="module" src="/static/app.js">' in r.text
    assert r.headers["cache-control"] == "no-cache"
    again = client.get("/", headers={"If-None-Match": r.headers["etag"]})
    assert again.status_code == 304
    js = client.get("/static/app.js")
    assert js.status_code == 200 and js.headers["content-type"].startswith("text/javascript")
    assert client.get("/static/../app.py").status_code == 404
    assert client.get("/static/%2e%2e/app.py").status_code == 404
    assert client.get("/static/nope.js").status_code == 404


def test_page_needs_auth(env):
    client, _ = env
    r = client.get("/", auth=None)
    assert r.status_code == 401 and r.json()["detail"] == "Not authenticated"
    assert client.get("/static/app.js", auth=None).status_code == 401


STATIC = os.path.join(os.path.dirname(os.path.dirname(__file__)), "server", "static")


def test_static_budget():
    """The page's own code stays small: all assets under 300 KB, JS + CSS + HTML under 2,000 lines."""
    files = [os.path.join(d, f) for d, _, fs in os.walk(STATIC) for f in fs]
    assert sum(os.path.getsize(f) for f in files) < 300_000
    code = [f for f in files if f.endswith((".js", ".css", ".html"))]
    assert sum(len(open(f, encoding="utf-8").read().splitlines()) for f in code) < 2000


def test_xyz_axes_of_the_page_are_the_scripts_axes(env):
    """Every axis the page offers is one the server's X/Y/Z script runs (its index comes from script-info)."""
    import re

    from server.scripts import xyz

    client, _ = env
    text = open(os.path.join(STATIC, "xyz.js"), encoding="utf-8").read()
    labels = re.findall(r"'([^']+)'", text[text.index("const LABELS"):text.index("];", text.index("const LABELS"))])
    assert labels[0] == "Nothing" and {"Seed", "Steps", "CFG Scale", "Sampler", "Schedule type", "Prompt S/R",
                                       "Checkpoint name"} <= set(labels)
    assert set(labels) <= set(xyz.supported_labels("txt2img"))
    info = {s["is_img2img"]: s["args"][0]["choices"] for s in client.get("/sdapi/v1/script-info").json()
            if s["name"] == "x/y/z plot"}
    assert info[False] == [a.label for a in xyz.axes_for("txt2img")]
    assert info[True] == [a.label for a in xyz.axes_for("img2img")]


def test_token_counts(env):
    client, _ = env
    # "a photo of a cat" is 5 CLIP tokens; every "cat" is one token
    assert tokens(client, "a photo of a cat") == {"tokens": 5, "chunks": 1, "limit": 75}
    assert tokens(client, "") == {"tokens": 0, "chunks": 1, "limit": 75}
    assert tokens(client, "cat " * 80) == {"tokens": 80, "chunks": 2, "limit": 150}
    # <lora:…> tags are not counted; BREAK closes a chunk of 75
    assert tokens(client, "a photo <lora:style:0.8> of a cat")["tokens"] == 5
    assert tokens(client, "cat BREAK cat") == {"tokens": 76, "chunks": 2, "limit": 150}
    # prompt editing: the longest text of the schedule; AND: the longest part (positive prompts only)
    assert tokens(client, "[cat:cat cat cat cat:5]", steps=20)["tokens"] == 4
    assert tokens(client, "cat AND cat cat")["tokens"] == 2
    assert tokens(client, "cat AND cat cat", negative=True)["tokens"] == 4  # "and" is a token there
    # embeddings count their vectors: neg has 2, old has 3
    assert tokens(client, "neg")["tokens"] == 2
    assert tokens(client, "a old")["tokens"] == 4


def test_token_count_errors(env):
    client, _ = env
    r = client.post("/sd15/v1/tokens", json={"prompt": 5})
    assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", "prompt"]
    assert client.post("/sd15/v1/tokens", json={"prompt": "a", "steps": 0}).status_code == 422
    assert client.post("/sd15/v1/tokens", content=b"[1]").status_code == 422


def save_png(path, text, size=(64, 32)):
    path.parent.mkdir(parents=True, exist_ok=True)
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", text)
    Image.new("RGB", size, (1, 2, 3)).save(path, pnginfo=info)


def test_history(env):
    client, outdir = env
    assert client.get("/sd15/v1/history").json() == {"total": 0, "items": []}
    first = outdir / "txt2img-images" / "2026-11-30" / "00000-1.png"
    second = outdir / "img2img-images" / "2026-11-30" / "00000-2.png"
    save_png(first, "a cat\nSteps: 2, Sampler: Euler, Seed: 1")
    save_png(second, "a dog\nSteps: 3, Sampler: Euler a, Seed: 2", size=(32, 48))
    now = time.time()
    os.utime(first, (now - 10, now - 10))
    (outdir / "notes.txt").write_text("not an image")
    body = client.get("/sd15/v1/history").json()
    assert body["total"] == 2
    newest = body["items"][0]
    assert newest["path"] == "img2img-images/2026-11-30/00000-2.png"
    assert newest["url"] == "/sd15/v1/history/file/img2img-images/2026-11-30/00000-2.png"
    assert (newest["width"], newest["height"]) == (32, 48)
    assert newest["infotext"] == "a dog\nSteps: 3, Sampler: Euler a, Seed: 2"
    assert body["items"][1]["path"] == "txt2img-images/2026-11-30/00000-1.png"
    page2 = client.get("/sd15/v1/history?offset=1&limit=1").json()
    assert page2["total"] == 2 and [i["path"] for i in page2["items"]] == [body["items"][1]["path"]]
    r = client.get(newest["url"])
    assert r.status_code == 200 and r.headers["content-type"] == "image/png" and r.content == second.read_bytes()
    assert client.get("/sd15/v1/history/file/../../models/v1-5-pruned-emaonly.safetensors").status_code == 404
    assert client.get("/sd15/v1/history/file/notes.txt").status_code == 404
    r = client.get("/sd15/v1/history?limit=0")
    assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["query", "limit"]


def test_openapi_lists_page_endpoints(env):
    client, _ = env
    paths = client.get("/openapi.json").json()["paths"]
    assert "/sd15/v1/tokens" in paths and "/sd15/v1/history" in paths
    assert "/" not in paths
