"""What the playground can colorize with: the model catalogue, spec resolution, and the cache of loaded models.

A model is named by a *spec* string, the same strings `ddcolor colorize --model` takes plus three short forms:

    champion / challenger        the registered version behind that alias (``registry.*_alias`` of params.yaml)
    models:/NAME/3               a registered version (any ``models:/`` URI: ``models:/NAME@ALIAS``, ``models:/m-...``)
    ddcolor_paper_tiny           an official release from the weights cache (`ddcolor.weights`)
    runs/exp1/model.safetensors  a checkpoint file (ours, or an official .pth)
    random-init:atto:0           an explicitly random-initialised network (preset, seed): MEANINGLESS colors

Every model goes through `ddcolor.model.load.load_generator` (releases, files, ``models:/`` URIs, random-init specs),
then `Colorizer`, which runs `prepare_for_inference`: the pipeline of `ddcolor colorize`, not a second one.

`ModelCache` keeps a few `Colorizer` objects (LRU, keyed by (spec, input size); aliases are resolved to their version
first, so ``champion`` and ``models:/NAME/3`` share one entry and a moved alias is never served stale). Each entry
has a lock: one request at a time per model, requests for different models run in parallel.
"""

from __future__ import annotations

import logging
import threading
import time
import urllib.parse
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ddcolor.errors import DDColorError

if TYPE_CHECKING:
    from ddcolor.colorize import Colorizer
    from ddcolor.config import Config

__all__ = [
    "CHECKPOINT_SUFFIXES",
    "RANDOM_PREFIX",
    "CachedModel",
    "ModelCache",
    "ModelSpecError",
    "ResolvedModel",
    "catalogue",
    "find_checkpoints",
    "mlflow_run_link",
    "parse_random_spec",
    "registry_catalogue",
]

log = logging.getLogger(__name__)

RANDOM_PREFIX = "random-init:"
RANDOM_PRESETS = ("atto", "tiny", "large")
CHECKPOINT_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin")
REGISTRY_PROBE_TIMEOUT_S = 3.0  # an unreachable MLflow server must not hang the page (the client retries for minutes)


class ModelSpecError(DDColorError, ValueError):
    """A spec that names no model the playground may load; the message says what may be chosen instead.

    Attributes:
        status: the HTTP status the app answers with (404 unknown, 403 not allowed, 502 registry unreachable).
    """

    def __init__(self, message: str, status: int = 404) -> None:
        super().__init__(message)
        self.status = status


# --- specs -----------------------------------------------------------------------------------------------
def parse_random_spec(spec: str) -> tuple[str, int]:
    """``random-init:PRESET[:SEED]`` -> ``(preset, seed)``.

    Raises:
        ModelSpecError: unknown preset or a seed that is not an integer.
    """
    from ddcolor.model.load import parse_random_init

    try:
        return parse_random_init(spec)
    except ValueError as err:
        raise ModelSpecError(str(err)) from None


def random_label(preset: str, seed: int) -> str:
    return f"RANDOM-INIT {preset} (seed {seed}): meaningless colors"


def find_checkpoints(paths: Iterable[str | Path]) -> list[Path]:
    """Checkpoint files named by ``paths``: files as given, folders searched recursively for checkpoint suffixes.

    Raises:
        FileNotFoundError: a path that does not exist.
    """
    found: list[Path] = []
    for raw in paths:
        path = Path(raw).expanduser()
        if path.is_file():
            found.append(path.resolve())
        elif path.is_dir():
            found += sorted(p.resolve() for p in path.rglob("*") if p.suffix in CHECKPOINT_SUFFIXES and p.is_file())
        else:
            raise FileNotFoundError(f"checkpoint {raw}: no such file or folder")
    return list(dict.fromkeys(found))


# --- the registry ----------------------------------------------------------------------------------------
def mlflow_run_link(tracking_uri: str, experiment_id: str, run_id: str) -> tuple[str | None, str]:
    """Where a person sees a run: ``(url, hint)``.

    For an http(s) tracking server the url is its UI page of the run (``<uri>/`` + `ui_fragment`); for a
    local store (sqlite:, file paths) there is no server, so url is None and the hint names the command that starts
    one (``mlflow ui --backend-store-uri ...``) and the page to open there.
    """
    from ddcolor.tracking.client import run_url, ui_fragment

    url = run_url(run_id, experiment_id=experiment_id, tracking_uri=tracking_uri)
    if url:
        return url, f"MLflow run {run_id}"
    fragment = ui_fragment(experiment_id, run_id)
    return None, f"run `mlflow ui --backend-store-uri {tracking_uri}`, then open http://127.0.0.1:5000/{fragment}"


def _registry_unreachable(tracking_uri: str) -> str | None:
    """Why the registry cannot be read right now (quick checks only), or None."""
    from ddcolor.tracking.client import health_problem, is_http, redact

    if is_http(tracking_uri):
        problem = health_problem(tracking_uri, REGISTRY_PROBE_TIMEOUT_S)
        if problem:
            where = redact(tracking_uri)
            return f"MLflow at {where} is not reachable ({problem}); start it or set MLFLOW_TRACKING_URI"
    elif tracking_uri.startswith("sqlite:///"):
        path = Path(urllib.parse.unquote(tracking_uri.removeprefix("sqlite:///")))
        if not path.is_file():  # opening it would create an empty store as a side effect
            return f"no MLflow store at {path} (from {tracking_uri}); set MLFLOW_TRACKING_URI to your tracking server"
    return None


def registry_catalogue(config: Config, tracking_uri: str, max_versions: int = 50) -> dict[str, Any]:
    """The registered versions of ``config.registry.model_name`` with what a person judges them by.

    Returns:
        ``{"model_name", "tracking_uri", "error", "aliases": {alias: version}, "versions": [...]}``, newest version
        first; each version: ``{"version", "aliases", "run_id", "run_url", "run_hint", "metrics": {name: value},
        "gate": GateDecision.to_dict() | None, "created_ms", "description"}``. ``error`` is a sentence when the
        registry cannot be read (the rest of the playground still works), else None.
    """
    from mlflow.exceptions import MlflowException

    from ddcolor.registry import blessing, version_metrics
    from ddcolor.tracking.client import client, is_not_found, redact

    name = config.registry.model_name
    out: dict[str, Any] = {
        "model_name": name,
        "tracking_uri": redact(tracking_uri),
        "error": None,
        "aliases": {},
        "versions": [],
    }
    problem = _registry_unreachable(tracking_uri)
    if problem:
        out["error"] = problem
        return out
    mlflow_client = client(tracking_uri)
    try:
        try:
            aliases = dict(mlflow_client.get_registered_model(name).aliases or {})
        except MlflowException as err:
            if not is_not_found(err):
                raise
            where = redact(tracking_uri)
            out["error"] = f"no registered model {name!r} at {where} yet (`ddcolor promote --run-id ...` adds one)"
            return out
        out["aliases"] = {alias: str(version) for alias, version in aliases.items()}
        by_version: dict[str, list[str]] = {}
        for alias, version in out["aliases"].items():
            by_version.setdefault(version, []).append(alias)
        found = mlflow_client.search_model_versions(f"name = '{name}'", max_results=max_versions)
        experiments: dict[str, str] = {}
        for mv in sorted(found, key=lambda v: int(v.version), reverse=True):
            run_id = (mv.tags or {}).get("lineage.run_id") or mv.run_id
            url, hint = None, ""
            if run_id:
                if run_id not in experiments:
                    experiments[run_id] = mlflow_client.get_run(run_id).info.experiment_id
                url, hint = mlflow_run_link(tracking_uri, experiments[run_id], run_id)
            decision = blessing(mv.tags or {})
            out["versions"].append(
                {
                    "version": str(mv.version),
                    "aliases": sorted(by_version.get(str(mv.version), [])),
                    "run_id": run_id,
                    "run_url": url,
                    "run_hint": hint,
                    "metrics": version_metrics(mv),
                    "gate": decision.to_dict() if decision else None,
                    "model_card": (mv.tags or {}).get("model_card"),
                    "created_ms": mv.creation_timestamp,
                    "description": mv.description or "",
                }
            )
    except MlflowException as err:
        out["error"] = f"cannot read the registry at {redact(tracking_uri)}: {err}"
    return out


# --- the cache -------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ResolvedModel:
    """A spec turned into what loads it.

    Attributes:
        spec: what the user chose (``champion``, a path, ...).
        key: what identifies the weights: ``models:/NAME/3`` for aliases and versions, else the spec itself.
        label: a short human-readable name.
        random_init: True for random-init models (their colors are meaningless).
        version: the registered version, for registry models.
    """

    spec: str
    key: str
    label: str
    random_init: bool = False
    version: str | None = None


@dataclass
class CachedModel:
    """One loaded model at one input size, with the lock that makes its requests run one at a time."""

    resolved: ResolvedModel
    colorizer: Colorizer
    load_s: float
    lock: threading.Lock = field(default_factory=threading.Lock)

    def colorize(self, rgbs: Sequence[np.ndarray]) -> list[np.ndarray]:
        """`Colorizer.colorize_float` under this model's lock: float32 (H, W, 3) sRGB in [0, 1] in and out."""
        with self.lock:
            return self.colorizer.colorize_float(rgbs)


class ModelCache:
    """Resolves specs and keeps up to ``max_entries`` loaded models (least recently used goes first).

    Args:
        config: registry names (``registry.model_name``, aliases).
        tracking_uri: MLflow tracking URI of the registry.
        checkpoints: checkpoint files offered in the catalogue (always loadable).
        allow_any_path: also load checkpoint paths typed by the user (only sensible on loopback: a path names a file
            on the server).
        device: where the networks run ("auto", "cpu", "cuda", ...).
        precision: "auto" (bf16 where the device has native bf16, else fp32), "fp32", "bf16" or "fp16".
        max_entries: how many (model, input size) pairs stay loaded.
        loader: ``loader(resolved) -> DDColor``; default `load_network`. Tests may inject a faster one.
    """

    def __init__(
        self,
        config: Config,
        tracking_uri: str,
        *,
        checkpoints: Sequence[Path] = (),
        allow_any_path: bool = False,
        device: str = "auto",
        precision: str = "auto",
        max_entries: int = 3,
        loader: Callable[[ResolvedModel], Any] | None = None,
    ) -> None:
        if max_entries < 1:
            raise ValueError(f"max_entries must be >= 1, got {max_entries}")
        self.config = config
        self.tracking_uri = tracking_uri
        self.checkpoints = [Path(p) for p in checkpoints]
        self.allow_any_path = allow_any_path
        self.device = device
        self.precision = precision
        self.max_entries = max_entries
        self.loader = loader or self.load_network
        self._entries: OrderedDict[tuple[str, int], CachedModel] = OrderedDict()
        self._loading: dict[tuple[str, int], threading.Lock] = {}
        self._guard = threading.Lock()  # protects the two dicts above, never held while loading or running

    # specs -> ResolvedModel
    def resolve(self, spec: str) -> ResolvedModel:
        """What `spec` names (see the module docstring); registry aliases are looked up now.

        Raises:
            ModelSpecError: unknown spec, a path that is not allowed, or a registry that cannot be read.
        """
        from ddcolor.model import OFFICIAL_RELEASES

        spec = spec.strip()
        registry = self.config.registry
        if not spec:
            raise ModelSpecError("no model chosen: pick one from the list (GET /api/models)", 400)
        if spec.startswith(RANDOM_PREFIX):
            preset, seed = parse_random_spec(spec)
            return ResolvedModel(spec, f"{RANDOM_PREFIX}{preset}:{seed}", random_label(preset, seed), random_init=True)
        if spec in (registry.champion_alias, registry.challenger_alias):
            return self._resolve_registry(spec, f"models:/{registry.model_name}@{spec}")
        if spec.startswith("models:/"):
            return self._resolve_registry(spec, spec)
        if spec.removeprefix("official:") in OFFICIAL_RELEASES:
            name = spec.removeprefix("official:")
            return ResolvedModel(spec, name, f"release {name}")
        path = Path(spec).expanduser()
        resolved = path.resolve()
        if resolved in self.checkpoints or (self.allow_any_path and path.suffix in CHECKPOINT_SUFFIXES):
            if not resolved.is_file():
                raise ModelSpecError(f"checkpoint {spec}: no such file on the server")
            return ResolvedModel(spec, str(resolved), f"checkpoint {path.name}")
        hint = (
            "a registry alias (champion, challenger), models:/NAME/VERSION, an official release "
            f"({', '.join(OFFICIAL_RELEASES)}), random-init:atto:SEED"
        )
        if path.suffix in CHECKPOINT_SUFFIXES:
            raise ModelSpecError(
                f"checkpoint {spec} is not offered by this server (it binds beyond loopback, so typed paths are off); "
                "start it with --checkpoint PATH to offer the file",
                403,
            )
        raise ModelSpecError(f"unknown model {spec!r}: choose one from the list, or type {hint}, or a checkpoint path")

    def _resolve_registry(self, spec: str, uri: str) -> ResolvedModel:
        """An alias or ``models:/`` URI -> the version it names now (key ``models:/NAME/VERSION``)."""
        from mlflow.exceptions import MlflowException

        from ddcolor.tracking.client import client

        problem = _registry_unreachable(self.tracking_uri)
        if problem:
            raise ModelSpecError(f"cannot load {spec!r}: {problem}", 502)
        ref = uri.removeprefix("models:/")
        if ref.startswith("m-") or ("@" not in ref and "/" not in ref):
            return ResolvedModel(spec, uri, spec)  # a logged model id: nothing to resolve
        mlflow_client = client(self.tracking_uri)
        try:
            if "@" in ref:
                name, alias = ref.split("@", 1)
                mv = mlflow_client.get_model_version_by_alias(name, alias)
            else:
                name, number = ref.split("/", 1)
                mv = mlflow_client.get_model_version(name, number)
        except MlflowException as err:
            raise ModelSpecError(
                f"no registered model behind {spec!r} ({uri}) at {self.tracking_uri}: "
                f"{getattr(err, 'message', err)}; `ddcolor promote --run-id RUN_ID` registers and promotes one"
            ) from None
        version = str(mv.version)
        label = f"{name} v{version}" + (f" ({spec})" if spec != uri and "@" in uri else "")
        return ResolvedModel(spec, f"models:/{name}/{version}", label, version=version)

    # loading
    def load_network(self, resolved: ResolvedModel):
        """The `DDColor` (eval mode) behind a resolved spec, through `ddcolor.model.load.load_generator` (a
        random-init spec logs its RANDOM_INIT_WARNING there)."""
        from ddcolor.model.load import load_generator

        return load_generator(resolved.key, tracking_uri=self.tracking_uri)

    def get(self, spec: str, input_size: int) -> CachedModel:
        """The loaded model for (spec, input size): from the cache, or loaded now (once, even under concurrency).

        Blocking (loading can take seconds, and downloads registry models): call it from a worker thread.

        Raises:
            ModelSpecError: see `resolve`.
            whatever loading raises: ``WeightsNotFoundError``, ``FileNotFoundError``, ``CheckpointError``,
                ``ValueError`` (bad input size).
        """
        from ddcolor.colorize import Colorizer

        resolved = self.resolve(spec)
        key = (resolved.key, input_size)
        with self._guard:
            if key in self._entries:
                self._entries.move_to_end(key)
                return self._entries[key]
            loading = self._loading.setdefault(key, threading.Lock())
        with loading:  # a second request for the same model waits for the first load instead of loading again
            with self._guard:
                if key in self._entries:
                    self._entries.move_to_end(key)
                    return self._entries[key]
            start = time.perf_counter()
            log.info("loading %s at %d px", resolved.label, input_size)
            network = self.loader(resolved)
            colorizer = Colorizer(network, input_size=input_size, device=self.device, precision=self.precision)
            entry = CachedModel(resolved, colorizer, time.perf_counter() - start)
            log.info("loaded %s at %d px in %.1f s", resolved.label, input_size, entry.load_s)
            with self._guard:
                self._entries[key] = entry
                self._loading.pop(key, None)
                while len(self._entries) > self.max_entries:
                    (old_key, old_size), _ = self._entries.popitem(last=False)
                    log.info("evicted %s at %d px from the model cache", old_key, old_size)
        return entry

    def loaded(self) -> list[tuple[str, int]]:
        """(key, input size) of the loaded models, least recently used first."""
        with self._guard:
            return list(self._entries)


# --- the catalogue ---------------------------------------------------------------------------------------
def _release_entries() -> list[dict[str, Any]]:
    from ddcolor import weights
    from ddcolor.model import OFFICIAL_RELEASES

    entries = []
    for name, preset in OFFICIAL_RELEASES.items():
        try:
            weights.resolve(name, verify=False)
            available, note = True, f"official release ({preset}) from the weights cache"
        except weights.WeightsError:
            available, note = False, f"not in the weights cache: `ddcolor weights fetch {name}` (or weights import)"
        entry = {"id": name, "label": f"release {name}", "kind": "release", "available": available, "note": note}
        entries.append(entry | {"random_init": False})
    return entries


def _display_path(path: Path) -> str:
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def catalogue(cache: ModelCache, random_seeds: Sequence[int] = (0, 1)) -> dict[str, Any]:
    """Everything the page offers: ``{"models": [...], "registry": registry_catalogue(...)}``.

    Each model: ``{"id" (the spec to send back), "label", "kind" (alias | version | release | checkpoint | random),
    "available", "note", "random_init", "version" (registry models)}``; registry models first (aliases, then versions
    newest first), then releases, checkpoints and the random-init models (``random_seeds``).
    """
    registry_config = cache.config.registry
    registry = registry_catalogue(cache.config, cache.tracking_uri)
    models: list[dict[str, Any]] = []

    def add(spec: str, label: str, kind: str, available: bool = True, note: str = "", **extra: Any) -> None:
        entry = {"id": spec, "label": label, "kind": kind, "available": available, "note": note, "random_init": False}
        models.append(entry | extra)

    for alias in (registry_config.champion_alias, registry_config.challenger_alias):
        version = registry["aliases"].get(alias)
        if version is not None:
            add(alias, f"{alias} ({registry_config.model_name} v{version})", "alias", version=version)
    for mv in registry["versions"]:
        aliases = f" [{', '.join(mv['aliases'])}]" if mv["aliases"] else ""
        name = registry_config.model_name
        add(f"models:/{name}/{mv['version']}", f"{name} v{mv['version']}{aliases}", "version", version=mv["version"])
    models += _release_entries()
    for path in cache.checkpoints:
        add(str(path), f"checkpoint {_display_path(path)}", "checkpoint", note=str(path))
    for seed in random_seeds:
        preset = "atto"
        add(
            f"{RANDOM_PREFIX}{preset}:{seed}",
            random_label(preset, seed),
            "random",
            note="random weights, for trying the page without any trained model; the colors mean NOTHING",
            random_init=True,
        )
    return {"models": models, "registry": registry}
