"""One place that resolves every external weight file the platform uses.

Everything DDColor needs from outside this repository — the ImageNet-22k ConvNeXt backbones, the VGG16-BN
of the perceptual loss, the AlexNet/VGG16 trunks of LPIPS, the InceptionV3 of FID and the four official
DDColor releases — is listed in one table, :data:`REGISTRY`, and lives in one cache directory:

* ``$DDCOLOR_WEIGHTS_DIR`` if set, else ``torch.hub.get_dir()/checkpoints`` — the directory torchvision,
  lpips and pytorch-fid already download into, so files they cached are found in place.

Nothing here touches the network unless asked to with :func:`fetch` (``ddcolor weights fetch NAME``).
On an air-gapped machine download the file elsewhere and use :func:`import_file`
(``ddcolor weights import FILE``). A missing file is a :class:`WeightsNotFoundError` whose message says
which of these commands to run; this module never falls back to random initialisation — callers do that
only when asked explicitly (``pretrained=None`` / ``pretrained: null``).

Downloads. Files on the Hugging Face Hub (timm ConvNeXt, the DDColor releases) are fetched with
``huggingface_hub.hf_hub_download`` at the revision in the table, so ``HF_ENDPOINT`` (a mirror), ``HF_TOKEN``
and offline mode (``HF_HUB_OFFLINE=1``: only the Hugging Face cache is used) work as for any Hub download, and
a file already in the Hugging Face cache is not downloaded again. Plain URLs (torchvision, pytorch-fid) go
through ``torch.hub.download_url_to_file`` with the hash prefix of the file name.

Integrity. Every file is sha256-checked against what a trusted source says:

* torchvision and pytorch-fid put the first 8 hex digits of the sha256 in the file name; those are
  recorded as ``sha256_prefix`` and checked on every fetch, import and resolve.
* Hub files: the full sha256 comes from the Hub's LFS metadata (the ETag of the LFS object, which names the
  blob in the Hugging Face cache), checked on fetch.
* Either way the sha256 is then recorded in a sidecar ``<file>.sha256`` (``sha256sum`` format) and every later
  :func:`resolve` checks the file against it. Files that did not come through :func:`fetch` (``weights
  import`` on an air-gapped machine, or a file torchvision cached) have no such source beyond the name prefix:
  their hash is recorded as first seen. Fill in ``sha256`` in the table once a hash is known.

A file whose hash does not match is a :class:`WeightsIntegrityError` naming the file, the expected and the
actual hash, and the command that replaces it.

Example::

    from ddcolor import weights

    path = weights.resolve("convnext_tiny.fb_in22k")      # raises WeightsNotFoundError if absent
    backbone = timm.create_model(
        "convnext_tiny.fb_in22k", pretrained=True, pretrained_cfg_overlay={"file": str(path)}
    )
    state = weights.load_state_dict("ddcolor_paper_tiny")  # official release, {"params": ...}
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any, Literal

from ddcolor import storage
from ddcolor.errors import DDColorError

__all__ = [
    "ENV_VAR",
    "REGISTRY",
    "DownloadFn",
    "UnknownWeightsError",
    "WeightSpec",
    "WeightStatus",
    "WeightsError",
    "WeightsIntegrityError",
    "WeightsNotFoundError",
    "cache_dir",
    "fetch",
    "get_spec",
    "import_file",
    "load_state_dict",
    "resolve",
    "sha256_file",
    "status",
]

logger = logging.getLogger(__name__)

ENV_VAR = "DDCOLOR_WEIGHTS_DIR"
_CHUNK = 1 << 20
HUB_HOST = "https://huggingface.co"
# Hub revision of every Hub file. TODO: pin commit SHAs, one per Hub repository (each timm model is a repository of
# its own, the DDColor releases share one): they could not be looked up from the machine this was written on (it
# cannot reach the Hub). "main" follows the repository, and the sha256 check uses the Hub's current LFS metadata.
HUB_REVISION = "main"
_HUB_URL = re.compile(r"^(https?://[^/]+)/([^/]+/[^/]+)/resolve/([^/]+)/(.+)$")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")

Kind = Literal["backbone", "loss", "metric", "ddcolor"]
DownloadFn = Callable[[str, Path], None]
"""``download_fn(url, dst)``: write the bytes at ``url`` to the file ``dst`` (or raise)."""


# --- the table -------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class WeightSpec:
    """One external weight file.

    Attributes:
        name: Registry key, used on the command line (``ddcolor weights fetch NAME``).
        filename: File name inside the cache directory.
        url: Where :func:`fetch` downloads it from.
        sha256: Full expected sha256 (lowercase hex), if known from a trusted source.
        sha256_prefix: Leading hex digits of the sha256 (torchvision / pytorch-fid file names carry 8).
        license: SPDX-ish license of the weights.
        description: One line for humans.
        kind: ``"backbone"`` (encoder init), ``"loss"`` (perceptual loss), ``"metric"`` (LPIPS / FID)
            or ``"ddcolor"`` (a complete official DDColor model).
        variant: For ``kind == "ddcolor"``: the model preset to build before loading (``"tiny"`` or
            ``"large"``); ``None`` otherwise.
    """

    name: str
    filename: str
    url: str
    sha256: str | None = None
    sha256_prefix: str | None = None
    license: str = ""
    description: str = ""
    kind: Kind = "backbone"
    variant: str | None = None


def _timm(name: str, description: str) -> WeightSpec:
    return WeightSpec(
        name=name,
        filename=f"timm-{name}.safetensors",
        url=f"{HUB_HOST}/timm/{name}/resolve/{HUB_REVISION}/model.safetensors",
        license="Apache-2.0",
        description=description,
        kind="backbone",
    )


def _torchvision(name: str, filename: str, kind: Kind, description: str) -> WeightSpec:
    return WeightSpec(
        name=name,
        filename=filename,
        url=f"https://download.pytorch.org/models/{filename}",
        sha256_prefix=filename.rsplit("-", 1)[1].split(".")[0],
        license="BSD-3-Clause",
        description=description,
        kind=kind,
    )


def _ddcolor(name: str, variant: str, description: str) -> WeightSpec:
    return WeightSpec(
        name=name,
        filename=f"{name}.pth",
        url=f"{HUB_HOST}/piddnad/DDColor-models/resolve/{HUB_REVISION}/{name}.pth",
        license="Apache-2.0",
        description=description,
        kind="ddcolor",
        variant=variant,
    )


_SPECS: tuple[WeightSpec, ...] = (
    _timm("convnext_tiny.fb_in22k", "ConvNeXt-T, ImageNet-22k 224px: encoder init of DDColor-T"),
    _timm("convnext_large.fb_in22k", "ConvNeXt-L, ImageNet-22k 224px: encoder init of DDColor-L"),
    _timm("convnext_atto.d2_in1k", "ConvNeXt-Atto, ImageNet-1k: small backbone for demos and tests"),
    _torchvision("vgg16_bn", "vgg16_bn-6c64b313.pth", "loss", "VGG16-BN, ImageNet-1k: perceptual loss"),
    _torchvision("alexnet", "alexnet-owt-7be5be79.pth", "metric", "AlexNet, ImageNet-1k: LPIPS trunk (net='alex')"),
    _torchvision("vgg16", "vgg16-397923af.pth", "metric", "VGG16, ImageNet-1k: LPIPS trunk (net='vgg')"),
    WeightSpec(
        name="pt_inception",
        filename="pt_inception-2015-12-05-6726825d.pth",
        url="https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/"
        "pt_inception-2015-12-05-6726825d.pth",
        sha256_prefix="6726825d",
        license="Apache-2.0",
        description="InceptionV3 (TF FID port, pytorch-fid): FID features",
        kind="metric",
    ),
    _ddcolor("ddcolor_paper_tiny", "tiny", "Official DDColor-T, ImageNet (paper training scheme)"),
    _ddcolor("ddcolor_paper", "large", "Official DDColor-L, ImageNet: the paper model"),
    _ddcolor("ddcolor_modelscope", "large", "Official DDColor-L, ImageNet, BigColor data cleaning (upstream default)"),
    _ddcolor(
        "ddcolor_artistic", "large", "Official DDColor-L, ImageNet + private artistic images, no colorfulness loss"
    ),
)

REGISTRY: Mapping[str, WeightSpec] = MappingProxyType({s.name: s for s in _SPECS})
"""Every known weight file, by name (read-only)."""


# --- errors ----------------------------------------------------------------------------------------------
class WeightsError(DDColorError):
    """Base class of the errors raised by this module."""


class UnknownWeightsError(WeightsError, ValueError):
    """A name that is not in :data:`REGISTRY`."""


class WeightsNotFoundError(WeightsError, FileNotFoundError):
    """A known weight file that is not in the cache. The message says how to get it."""


class WeightsIntegrityError(WeightsError, ValueError):
    """A file whose sha256 does not match the known, recorded or name-embedded hash."""


# --- lookup ----------------------------------------------------------------------------------------------
def cache_dir() -> Path:
    """The weights cache directory (not created).

    ``$DDCOLOR_WEIGHTS_DIR`` if set and non-empty, else ``torch.hub.get_dir()/checkpoints``. Read on every
    call, so changing the environment at run time takes effect.
    """
    env = os.environ.get(ENV_VAR)
    if env:
        return Path(env).expanduser()
    import torch.hub  # lazy: keeps `import ddcolor.weights` cheap

    return Path(torch.hub.get_dir()) / "checkpoints"


def get_spec(name: str) -> WeightSpec:
    """The registry entry called ``name``.

    Raises:
        UnknownWeightsError: ``name`` is not registered; the message lists the known names.
    """
    try:
        return REGISTRY[name]
    except KeyError:
        raise UnknownWeightsError(f"Unknown weights {name!r}. Known: {', '.join(REGISTRY)}.") from None


def sha256_file(path: str | os.PathLike[str]) -> str:
    """The sha256 (lowercase hex) of a file, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _sidecar(path: Path) -> Path:
    return path.with_name(path.name + ".sha256")


def _read_recorded(path: Path) -> str | None:
    try:
        text = _sidecar(path).read_text().strip()
    except FileNotFoundError:
        return None
    return text.split()[0].lower() if text else None


def _write_recorded(path: Path, digest: str) -> None:
    line = f"{digest}  {path.name}\n"  # `sha256sum -c` format
    storage.write_local_atomic(_sidecar(path), lambda tmp: Path(tmp).write_text(line))


def _refetch_hint(spec: WeightSpec) -> str:
    return (
        f"Replace it: `ddcolor weights fetch {spec.name} --force` (internet) or "
        f"`ddcolor weights import FILE --name {spec.name}` (air-gapped)."
    )


def _check(spec: WeightSpec, label: str, actual: str, recorded: str | None, hint: str, hub: str | None = None) -> None:
    """Raise :class:`WeightsIntegrityError` unless ``actual`` matches every hash known for ``spec``."""
    expectations = []
    if hub:
        expectations.append((hub.lower(), "sha256 from the Hub's LFS metadata"))
    if spec.sha256:
        expectations.append((spec.sha256.lower(), "registry sha256"))
    if spec.sha256_prefix:
        expectations.append((spec.sha256_prefix.lower(), "sha256 prefix from the official file name"))
    if recorded:
        expectations.append((recorded, "sha256 recorded at fetch/import"))
    for expected, source in expectations:
        if not actual.startswith(expected):
            raise WeightsIntegrityError(
                f"{label} ({spec.name}) fails its sha256 check: expected {expected} ({source}), got {actual}. {hint}"
            )


def _missing_message(spec: WeightSpec, directory: Path) -> str:
    msg = (
        f"Weights {spec.name!r} are not in the cache ({directory}). "
        f"On a machine with internet run `ddcolor weights fetch {spec.name}`; "
        f"air-gapped: download {spec.url} elsewhere and run "
        f"`ddcolor weights import FILE --name {spec.name}`. "
        f"(Set {ENV_VAR} to use another cache directory.)"
    )
    if spec.kind == "backbone":
        msg += " To start from random initialisation instead, pass pretrained=None (`pretrained: null`)."
    return msg


def resolve(name: str, *, verify: bool = True) -> Path:
    """The cached, verified path of weight file ``name``. Never downloads.

    With ``verify`` the file is hashed and checked against the registry hash or prefix and against the
    sidecar hash recorded at first fetch/import. A file without a sidecar (e.g. one torchvision
    downloaded into the torch hub cache) is checked against what is known and then recorded
    (trust on first use).

    Args:
        name: A key of :data:`REGISTRY`.
        verify: Hash the file (about 1 s per GB). ``False`` only checks that it exists.

    Raises:
        UnknownWeightsError: ``name`` is not registered.
        WeightsNotFoundError: the file is not in the cache; the message says which command to run.
        WeightsIntegrityError: the file does not match its hash.
    """
    spec = get_spec(name)
    path = cache_dir() / spec.filename
    if not path.is_file():
        raise WeightsNotFoundError(_missing_message(spec, path.parent))
    if verify:
        actual = sha256_file(path)
        recorded = _read_recorded(path)
        _check(spec, f"Weights file {path}", actual, recorded, _refetch_hint(spec))
        if recorded is None:
            logger.info("Recording sha256 of %s (trust on first use): %s", path, actual)
            try:
                _write_recorded(path, actual)
            except OSError as e:  # a read-only shared cache still resolves
                logger.warning("Could not record sha256 next to %s: %s", path, e)
    return path


@dataclass(frozen=True)
class WeightStatus:
    """Whether one registry entry is in the cache.

    Attributes:
        name: Registry key.
        kind: The entry's kind (see :class:`WeightSpec`).
        present: The file exists in the cache.
        path: Where the file is or would be.
        size_bytes: File size, ``None`` if missing.
        verified: ``True``/``False`` if the file was hashed and checked, ``None`` if not checked
            (missing, or ``status(verify=False)``).
    """

    name: str
    kind: str
    present: bool
    path: Path
    size_bytes: int | None
    verified: bool | None


def status(*, verify: bool = False) -> list[WeightStatus]:
    """The cache state of every registry entry, in registry order.

    Args:
        verify: Also hash every present file and check it (slow for the GB-sized releases). Unlike
            :func:`resolve`, this never records a hash.
    """
    directory = cache_dir()
    rows = []
    for spec in REGISTRY.values():
        path = directory / spec.filename
        present = path.is_file()
        verified = None
        if present and verify:
            try:
                _check(spec, str(path), sha256_file(path), _read_recorded(path), "")
                verified = True
            except WeightsIntegrityError:
                verified = False
        size = path.stat().st_size if present else None
        rows.append(WeightStatus(spec.name, spec.kind, present, path, size, verified))
    return rows


# --- filling the cache -----------------------------------------------------------------------------------
def hub_location(url: str) -> tuple[str, str, str, str] | None:
    """``(endpoint, repo_id, revision, filename)`` of a Hub ``.../resolve/...`` URL, else None."""
    match = _HUB_URL.match(url)
    return (match.group(1), match.group(2), match.group(3), match.group(4)) if match else None


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in {"1", "true", "yes", "on"}


def _hub_download(spec: WeightSpec, location: tuple[str, str, str, str]) -> tuple[Path, str | None]:
    """Download (or find in the Hugging Face cache) a Hub file; its path there and the Hub's LFS sha256.

    ``HF_ENDPOINT``, ``HF_TOKEN``, ``HF_HUB_OFFLINE`` and ``HF_HUB_CACHE`` / ``HF_HOME`` are read at each call
    (huggingface_hub reads some of them once, at import).
    """
    from huggingface_hub import get_hf_file_metadata, hf_hub_download, hf_hub_url
    from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError, RepositoryNotFoundError

    host, repo, revision, filename = location
    endpoint = os.environ.get("HF_ENDPOINT", "").strip().rstrip("/") or host
    token = os.environ.get("HF_TOKEN", "").strip() or None
    hf_home = os.environ.get("HF_HOME", "").strip()
    cache = os.environ.get("HF_HUB_CACHE", "").strip() or (os.path.join(hf_home, "hub") if hf_home else None)
    offline = _offline()
    where = f"{endpoint}/{repo} (revision {revision}, file {filename})"
    try:
        path = Path(
            hf_hub_download(
                repo,
                filename,
                revision=revision,
                endpoint=endpoint,
                token=token,
                cache_dir=cache,
                local_files_only=offline,
            )
        )
    except LocalEntryNotFoundError as err:
        why = "offline mode (HF_HUB_OFFLINE is set) and it is not in the Hugging Face cache" if offline else err
        raise OSError(
            f"Cannot download {spec.name} from {where}: {why}. Set HF_ENDPOINT for a mirror, or download it "
            f"elsewhere and run `ddcolor weights import FILE --name {spec.name}`."
        ) from None
    except (EntryNotFoundError, RepositoryNotFoundError) as err:
        raise OSError(f"Cannot download {spec.name}: {where} not found ({type(err).__name__}; HF_TOKEN?)") from None
    # The cache stores a Hub file as blobs/<etag>; for LFS files the etag is the sha256 of the content.
    blob = path.resolve().name
    if _SHA256.match(blob):
        return path, blob
    if offline:
        return path, None
    meta = get_hf_file_metadata(hf_hub_url(repo, filename, revision=revision, endpoint=endpoint), token=token)
    etag = (meta.etag or "").strip('"').lower()
    return path, etag if _SHA256.match(etag) else None


def _url_download(url: str, dst: Path, hash_prefix: str | None) -> None:
    """``torch.hub.download_url_to_file`` (progress bar; checks the sha256 prefix of the file name)."""
    import torch.hub

    try:
        torch.hub.download_url_to_file(url, str(dst), hash_prefix=hash_prefix, progress=True)
    except RuntimeError as err:
        if "invalid hash value" not in str(err):
            raise
        raise WeightsIntegrityError(
            f"Download from {url} fails its sha256 check: {err}. Nothing was written."
        ) from None


def _copy_hashing(src: Path, dst: Path) -> str:
    """Copy ``src`` to ``dst`` (a hard link when they share a file system) and return the sha256 of the bytes."""
    try:
        dst.unlink(missing_ok=True)
        os.link(src.resolve(), dst)
        return sha256_file(dst)
    except OSError:
        h = hashlib.sha256()
        with open(src, "rb") as fin, open(dst, "wb") as fout:
            while chunk := fin.read(_CHUNK):
                h.update(chunk)
                fout.write(chunk)
        return h.hexdigest()


def _install(spec: WeightSpec, tmp: Path, actual: str, origin: str, hub: str | None = None) -> Path:
    """Check the finished temp file ``tmp`` and atomically move it to its cache path; record its hash.

    The temp file must be in the cache directory, so the move is a rename. A new fetch/import is a new
    trust decision, so a previously recorded hash is replaced (with a warning if it differs).
    """
    _check(spec, origin, actual, None, "Nothing was written to the cache.", hub=hub)
    dst = tmp.parent / spec.filename
    previous = _read_recorded(dst)
    if previous is not None and previous != actual:
        logger.warning("Replacing %s: recorded sha256 was %s, new file is %s", dst, previous, actual)
    # A rename of our own, not `storage.write_local_atomic`: the temp file was filled (and hashed, and checked)
    # before this point by one of three writers (a download, a copy, or a hard link to the Hugging Face cache's
    # blob), and a hard link must keep its blob's permissions: chmod would change the Hub cache's file too.
    umask = os.umask(0)
    os.umask(umask)
    if tmp.stat().st_nlink == 1:  # not a hard link into the Hugging Face cache
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp files are 0600; a cache may be shared
    _sidecar(dst).unlink(missing_ok=True)
    os.replace(tmp, dst)
    _write_recorded(dst, actual)
    logger.info("Cached %s at %s (sha256 %s)", spec.name, dst, actual)
    return dst


def _temp_in(directory: Path, filename: str) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{filename}.", suffix=".part")
    os.close(fd)
    return Path(tmp)


def fetch(name: str, *, force: bool = False, url: str | None = None, download_fn: DownloadFn | None = None) -> Path:
    """Download weight file ``name`` into the cache (needs internet) and return its path.

    The download goes to a temporary file in the cache directory, is sha256-checked, then renamed into
    place, so an interrupted or bad download never leaves a file under the real name. Its hash is
    recorded in the sidecar for later :func:`resolve` calls.

    Args:
        name: A key of :data:`REGISTRY`.
        force: Download even if the file is already cached (replaces a corrupt or tampered file).
        url: Download from here instead of the registry URL (e.g. a mirror, or ``file://`` in tests); a plain
            URL download (a Hub mirror is better set with ``HF_ENDPOINT``).
        download_fn: ``download_fn(url, dst)`` writes the bytes to ``dst``; default: the Hub's
            ``hf_hub_download`` for Hub files, ``torch.hub.download_url_to_file`` for other URLs.

    Raises:
        UnknownWeightsError: ``name`` is not registered.
        WeightsIntegrityError: the download (or, without ``force``, the cached file) fails its check.
        OSError: the download failed (the message says what to check, or to use ``weights import``).
    """
    spec = get_spec(name)
    directory = cache_dir()
    if not force and (directory / spec.filename).is_file():
        logger.info("%s is already cached; verifying (use force=True to download again)", name)
        return resolve(name)
    source = url or spec.url
    hub = hub_location(source) if url is None and download_fn is None else None
    logger.info("Downloading %s from %s", name, source)
    tmp = _temp_in(directory, spec.filename)
    try:
        if hub is not None:
            path, hub_sha256 = _hub_download(spec, hub)
            origin = f"Download from {os.environ.get('HF_ENDPOINT') or hub[0]}/{hub[1]}@{hub[2]}/{hub[3]}"
            try:
                return _install(spec, tmp, _copy_hashing(path, tmp), origin, hub=hub_sha256)
            except WeightsIntegrityError:  # do not leave a bad blob in the Hugging Face cache to be reused
                for bad in (path.resolve(), path):
                    bad.unlink(missing_ok=True)
                raise
        if download_fn is not None:
            download_fn(source, tmp)
        else:
            _url_download(source, tmp, spec.sha256_prefix)
        return _install(spec, tmp, sha256_file(tmp), f"Download from {source}")
    finally:
        tmp.unlink(missing_ok=True)


def _infer_spec(filename: str) -> WeightSpec:
    matches = [s for s in REGISTRY.values() if filename in (s.filename, s.url.rsplit("/", 1)[-1])]
    if len(matches) == 1:
        return matches[0]
    candidates = f" (matches {', '.join(s.name for s in matches)})" if matches else ""
    raise UnknownWeightsError(
        f"Cannot tell which weights {filename!r} are{candidates}; pass the name: "
        f"`ddcolor weights import FILE --name NAME`. Known names: {', '.join(REGISTRY)}."
    )


def import_file(path: str | os.PathLike[str], name: str | None = None) -> Path:
    """Copy a downloaded weight file into the cache (for air-gapped machines) and return its cache path.

    The copy is hashed while it is written, checked like a download, renamed into place and its hash
    recorded. The source file is left untouched.

    Args:
        path: The file to import.
        name: Registry key. If ``None``, inferred from the file name when it equals exactly one entry's
            cache file name or download file name (e.g. ``ddcolor_paper_tiny.pth``,
            ``vgg16_bn-6c64b313.pth``); the timm files are all called ``model.safetensors`` upstream,
            so they need ``name``.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        UnknownWeightsError: ``name`` is unknown or cannot be inferred.
        WeightsIntegrityError: the file fails its sha256 check; nothing is written.
    """
    src = Path(path)
    if not src.is_file():
        raise FileNotFoundError(f"No such file to import: {src}")
    spec = get_spec(name) if name is not None else _infer_spec(src.name)
    tmp = _temp_in(cache_dir(), spec.filename)
    try:
        h = hashlib.sha256()
        with open(src, "rb") as fin, open(tmp, "wb") as fout:
            while chunk := fin.read(_CHUNK):
                h.update(chunk)
                fout.write(chunk)
        return _install(spec, tmp, h.hexdigest(), f"File {src}")
    finally:
        tmp.unlink(missing_ok=True)


# --- loading ---------------------------------------------------------------------------------------------
def load_state_dict(name: str, *, map_location: Any = "cpu") -> dict[str, Any]:
    """Resolve and load weight file ``name`` as stored (no key remapping).

    ``.safetensors`` files load with safetensors; ``.pth`` files with ``torch.load(weights_only=True)``.
    The official DDColor releases are ``{"params": state_dict}``; unwrapping and key mapping are the
    model code's job.

    Raises:
        WeightsNotFoundError, WeightsIntegrityError: see :func:`resolve`.
    """
    path = resolve(name)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(path, device=str(map_location))
    import torch

    return torch.load(path, map_location=map_location, weights_only=True)
