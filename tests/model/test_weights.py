"""Tests of the weights cache (`ddcolor.weights`) and `ddcolor weights ...`. None touches the network."""

from __future__ import annotations

import hashlib
import os
import socket
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from ddcolor import weights
from ddcolor.cli import app
from ddcolor.weights import WeightSpec


@pytest.fixture(autouse=True)
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty cache directory, and no network: any socket connect fails the test."""
    directory = tmp_path / "cache"
    monkeypatch.setenv(weights.ENV_VAR, str(directory))

    real_connect = socket.socket.connect

    def loopback_only(sock, address, *args):
        if isinstance(address, tuple) and address[0] in ("127.0.0.1", "::1"):
            return real_connect(sock, address, *args)  # the local test servers below
        raise AssertionError(f"a test tried to use the network: {address}")

    monkeypatch.setattr(socket.socket, "connect", loopback_only)
    for name in ("HF_ENDPOINT", "HF_TOKEN", "HF_HUB_OFFLINE", "HF_HUB_CACHE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    return directory


def make_file(path: Path, content: bytes = b"fake weights\n") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content)
    return path


def leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir()) if directory.exists() else []


# --- registry and cache directory ------------------------------------------------------------------------
def test_default_cache_dir_is_torch_hub_checkpoints(monkeypatch, tmp_path):
    monkeypatch.delenv(weights.ENV_VAR)
    assert weights.cache_dir() == Path(torch.hub.get_dir()) / "checkpoints"
    monkeypatch.setenv(weights.ENV_VAR, str(tmp_path / "elsewhere"))  # read at call time
    assert weights.cache_dir() == tmp_path / "elsewhere"


def test_registry_has_every_external_file():
    expected = {
        "convnext_tiny.fb_in22k",
        "convnext_large.fb_in22k",
        "convnext_atto.d2_in1k",
        "vgg16_bn",
        "alexnet",
        "vgg16",
        "pt_inception",
        "ddcolor_paper_tiny",
        "ddcolor_paper",
        "ddcolor_modelscope",
        "ddcolor_artistic",
    }
    assert expected <= set(weights.REGISTRY)
    filenames = [s.filename for s in weights.REGISTRY.values()]
    assert len(set(filenames)) == len(filenames)
    for spec in weights.REGISTRY.values():
        assert spec.url.startswith("https://")
        if spec.sha256_prefix:  # torchvision / pytorch-fid names carry the hash prefix
            assert spec.filename.endswith(f"-{spec.sha256_prefix}.pth")
    assert weights.get_spec("ddcolor_paper_tiny").variant == "tiny"
    assert {weights.get_spec(n).variant for n in ("ddcolor_paper", "ddcolor_modelscope", "ddcolor_artistic")} == {
        "large"
    }
    assert weights.get_spec("convnext_tiny.fb_in22k").filename == "timm-convnext_tiny.fb_in22k.safetensors"


def test_unknown_name_lists_known_names():
    with pytest.raises(weights.UnknownWeightsError, match=r"Known:.*pt_inception.*ddcolor_paper_tiny"):
        weights.get_spec("ddcolor_huge")
    with pytest.raises(ValueError):
        weights.resolve("ddcolor_huge")


# --- resolve ---------------------------------------------------------------------------------------------
def test_missing_file_error_says_which_command_to_run(cache):
    with pytest.raises(weights.WeightsNotFoundError) as info:
        weights.resolve("ddcolor_paper_tiny")
    msg = str(info.value)
    assert isinstance(info.value, FileNotFoundError)
    assert "ddcolor weights fetch ddcolor_paper_tiny" in msg
    assert "ddcolor weights import FILE --name ddcolor_paper_tiny" in msg
    assert weights.get_spec("ddcolor_paper_tiny").url in msg
    assert str(cache) in msg


def test_missing_backbone_mentions_explicit_random_init():
    with pytest.raises(weights.WeightsNotFoundError, match="pretrained=None"):
        weights.resolve("convnext_atto.d2_in1k")


def test_file_already_in_cache_is_recorded_on_first_resolve(cache):
    """E.g. a file torchvision downloaded into the torch hub cache: trust on first use."""
    path = make_file(cache / "ddcolor_paper.pth")
    assert weights.resolve("ddcolor_paper") == path
    assert (cache / "ddcolor_paper.pth.sha256").read_text().split()[0] == weights.sha256_file(path)


# --- import ----------------------------------------------------------------------------------------------
def test_import_then_resolve_records_hash(tmp_path, cache):
    src = make_file(tmp_path / "downloads" / "ddcolor_paper_tiny.pth")
    dst = weights.import_file(src)  # name inferred from the file name
    assert dst == cache / "ddcolor_paper_tiny.pth"
    assert dst.read_bytes() == src.read_bytes()
    digest = hashlib.sha256(src.read_bytes()).hexdigest()
    assert (cache / "ddcolor_paper_tiny.pth.sha256").read_text() == f"{digest}  ddcolor_paper_tiny.pth\n"
    assert weights.resolve("ddcolor_paper_tiny") == dst
    assert leftovers(cache) == ["ddcolor_paper_tiny.pth", "ddcolor_paper_tiny.pth.sha256"]


def test_tampered_file_is_rejected_naming_the_file(tmp_path, cache):
    dst = weights.import_file(make_file(tmp_path / "x.pth"), name="ddcolor_artistic")
    expected = weights.sha256_file(dst)
    dst.write_bytes(b"tampered")
    with pytest.raises(weights.WeightsIntegrityError) as info:
        weights.resolve("ddcolor_artistic")
    msg = str(info.value)
    assert str(dst) in msg
    assert expected in msg and weights.sha256_file(dst) in msg
    assert "ddcolor weights fetch ddcolor_artistic --force" in msg
    assert weights.resolve("ddcolor_artistic", verify=False) == dst


def test_prefix_mismatch_is_rejected_on_import(tmp_path, cache):
    src = make_file(tmp_path / "vgg16_bn-6c64b313.pth")  # right name, wrong bytes
    with pytest.raises(weights.WeightsIntegrityError, match="expected 6c64b313"):
        weights.import_file(src)
    assert leftovers(cache) == []  # nothing, not even a partial copy


def test_known_hash_and_prefix_are_checked(tmp_path, monkeypatch):
    src = make_file(tmp_path / "tiny-weights.pth")
    digest = weights.sha256_file(src)
    registry = {
        "by_prefix": WeightSpec("by_prefix", "p.pth", "https://example.invalid/p.pth", sha256_prefix=digest[:8]),
        "by_hash": WeightSpec("by_hash", "h.pth", "https://example.invalid/h.pth", sha256=digest),
        "wrong_hash": WeightSpec("wrong_hash", "w.pth", "https://example.invalid/w.pth", sha256="0" * 64),
    }
    monkeypatch.setattr(weights, "REGISTRY", registry)
    assert weights.import_file(src, "by_prefix").name == "p.pth"
    assert weights.resolve("by_prefix").name == "p.pth"
    assert weights.import_file(src, "by_hash").name == "h.pth"
    with pytest.raises(weights.WeightsIntegrityError, match=r"expected 0{64}"):
        weights.import_file(src, "wrong_hash")


def test_import_needs_name_when_ambiguous(tmp_path):
    src = make_file(tmp_path / "model.safetensors")  # what every timm repo calls its file
    with pytest.raises(weights.UnknownWeightsError, match="--name"):
        weights.import_file(src)
    assert weights.import_file(src, name="convnext_atto.d2_in1k").name == "timm-convnext_atto.d2_in1k.safetensors"


def test_import_missing_source_file(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"nope\.pth"):
        weights.import_file(tmp_path / "nope.pth", name="ddcolor_paper")


# --- fetch -----------------------------------------------------------------------------------------------
def test_fetch_from_file_url_with_default_downloader(tmp_path, cache):
    src = make_file(tmp_path / "mirror" / "ddcolor_modelscope.pth", b"x" * 3_000_000)
    path = weights.fetch("ddcolor_modelscope", url=src.as_uri())
    assert path == cache / "ddcolor_modelscope.pth"
    assert path.read_bytes() == src.read_bytes()
    assert weights.resolve("ddcolor_modelscope") == path
    assert leftovers(cache) == ["ddcolor_modelscope.pth", "ddcolor_modelscope.pth.sha256"]


def test_fetch_failure_leaves_no_partial_file(cache):
    def broken(url: str, dst: Path) -> None:
        dst.write_bytes(b"half a file")
        raise OSError("connection reset")

    with pytest.raises(OSError, match="connection reset"):
        weights.fetch("ddcolor_paper", download_fn=broken)
    assert leftovers(cache) == []
    with pytest.raises(weights.WeightsNotFoundError):
        weights.resolve("ddcolor_paper")


def test_fetch_with_bad_hash_leaves_nothing(cache):
    seen = []

    def fake(url: str, dst: Path) -> None:
        seen.append(url)
        dst.write_bytes(b"not vgg")

    with pytest.raises(weights.WeightsIntegrityError, match="Nothing was written"):
        weights.fetch("vgg16_bn", download_fn=fake)
    assert seen == ["https://download.pytorch.org/models/vgg16_bn-6c64b313.pth"]
    assert leftovers(cache) == []


def test_fetch_skips_cached_file_unless_forced(tmp_path, cache):
    weights.import_file(make_file(tmp_path / "ddcolor_paper.pth", b"old"))

    def must_not_run(url: str, dst: Path) -> None:
        raise AssertionError("downloaded although cached")

    assert weights.fetch("ddcolor_paper", download_fn=must_not_run).read_bytes() == b"old"
    path = weights.fetch("ddcolor_paper", force=True, download_fn=lambda url, dst: dst.write_bytes(b"new"))
    assert path.read_bytes() == b"new"
    assert weights.resolve("ddcolor_paper") == path  # the new hash was recorded


# --- status and loading ----------------------------------------------------------------------------------
def test_status_reports_present_missing_and_verified(tmp_path, cache):
    weights.import_file(make_file(tmp_path / "ddcolor_paper_tiny.pth"))
    rows = {r.name: r for r in weights.status()}
    assert set(rows) == set(weights.REGISTRY)
    assert rows["ddcolor_paper_tiny"].present and rows["ddcolor_paper_tiny"].size_bytes == 13
    assert rows["ddcolor_paper_tiny"].verified is None
    assert not rows["ddcolor_paper"].present and rows["ddcolor_paper"].size_bytes is None
    (cache / "ddcolor_paper_tiny.pth").write_bytes(b"tampered")
    rows = {r.name: r for r in weights.status(verify=True)}
    assert rows["ddcolor_paper_tiny"].verified is False
    assert rows["ddcolor_paper"].verified is None


def test_load_state_dict_pth_and_safetensors(tmp_path):
    from safetensors.torch import save_file

    torch.save({"params": {"w": torch.ones(2)}}, tmp_path / "ddcolor_paper_tiny.pth")
    weights.import_file(tmp_path / "ddcolor_paper_tiny.pth")
    assert torch.equal(weights.load_state_dict("ddcolor_paper_tiny")["params"]["w"], torch.ones(2))
    save_file({"w": torch.zeros(3)}, tmp_path / "model.safetensors")
    weights.import_file(tmp_path / "model.safetensors", name="convnext_tiny.fb_in22k")
    assert torch.equal(weights.load_state_dict("convnext_tiny.fb_in22k")["w"], torch.zeros(3))


def test_resolved_timm_file_loads_through_pretrained_cfg_overlay(tmp_path):
    """The way model code builds a backbone from the cache, offline."""
    timm = pytest.importorskip("timm")
    from safetensors.torch import save_file

    reference = timm.create_model("convnext_atto.d2_in1k", pretrained=False)
    save_file(reference.state_dict(), tmp_path / "model.safetensors")
    weights.import_file(tmp_path / "model.safetensors", name="convnext_atto.d2_in1k")
    path = weights.resolve("convnext_atto.d2_in1k")
    model = timm.create_model("convnext_atto.d2_in1k", pretrained=True, pretrained_cfg_overlay={"file": str(path)})
    assert torch.equal(model.stem[0].weight, reference.stem[0].weight)


# --- CLI -------------------------------------------------------------------------------------------------
runner = CliRunner()


def cli_state(output: str, name: str) -> str:
    """The STATE column of `weights list` for ``name``."""
    return next(ln.split()[2] for ln in output.splitlines() if ln.split()[:1] == [name])


def test_cli_list_shows_missing_then_present(tmp_path, cache):
    result = runner.invoke(app, ["weights", "list"])
    assert result.exit_code == 0, result.output
    assert str(cache) in result.output
    assert cli_state(result.output, "ddcolor_paper_tiny") == "missing"

    src = make_file(tmp_path / "ddcolor_paper_tiny.pth")
    result = runner.invoke(app, ["weights", "import", str(src)])
    assert result.exit_code == 0, result.output
    assert "imported" in result.output and (cache / "ddcolor_paper_tiny.pth").is_file()

    result = runner.invoke(app, ["weights", "list", "--verify"])
    assert result.exit_code == 0, result.output
    assert cli_state(result.output, "ddcolor_paper_tiny") == "ok"
    assert cli_state(result.output, "ddcolor_paper") == "missing"


def test_cli_import_with_name(tmp_path, cache):
    src = make_file(tmp_path / "model.safetensors")
    result = runner.invoke(app, ["weights", "import", str(src), "--name", "convnext_large.fb_in22k"])
    assert result.exit_code == 0, result.output
    assert (cache / "timm-convnext_large.fb_in22k.safetensors").is_file()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["weights", "import", "/nonexistent/ddcolor_paper.pth"], "No such file"),
        (["weights", "import", "__FILE__"], "--name"),
        (["weights", "fetch", "ddcolor_huge"], "Unknown weights"),
    ],
)
def test_cli_errors_exit_1_with_message(tmp_path, args, message):
    src = make_file(tmp_path / "random.bin")
    result = runner.invoke(app, [str(src) if a == "__FILE__" else a for a in args])
    assert result.exit_code == 1
    assert message in result.output
    assert "Traceback" not in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)


def test_cli_import_rejects_bad_hash(tmp_path):
    src = make_file(tmp_path / "alexnet-owt-7be5be79.pth")
    result = runner.invoke(app, ["weights", "import", str(src)])
    assert result.exit_code == 1
    assert "expected 7be5be79" in result.output


# --- downloads from a local server: the Hub protocol (hf_hub_download) and plain URLs (torch.hub) -----------
COMMIT = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture
def local_server():
    """A 127.0.0.1 HTTP server: ``files`` maps a path to bytes; ``etags`` optionally overrides a Hub file's LFS
    sha256 (a lying or corrupted mirror); ``seen`` records (method, path, Authorization)."""
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    files: dict[str, bytes] = {}
    etags: dict[str, str] = {}
    seen: list[tuple[str, str, str | None]] = []

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def _answer(self, body: bool) -> None:
            seen.append((self.command, self.path, self.headers.get("Authorization")))
            data = files.get(self.path.split("?")[0])
            if data is None:
                self.send_response(404)
                self.send_header("X-Error-Code", "EntryNotFound")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            sha = etags.get(self.path, hashlib.sha256(data).hexdigest())
            self.send_response(200)
            self.send_header("Content-Length", str(len(data)))
            if "/resolve/" in self.path:  # what the Hub answers for an LFS file
                self.send_header("X-Repo-Commit", COMMIT)
                self.send_header("ETag", f'"{sha}"')
                self.send_header("X-Linked-Etag", f'"{sha}"')
                self.send_header("X-Linked-Size", str(len(data)))
            self.end_headers()
            if body:
                self.wfile.write(data)

        def do_HEAD(self):
            self._answer(False)

        def do_GET(self):
            self._answer(True)

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", files, etags, seen
    finally:
        server.shutdown()
        server.server_close()


def test_hub_download_through_hf_endpoint_with_token_and_lfs_sha256(local_server, cache, monkeypatch):
    base, files, _, seen = local_server
    content = b"timm weights " * 1000
    files[f"/timm/convnext_atto.d2_in1k/resolve/{weights.HUB_REVISION}/model.safetensors"] = content
    monkeypatch.setenv("HF_ENDPOINT", base)
    monkeypatch.setenv("HF_TOKEN", "hf_test_token")
    path = weights.fetch("convnext_atto.d2_in1k")
    assert path == cache / "timm-convnext_atto.d2_in1k.safetensors" and path.read_bytes() == content
    digest = hashlib.sha256(content).hexdigest()
    assert (cache / "timm-convnext_atto.d2_in1k.safetensors.sha256").read_text().split()[0] == digest
    files_asked = [(method, p, auth) for method, p, auth in seen if "/resolve/" in p]  # not the client's /api calls
    route = f"/timm/convnext_atto.d2_in1k/resolve/{weights.HUB_REVISION}/model.safetensors"
    assert [(m, p) for m, p, _ in files_asked] == [("HEAD", route), ("GET", route)]
    assert all(auth == "Bearer hf_test_token" for _, _, auth in files_asked)
    assert weights.resolve("convnext_atto.d2_in1k") == path

    # offline: the Hugging Face cache answers, the server is not asked
    seen.clear()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert weights.fetch("convnext_atto.d2_in1k", force=True).read_bytes() == content
    assert [p for _, p, _ in seen if "/resolve/" in p] == []
    with pytest.raises(OSError, match=r"offline mode.*weights import FILE --name convnext_tiny"):
        weights.fetch("convnext_tiny.fb_in22k")
    assert sorted(leftovers(cache)) == [
        "timm-convnext_atto.d2_in1k.safetensors",
        "timm-convnext_atto.d2_in1k.safetensors.sha256",
    ]


def test_hub_download_failing_the_lfs_sha256_leaves_nothing(local_server, cache, monkeypatch):
    base, files, etags, _ = local_server
    route = f"/piddnad/DDColor-models/resolve/{weights.HUB_REVISION}/ddcolor_paper_tiny.pth"
    files[route] = b"tampered bytes"
    etags[route] = "ab" * 32  # what the Hub says the file is
    monkeypatch.setenv("HF_ENDPOINT", base)
    with pytest.raises(
        weights.WeightsIntegrityError, match=r"expected (ab){32} \(sha256 from the Hub's LFS metadata\)"
    ):
        weights.fetch("ddcolor_paper_tiny")
    assert leftovers(cache) == []
    hub_cache = Path(os.environ["HF_HOME"]) / "hub"
    assert [p for p in hub_cache.rglob("*") if p.name in ("ab" * 32, "ddcolor_paper_tiny.pth")] == []  # bad blob gone


def test_hub_missing_file_is_an_error_naming_the_repo(local_server, cache, monkeypatch):
    base, _, _, _ = local_server
    monkeypatch.setenv("HF_ENDPOINT", base)
    with pytest.raises(OSError, match="piddnad/DDColor-models"):
        weights.fetch("ddcolor_artistic")
    assert leftovers(cache) == []


def test_plain_url_download_checks_the_hash_prefix(local_server, tmp_path, cache, monkeypatch):
    base, files, _, seen = local_server
    content = b"torchvision-like weights"
    prefix = hashlib.sha256(content).hexdigest()[:8]
    files["/models/w.pth"] = content
    registry = {
        "good": WeightSpec("good", f"w-{prefix}.pth", f"{base}/models/w.pth", sha256_prefix=prefix),
        "bad": WeightSpec("bad", "w-00000000.pth", f"{base}/models/w.pth", sha256_prefix="00000000"),
    }
    monkeypatch.setattr(weights, "REGISTRY", registry)
    path = weights.fetch("good")
    assert path.read_bytes() == content and ("GET", "/models/w.pth", None) in seen
    with pytest.raises(weights.WeightsIntegrityError, match="00000000"):
        weights.fetch("bad")
    assert leftovers(cache) == [f"w-{prefix}.pth", f"w-{prefix}.pth.sha256"]
