"""The playground's web app: a FastAPI application serving one static page and a small JSON API.

Endpoints (JSON errors are always ``{"error": "sentence"}``, plus ``"errors": [{"file", "reason"}]`` for bad files):

    GET  /                      the page (static/index.html; app.js and app.css under /static/)
    GET  /api/health            ``{"status": "ok"}``; the only endpoint that needs no token
    GET  /api/models            the catalogue (`ddcolor.ui.models.catalogue`) plus limits, input sizes and samples
    GET  /api/samples/{name}    a bundled sample photo (`ddcolor.demo.SAMPLES`) as a grayscale PNG
    POST /api/colorize-video    multipart: ``file`` (one short video), ``model``, ``input_size`` -> per-frame and
                                stabilised MP4 data URLs side by side (`ddcolor.video`; capped size and duration)
    POST /api/colorize          multipart: ``files`` (one or more images), ``model`` (a spec), ``input_size`` (px)
                                -> ``{"model", "input_size", "results": [{"name", "width", "height", "input",
                                "output", "download", ...}], "errors": [...], "seconds"}`` with PNG data URLs

A colorize request reads each upload like `ddcolor colorize` reads a file (`ddcolor.imageio.read_image`: EXIF
orientation, ICC -> sRGB, 16-bit, alpha, the same pixel limit and the same reasons for refusing a file), colorizes
them with the cached model's `Colorizer.colorize_float` and writes PNGs with `ddcolor.imageio.write_image`. Files
that cannot be used are listed in ``errors`` while the others are colorized (as the CLI skips bad files); a request
with no usable file is refused: 413 when every file was too large, else 422.

Limits: each file at most ``max_upload_bytes`` (default 20 MB) and at most ``max_files`` per request; the whole body
is refused with 413 past ``max_files x max_upload_bytes + 1 MiB`` before it is read (Content-Length) or while it is
read (chunked uploads).

Concurrency: loading and inference run in worker threads (`starlette.concurrency.run_in_threadpool`), so the event
loop keeps answering (the page, the catalogue, other models) while a model works; each cached model has a lock, so
requests for one model run one at a time.

Auth: with a token (``--auth-token`` / ``DDCOLOR_UI_TOKEN``) every request but /api/health needs either
``Authorization: Bearer TOKEN`` or HTTP basic auth with the token as password (any user name; browsers ask for it).
"""

from __future__ import annotations

import base64
import binascii
import functools
import hmac
import io
import logging
import re
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ddcolor.ui.models import ModelCache, ModelSpecError, catalogue, find_checkpoints

if TYPE_CHECKING:
    from collections.abc import Callable, Sequence

    from ddcolor.config import Config
    from ddcolor.imageio import LoadedImage

__all__ = ["STATIC_DIR", "UiSettings", "create_app"]

log = logging.getLogger(__name__)

STATIC_DIR = Path(__file__).with_name("static")
MB = 1_000_000  # bytes; upload limits are in decimal megabytes, as file browsers show sizes
MAX_INPUT_SIZE = 2048  # px, the largest network input a request may ask for
PUBLIC_PATHS = ("/api/health",)


@dataclass(frozen=True)
class UiSettings:
    """Limits and choices of one playground instance.

    Attributes:
        max_upload_bytes: largest accepted file, bytes.
        max_files: most files per colorize request.
        input_sizes: network input sizes the page offers, px (multiples of 32); the API takes any multiple of 32 up
            to `MAX_INPUT_SIZE`.
        default_input_size: preselected size, px.
        max_pixels: decompression-bomb guard per image (width x height); None = no limit.
        auth_token: the token every request must carry; None = no auth.
        max_video_seconds: longest video /api/colorize-video accepts (it also obeys ``max_upload_bytes``).
    """

    max_upload_bytes: int = 20 * MB
    max_files: int = 16
    input_sizes: tuple[int, ...] = (256, 512, 768, 1024)
    default_input_size: int = 512
    max_pixels: int | None = None
    auth_token: str | None = None
    max_video_seconds: float = 10.0

    @property
    def max_body_bytes(self) -> int:
        """Largest request body: every file at its limit plus 1 MiB of form fields and multipart framing."""
        return self.max_files * self.max_upload_bytes + 2**20


def _error(status: int, message: str, **extra: Any) -> JSONResponse:
    return JSONResponse({"error": message, **extra}, status_code=status)


def _megabytes(n_bytes: int) -> str:
    return f"{n_bytes / MB:.1f} MB"


# --- middleware ------------------------------------------------------------------------------------------
class BodyLimitMiddleware:
    """Refuse request bodies over ``max_bytes`` with 413: by Content-Length up front, else while streaming.

    Args:
        app: the ASGI app to wrap.
        max_bytes: largest body, bytes.
        hint: what to tell the user (e.g. the per-file limit).
    """

    def __init__(self, app: ASGIApp, max_bytes: int, hint: str = "") -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.hint = hint

    def _message(self, size: str) -> str:
        return f"request too large ({size}; the limit is {_megabytes(self.max_bytes)} per request). {self.hint}"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_bytes:
            await _error(413, self._message(_megabytes(int(length))))(scope, receive, send)
            return
        seen = 0

        async def limited_receive() -> Message:
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.max_bytes:
                raise HTTPException(413, self._message(f"over {_megabytes(self.max_bytes)}"))
            return message

        await self.app(scope, limited_receive, send)


def _authorized(header: str, token: str) -> bool:
    """Whether an Authorization header carries `token` (``Bearer TOKEN`` or basic auth with TOKEN as password)."""
    scheme, _, value = header.partition(" ")
    if scheme.lower() == "bearer":
        return hmac.compare_digest(value.strip().encode(), token.encode())
    if scheme.lower() == "basic":
        try:
            _, _, password = base64.b64decode(value.strip(), validate=True).decode().partition(":")
        except (binascii.Error, UnicodeDecodeError):
            return False
        return hmac.compare_digest(password.encode(), token.encode())
    return False


# --- uploads ---------------------------------------------------------------------------------------------
@dataclass
class _Upload:
    index: int  # position among the request's files
    name: str
    image: LoadedImage


def _safe_stem(name: str) -> str:
    stem = Path(name).stem or "image"
    return re.sub(r"[^A-Za-z0-9._-]+", "_", stem)[:80]


def _decode(name: str, data: bytes, max_pixels: int | None) -> LoadedImage:
    """Decode uploaded bytes exactly as `ddcolor colorize` decodes a file (through a temporary file).

    Raises:
        ImageReadError: the reason names what is wrong; its path is the temporary file, so report ``name``.
    """
    from ddcolor.imageio import read_image

    with tempfile.TemporaryDirectory(prefix="ddcolor-ui-") as tmp:
        path = Path(tmp) / f"upload{Path(name).suffix.lower()[:10]}"
        path.write_bytes(data)
        return read_image(path, max_pixels=max_pixels)


def _png_data_url(rgb, alpha=None, bit_depth: int = 8, exif: bytes | None = None) -> str:
    """float32 (H, W, 3) sRGB in [0, 1] (+ alpha) -> ``data:image/png;base64,...`` via `write_image`."""
    from ddcolor.imageio import write_image

    with tempfile.TemporaryDirectory(prefix="ddcolor-ui-") as tmp:
        path = write_image(Path(tmp) / "out.png", rgb, alpha, bit_depth, "PNG", exif)
        return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode("ascii")


def _parse_input_size(raw: Any, default: int) -> int:
    from ddcolor.model import INPUT_MULTIPLE

    if raw is None or raw == "":
        return default
    try:
        size = int(str(raw))
    except ValueError:
        size = -1
    if size < INPUT_MULTIPLE or size > MAX_INPUT_SIZE or size % INPUT_MULTIPLE:
        raise HTTPException(
            400, f"input_size must be a multiple of {INPUT_MULTIPLE} between {INPUT_MULTIPLE} and {MAX_INPUT_SIZE}"
        )
    return size


# --- the app ---------------------------------------------------------------------------------------------
def create_app(
    config: Config | None = None,
    *,
    tracking_uri: str | None = None,
    checkpoints: Sequence[str | Path] = (),
    allow_any_path: bool = True,
    device: str = "auto",
    precision: str = "auto",
    cache_size: int = 3,
    settings: UiSettings | None = None,
    loader: Callable[..., Any] | None = None,
) -> FastAPI:
    """Build the playground app (serve it with uvicorn; `ddcolor ui` does).

    Args:
        config: registry names (``registry.model_name``, aliases); None = the built-in defaults.
        tracking_uri: MLflow tracking URI of the registry; None = ``MLFLOW_TRACKING_URI`` (default sqlite:///mlflow.db).
        checkpoints: checkpoint files, or folders searched for them, offered in the model list.
        allow_any_path: also load checkpoint paths typed into the page (a path names a file on the server: keep it
            off when the app is reachable from other machines).
        device: "auto", "cpu", "cuda", "cuda:N" or "mps".
        precision: network precision, "auto" (bf16 where the device has native bf16, else fp32), "fp32", "bf16"
            or "fp16".
        cache_size: loaded (model, input size) pairs kept in memory.
        settings: limits, offered input sizes and the auth token; None = `UiSettings()` with the pixel limit of
            ``config.data.max_image_pixels``.
        loader: ``loader(ResolvedModel) -> DDColor`` replacing `ModelCache.load_network` (tests).

    Raises:
        FileNotFoundError: a checkpoint path that does not exist.
    """
    from ddcolor.config import EnvSettings, load_config

    config = config or load_config(None)
    tracking_uri = tracking_uri or EnvSettings.from_env().mlflow_tracking_uri
    settings = settings or UiSettings(max_pixels=config.data.max_image_pixels)
    cache = ModelCache(
        config,
        tracking_uri,
        checkpoints=find_checkpoints(checkpoints),
        allow_any_path=allow_any_path,
        device=device,
        precision=precision,
        max_entries=cache_size,
        loader=loader,
    )

    app = FastAPI(title="DDColor playground", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.cache = cache
    app.state.settings = settings
    _install_error_handlers(app)
    if settings.auth_token:
        _install_auth(app, settings.auth_token)
    per_file = f"Each file may be at most {_megabytes(settings.max_upload_bytes)}, {settings.max_files} files at once."
    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.max_body_bytes, hint=per_file)
    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")

    @functools.cache
    def samples() -> dict[str, bytes]:
        """Bundled sample photos that load offline, as grayscale PNG bytes (computed once)."""
        from PIL import Image

        from ddcolor.demo import sample_images, to_gray

        out = {}
        for name, rgb in sample_images().items():
            buffer = io.BytesIO()
            Image.fromarray(to_gray(rgb)).save(buffer, format="PNG")
            out[name] = buffer.getvalue()
        return out

    @app.get("/", include_in_schema=False)
    async def index() -> FileResponse:
        return FileResponse(STATIC_DIR / "index.html", headers={"Cache-Control": "no-cache"})

    @app.get("/api/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/api/models")
    async def models() -> dict[str, Any]:
        listing = await run_in_threadpool(catalogue, cache)
        names = await run_in_threadpool(samples)
        return listing | {
            "input_sizes": list(settings.input_sizes),
            "default_input_size": settings.default_input_size,
            "max_upload_bytes": settings.max_upload_bytes,
            "max_files": settings.max_files,
            "samples": list(names),
            "loaded": [{"key": key, "input_size": size} for key, size in cache.loaded()],
        }

    @app.get("/api/samples/{name}")
    async def sample(name: str) -> Response:
        found = await run_in_threadpool(samples)
        stem = name.removesuffix(".png")
        if stem not in found:
            return _error(404, f"no sample {name!r}; bundled samples: {', '.join(found) or 'none load offline'}")
        return Response(found[stem], media_type="image/png")

    @app.post("/api/colorize")
    async def colorize(request: Request) -> JSONResponse:
        return await _colorize(request, cache, settings)

    @app.post("/api/colorize-video")
    async def colorize_video(request: Request) -> JSONResponse:
        return await _colorize_video(request, cache, settings)

    return app


def _install_error_handlers(app: FastAPI) -> None:
    """Every error reaches the page as ``{"error": sentence}``; stack traces go to the server log only."""
    from ddcolor.model import CheckpointError
    from ddcolor.weights import WeightsError

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, err: HTTPException) -> JSONResponse:
        return _error(err.status_code, str(err.detail))

    @app.exception_handler(ModelSpecError)
    async def spec_error(request: Request, err: ModelSpecError) -> JSONResponse:
        return _error(err.status, str(err))

    @app.exception_handler(WeightsError)
    async def weights_error(request: Request, err: WeightsError) -> JSONResponse:
        return _error(404, str(err).strip("'\""))

    @app.exception_handler(CheckpointError)
    async def checkpoint_error(request: Request, err: CheckpointError) -> JSONResponse:
        return _error(422, f"cannot load the model: {err}")

    @app.exception_handler(FileNotFoundError)
    async def not_found(request: Request, err: FileNotFoundError) -> JSONResponse:
        return _error(404, str(err).strip("'\""))

    @app.exception_handler(Exception)
    async def unexpected(request: Request, err: Exception) -> JSONResponse:
        log.exception("unexpected error in %s %s", request.method, request.url.path)
        return _error(500, f"internal error ({type(err).__name__}: {err}); the server log has the details")


def _install_auth(app: FastAPI, token: str) -> None:
    @app.middleware("http")
    async def require_token(request: Request, call_next):
        if request.url.path in PUBLIC_PATHS or _authorized(request.headers.get("authorization", ""), token):
            return await call_next(request)
        return JSONResponse(
            {"error": "authentication required: send the token as HTTP basic-auth password or 'Bearer TOKEN'"},
            status_code=401,
            headers={"WWW-Authenticate": 'Basic realm="ddcolor ui", charset="UTF-8"'},
        )


async def _colorize(request: Request, cache: ModelCache, settings: UiSettings) -> JSONResponse:
    """POST /api/colorize (see the module docstring)."""
    from starlette.formparsers import MultiPartException

    start = time.perf_counter()
    try:
        form = await request.form(max_files=settings.max_files, max_fields=32)
    except (MultiPartException, HTTPException) as err:  # starlette turns parser errors into HTTPException(400)
        if isinstance(err, HTTPException) and err.status_code != 400:
            raise
        reason = getattr(err, "detail", None) or getattr(err, "message", None) or str(err)
        limit = f" (at most {settings.max_files} files per request)" if "files" in str(reason).lower() else ""
        return _error(400, f"cannot read the upload: {reason}{limit}")
    try:
        spec = str(form.get("model") or "")
        input_size = _parse_input_size(form.get("input_size"), settings.default_input_size)
        uploads = [f for f in form.getlist("files") if isinstance(f, UploadFile)]
        if not uploads:
            return _error(400, "no image uploaded: choose one or more image files (field 'files')")

        errors: list[dict[str, Any]] = []
        readable: list[tuple[int, str, bytes]] = []
        for index, upload in enumerate(uploads):
            name = upload.filename or f"upload {index + 1}"
            if upload.size is not None and upload.size > settings.max_upload_bytes:
                errors.append({"index": index, "file": name, "reason": _too_large(upload.size, settings)})
                continue
            data = await upload.read(settings.max_upload_bytes + 1)
            if len(data) > settings.max_upload_bytes:
                errors.append({"index": index, "file": name, "reason": _too_large(len(data), settings)})
                continue
            readable.append((index, name, data))
    finally:
        await form.close()

    # the model first: a wrong model choice is reported before any image work
    entry = await run_in_threadpool(cache.get, spec, input_size)
    good = await run_in_threadpool(_decode_all, readable, settings.max_pixels, errors)
    if not good:
        too_large = errors and all(e["reason"].startswith("too large") for e in errors)
        reasons = "; ".join(f"{e['file']}: {e['reason']}" for e in errors)
        return _error(413 if too_large else 422, f"no usable image in the upload: {reasons}", errors=errors)
    try:
        colored = await run_in_threadpool(entry.colorize, [u.image.rgb for u in good])
    except (RuntimeError, ValueError) as err:  # e.g. out of device memory; as `colorize_files` reports it
        log.exception("colorization with %s failed", entry.resolved.label)
        return _error(500, f"colorization with {entry.resolved.label} failed ({type(err).__name__}: {err})")
    results = await run_in_threadpool(_encode_all, good, colored, entry.resolved.label, entry.resolved.key)
    seconds = time.perf_counter() - start
    log.info(
        "colorized %d image(s) with %s at %d px in %.2f s (%d refused)",
        len(results),
        entry.resolved.label,
        input_size,
        seconds,
        len(errors),
    )
    model = {
        "spec": spec,
        "key": entry.resolved.key,
        "label": entry.resolved.label,
        "random_init": entry.resolved.random_init,
        "version": entry.resolved.version,
    }
    return JSONResponse(
        {"model": model, "input_size": input_size, "results": results, "errors": errors, "seconds": seconds}
    )


async def _colorize_video(request: Request, cache: ModelCache, settings: UiSettings) -> JSONResponse:
    """POST /api/colorize-video: one short video (field ``file``), ``model``, ``input_size`` -> ``{"per_frame",
    "stabilised"}`` MP4 data URLs (H.264, audio copied) plus ``frames``, ``cuts``, ``seconds``; per-frame and
    stabilised side by side on the page. Capped at ``max_upload_bytes`` and ``max_video_seconds``."""
    start = time.perf_counter()
    form = await request.form(max_files=1, max_fields=32)
    try:
        spec = str(form.get("model") or "")
        input_size = _parse_input_size(form.get("input_size"), settings.default_input_size)
        upload = form.get("file")
        if not isinstance(upload, UploadFile):
            return _error(400, "no video uploaded: choose a video file (field 'file')")
        name = upload.filename or "upload"
        data = await upload.read(settings.max_upload_bytes + 1)
    finally:
        await form.close()
    if len(data) > settings.max_upload_bytes:
        return _error(413, f"{name}: {_too_large(len(data), settings)}")
    entry = await run_in_threadpool(cache.get, spec, input_size)
    try:
        out = await run_in_threadpool(_video_pair, entry, name, data, settings.max_video_seconds)
    except ImportError as err:  # the video extra is not installed
        return _error(501, str(err))
    except ValueError as err:  # VideoError (a ValueError here) or a bad clip
        return _error(422, f"{name}: {getattr(err, 'reason', err)}")
    out["seconds"] = time.perf_counter() - start
    out["model"] = {"spec": spec, "label": entry.resolved.label, "random_init": entry.resolved.random_init}
    return JSONResponse(out)


def _video_pair(entry: Any, name: str, data: bytes, max_seconds: float) -> dict[str, Any]:
    """Colorize one uploaded clip twice (``--temporal off`` and ``flow``) under the model's lock."""
    from ddcolor.video import VideoColorizer, VideoError, probe_video

    with tempfile.TemporaryDirectory(prefix="ddcolor-ui-video-") as tmp:
        src = Path(tmp) / f"input{Path(name).suffix.lower() or '.mp4'}"
        src.write_bytes(data)
        try:
            info = probe_video(src)
            rate = float(info.rate) if info.rate else 25.0
            seconds = info.duration_s or (info.frames / rate if info.frames else 0.0)
            if seconds > max_seconds:
                raise VideoError(name, f"{seconds:.1f} s long; the playground takes clips up to {max_seconds:g} s")
            out: dict[str, Any] = {"name": name, "width": info.width, "height": info.height}
            with entry.lock:
                for key, mode in (("per_frame", "off"), ("stabilised", "flow")):
                    video = VideoColorizer(entry.colorizer, temporal=mode, crf=23, preset="veryfast")
                    result = video.colorize_video(src, Path(tmp) / f"{mode}.mp4")
                    encoded = base64.b64encode((Path(tmp) / f"{mode}.mp4").read_bytes()).decode()
                    out[key] = f"data:video/mp4;base64,{encoded}"
                    out["frames"], out[f"{key}_fps"] = result.frames, result.fps
                    if mode == "flow":
                        out["cuts"] = result.cuts
        except VideoError as err:
            raise ValueError(err.reason) from None
        return out


def _too_large(size: int, settings: UiSettings) -> str:
    return (
        f"too large: {_megabytes(size)} exceeds the {_megabytes(settings.max_upload_bytes)} limit per file "
        "(`ddcolor ui --max-upload-mb N` raises it; `ddcolor colorize` has no such limit)"
    )


def _decode_all(
    readable: list[tuple[int, str, bytes]], max_pixels: int | None, errors: list[dict[str, Any]]
) -> list[_Upload]:
    """Decode every upload; the ones that fail are appended to `errors` (index, file, reason)."""
    from ddcolor.imageio import ImageReadError

    good = []
    for index, name, data in readable:
        try:
            good.append(_Upload(index, name, _decode(name, data, max_pixels)))
        except ImageReadError as err:
            errors.append({"index": index, "file": name, "reason": err.reason})
    errors.sort(key=lambda e: e["index"])
    return good


def _encode_all(good: list[_Upload], colored: list, label: str, key: str) -> list[dict[str, Any]]:
    slug = re.sub(r"[^A-Za-z0-9._-]+", "_", label).strip("_")[:60]
    results = []
    for upload, rgb in zip(good, colored, strict=True):
        image = upload.image
        height, width = image.size
        results.append(
            {
                "index": upload.index,
                "name": upload.name,
                "width": width,
                "height": height,
                "input": _png_data_url(image.rgb, image.alpha),
                "output": _png_data_url(rgb, image.alpha, image.bit_depth, image.exif),
                "download": f"{_safe_stem(upload.name)}_{slug}.png",
                "model_key": key,
            }
        )
    return results
