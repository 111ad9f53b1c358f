"""The registry-wide promotion lock: a lease with a heartbeat and a fencing token, on the MLflow model registry.

`promote` and `rollback` (`ddcolor.registry`) hold it while they read and move the champion alias.

How it works. The lock is a sequence of *generations*, each a registered model named
``<model_name>.promotion-lock.<N>`` (N zero-padded; the newest one is the lock's state):

* **Taking it** means creating generation N + 1 when generation N is released or its lease has expired (or none
  exists). Creating a registered model is an atomic insert on the tracking server's database (the name is the
  primary key): of any number of racers, exactly one creates N + 1; the others get ``RESOURCE_ALREADY_EXISTS`` and
  wait. The winner deletes the older generations.
* **Holding it**: the holder's lease (tag ``lock.expires``, wall-clock seconds) is renewed every ``ttl / 3`` by a
  heartbeat thread, so a promotion may take as long as it needs (re-scoring a champion, exporting a ``large``
  model to ONNX). Only a holder that stops renewing (crashed, frozen, cut off from the server) for ``ttl`` loses it.
* **Fencing**: N is the holder's fencing token. Immediately before every write that matters (the alias move), the
  holder calls `PromotionLease.check`: its lease must not have expired (it is renewed right then) and no newer
  generation may exist; otherwise it aborts with `LockLostError` instead of writing. A holder that was frozen
  past its TTL and then woke up therefore never moves the alias after someone else took over.
* **Releasing** tags the generation ``lock.released=true``; it stays as the counter's memory (one registered model
  per lock, visible in the MLflow Models list).

Guarantee (SQL-backed tracking server or store: SQLite, PostgreSQL, MySQL): at most one holder passes `check`
between two generations, whatever the durations, so the champion alias only moves under a valid lease and each
``previous_champion`` names the champion it really replaced. The remaining assumption is about time, not about
promotion length: the request that follows a successful `check` (one alias move) completes within the TTL (120 s
by default), and the hosts' clocks differ by less than the TTL's third.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from ddcolor.errors import DDColorError
from ddcolor.tracking import client as tracking_client

if TYPE_CHECKING:
    from mlflow import MlflowClient

__all__ = [
    "LOCK_SUFFIX",
    "LockLostError",
    "LockTimeoutError",
    "PromotionLease",
    "lease_state",
    "lock_generations",
    "promotion_lock",
]

log = logging.getLogger(__name__)

LOCK_SUFFIX = ".promotion-lock"
TOKEN_TAG = "lock.token"
EXPIRES_TAG = "lock.expires"
RELEASED_TAG = "lock.released"
HOLDER_TAG = "lock.holder"
_DIGITS = 10


class LockTimeoutError(DDColorError, RuntimeError):
    """The promotion lock was not acquired in time (another promotion is running, or a lease not yet expired)."""


class LockLostError(DDColorError, RuntimeError):
    """The lease expired or was taken over while held: the holder must not write (fencing)."""


def _prefix(model_name: str) -> str:
    return f"{model_name}{LOCK_SUFFIX}."


def _generation_name(model_name: str, generation: int) -> str:
    return f"{_prefix(model_name)}{generation:0{_DIGITS}d}"


def lock_generations(client: MlflowClient, model_name: str) -> dict[int, dict[str, str]]:
    """``{generation: tags}`` of the lock's registered models (normally one: the newest)."""
    prefix = _prefix(model_name)
    out: dict[int, dict[str, str]] = {}
    token = None
    while True:
        page = client.search_registered_models(f"name LIKE '{prefix}%'", max_results=100, page_token=token)
        for model in page:
            suffix = model.name[len(prefix) :]
            if model.name.startswith(prefix) and suffix.isdigit():
                out[int(suffix)] = dict(model.tags or {})
        token = page.token
        if not token:
            return out


def _is_free(tags: dict[str, str], now: float) -> bool:
    if tags.get(RELEASED_TAG) == "true":
        return True
    try:
        return float(tags.get(EXPIRES_TAG, "0")) < now
    except ValueError:
        return True  # unreadable lease: treat as expired


class PromotionLease:
    """A held generation of the promotion lock (from `promotion_lock`).

    Attributes:
        model_name: the registered model the lock protects.
        generation: the fencing token (strictly increasing over the lock's lifetime).
        name: the generation's registered model.
        ttl_s: lease length, seconds.
    """

    def __init__(self, client: MlflowClient, model_name: str, generation: int, token: str, ttl_s: float) -> None:
        self.client, self.model_name, self.generation, self.token, self.ttl_s = (
            client,
            model_name,
            generation,
            token,
            ttl_s,
        )
        self.name = _generation_name(model_name, generation)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _renew(self) -> None:
        self.client.set_registered_model_tag(self.name, EXPIRES_TAG, repr(time.time() + self.ttl_s))

    def _heartbeat(self) -> None:
        while not self._stop.wait(self.ttl_s / 3):
            try:
                self._renew()
            except Exception as err:  # a transient server error: the next beat retries; check() decides
                log.warning("promotion lock %s: heartbeat failed (%s)", self.name, err)

    def start_heartbeat(self) -> None:
        self._thread = threading.Thread(target=self._heartbeat, name=f"lease-{self.name}", daemon=True)
        self._thread.start()

    def check(self) -> None:
        """Fencing: call immediately before a write that needs the lock. Renews the lease.

        Raises:
            LockLostError: the lease had expired (someone may have taken over) or a newer generation exists.
        """
        from mlflow.exceptions import MlflowException

        try:
            tags = dict(self.client.get_registered_model(self.name).tags or {})
        except MlflowException as err:
            if tracking_client.is_not_found(err):
                raise LockLostError(f"promotion lock {self.name}: deleted by a newer holder (taken over)") from None
            raise
        if tags.get(TOKEN_TAG) != self.token:
            raise LockLostError(f"promotion lock {self.name}: held by someone else now")
        try:
            expires = float(tags.get(EXPIRES_TAG, "0"))
        except ValueError:
            expires = 0.0
        if expires <= time.time():
            raise LockLostError(
                f"promotion lock {self.name}: the lease expired {time.time() - expires:.0f} s ago (this process "
                f"stalled longer than the {self.ttl_s:g} s TTL); another promotion may have taken over"
            )
        self._renew()  # from here the lease is good for ttl_s, whatever the heartbeat does
        newer = [g for g in lock_generations(self.client, self.model_name) if g > self.generation]
        if newer:
            raise LockLostError(f"promotion lock {self.name}: taken over (generation {max(newer)} exists)")

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        try:
            if (self.client.get_registered_model(self.name).tags or {}).get(TOKEN_TAG) == self.token:
                self.client.set_registered_model_tag(self.name, RELEASED_TAG, "true")
        except Exception as err:  # gone or unreachable: the lease simply expires
            log.warning("releasing promotion lock %s: %s (it expires by itself)", self.name, err)


def _try_take(
    client: MlflowClient, model_name: str, generation: int, token: str, ttl_s: float
) -> PromotionLease | None:
    """Create ``generation``; the lease when this process created it and no newer generation exists."""
    from mlflow.exceptions import MlflowException

    name = _generation_name(model_name, generation)
    tags = {
        TOKEN_TAG: token,
        EXPIRES_TAG: repr(time.time() + ttl_s),
        HOLDER_TAG: f"{socket.gethostname()}:{os.getpid()}",
    }
    try:
        client.create_registered_model(
            name,
            tags=tags,
            description=f"Promotion lock of {model_name!r}, generation {generation} (ddcolor; keep the newest one).",
        )
    except MlflowException as err:
        if "ALREADY_EXISTS" in tracking_client.error_code(err):
            return None  # another racer created this generation first
        raise
    lease = PromotionLease(client, model_name, generation, token, ttl_s)
    generations = lock_generations(client, model_name)
    if any(g > generation for g in generations):
        # our view was stale (an old number recreated after cleanup): not ours; mark it released
        lease.release()
        return None
    for old in (g for g in generations if g < generation):
        with contextlib.suppress(MlflowException):
            client.delete_registered_model(_generation_name(model_name, old))
    return lease


@contextmanager
def promotion_lock(
    client: MlflowClient,
    model_name: str,
    *,
    timeout_s: float = 60.0,
    ttl_s: float = 120.0,
    poll_s: float = 0.2,
) -> Iterator[PromotionLease]:
    """Hold the promotion lock of ``model_name`` (see the module docstring); yields the `PromotionLease`.

    Args:
        client: an MLflow client of the tracking server / registry.
        model_name: the registered model whose champion is moved.
        timeout_s: give up waiting after this many seconds.
        ttl_s: lease length; a holder is taken over only after not renewing it for this long.
        poll_s: wait between attempts while another promotion holds it.

    Raises:
        LockTimeoutError: not acquired within ``timeout_s``.
    """
    token = uuid.uuid4().hex
    deadline = time.monotonic() + timeout_s
    lease = None
    while lease is None:
        generations = lock_generations(client, model_name)
        top = max(generations, default=0)
        if top == 0 or _is_free(generations[top], time.time()):
            if top and generations[top].get(RELEASED_TAG) != "true":
                log.warning("promotion lock of %s: generation %d expired unreleased; taking over", model_name, top)
            lease = _try_take(client, model_name, top + 1, token, ttl_s)
        if lease is None:
            if time.monotonic() > deadline:
                holder = generations.get(top, {}).get(HOLDER_TAG, "?")
                raise LockTimeoutError(
                    f"could not take the promotion lock of {model_name!r} within {timeout_s:g} s: generation {top} "
                    f"is held by {holder} (another promotion is running; a crashed holder's lease expires after "
                    f"{ttl_s:g} s)"
                )
            time.sleep(poll_s)
    lease.start_heartbeat()
    try:
        yield lease
    finally:
        lease.release()


def lease_state(client: MlflowClient, model_name: str) -> dict[str, Any]:
    """For humans and tests: the newest generation and its tags (``{}`` when the lock was never taken)."""
    generations = lock_generations(client, model_name)
    if not generations:
        return {}
    top = max(generations)
    return {"generation": top, "name": _generation_name(model_name, top), **generations[top]}
