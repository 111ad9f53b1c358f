"""Human approval before a challenger becomes champion (``gates.require_approval: true``; off by default).

A version whose gates pass is held: it stays ``@challenger`` with ``approval.status=pending`` (`hold_for_approval`,
called by `ddcolor.pipeline.promote_step`). In the ``train-ddcolor`` flow, `await_approval` then pauses the flow run
for a typed input (`ApprovalInput`: approve, comment, approver), answered in the Prefect UI (the paused run shows a
form) or with ``ddcolor approve RUN_OR_VERSION [--reject] --comment ...`` (`answer`). The answer is recorded on the
version as tags ``approval.status`` (approved | rejected | timed_out), ``approval.by``, ``approval.at`` (UTC) and
``approval.comment``; only an approval moves ``@champion`` (under the promotion lock). Without an answer within
``gates.approval_timeout_hours`` the run ends Completed, "not promoted: approval timed out". A version held by a run
without Prefect (``ddcolor pipeline --no-prefect``) is finished by ``ddcolor approve VERSION`` directly.
"""

from __future__ import annotations

import logging
import uuid
from datetime import UTC, datetime
from typing import TYPE_CHECKING

from prefect.input import RunInput

from ddcolor.errors import DDColorError
from ddcolor.tracking import client as tracking_client

if TYPE_CHECKING:
    from ddcolor.config import Config
    from ddcolor.gates import GateDecision
    from ddcolor.pipeline import PromotionOutcome

__all__ = ["ApprovalError", "ApprovalInput", "answer", "await_approval", "hold_for_approval", "record_approval"]

log = logging.getLogger(__name__)

STATUS_TAG = "approval.status"
FLOW_RUN_TAG = "approval.flow_run_id"


class ApprovalError(DDColorError, ValueError):
    """The version is not awaiting approval, or no such version / flow run; the message says which."""


class ApprovalInput(RunInput):
    """What a person answers to a paused ``train-ddcolor`` run (the Prefect UI renders it as a form)."""

    approve: bool
    comment: str = ""
    approver: str = ""


def _card(config: Config, version: str, decision: GateDecision | None, uri: str) -> str | None:
    try:
        from ddcolor.model_card import attach_model_card

        return attach_model_card(config, version, tracking_uri=uri, decision=decision)
    except Exception as err:  # documentation must not block a decision
        log.warning("could not write the model card of v%s: %s", version, err)
        return None


def hold_for_approval(
    config: Config, version: str, decision: GateDecision, *, tracking_uri: str | None = None
) -> PromotionOutcome:
    """Record a passed gate on `version` and mark it pending: it stays @challenger, the champion does not move."""
    from ddcolor.pipeline import PromotionOutcome
    from ddcolor.registry import BLESSING_TAG, champion_info

    uri = tracking_client.tracking_uri(tracking_uri)
    client = tracking_client.client(uri)
    name = config.registry.model_name
    client.set_model_version_tag(name, version, BLESSING_TAG, decision.to_json())
    client.set_model_version_tag(name, version, STATUS_TAG, "pending")
    client.set_model_version_tag(
        name, version, "approval.requested_at", datetime.now(UTC).isoformat(timespec="seconds")
    )
    champion = champion_info(config, tracking_uri=uri)
    reason = (
        f"awaiting approval: {name} v{version} passed its gates and stays @{config.registry.challenger_alias} until a "
        f"person approves it (`ddcolor approve {version} --comment ...`, or the paused run in the Prefect UI)"
    )
    log.info("promote: %s", reason)
    card = _card(config, version, decision, uri)
    return PromotionOutcome(
        decision, version, False, champion.version if champion else None, reason, card, pending_approval=True
    )


def record_approval(
    config: Config,
    version: str,
    *,
    approved: bool | None,
    approver: str = "",
    comment: str = "",
    tracking_uri: str | None = None,
) -> PromotionOutcome:
    """Record the answer (None = timed out) on a pending version; move @champion to it only when approved.

    Raises:
        ApprovalError: the version is not pending.
    """
    from ddcolor.pipeline import PromotionOutcome
    from ddcolor.registry import blessing, champion_info, promote

    uri = tracking_client.tracking_uri(tracking_uri)
    client = tracking_client.client(uri)
    name, alias = config.registry.model_name, config.registry.champion_alias
    tags = client.get_model_version(name, version).tags or {}
    if tags.get(STATUS_TAG) != "pending":
        raise ApprovalError(
            f"{name} v{version} is not awaiting approval ({STATUS_TAG}: {tags.get(STATUS_TAG, 'none')})"
        )
    decision = blessing(tags)
    if decision is None:
        raise ApprovalError(f"{name} v{version} has no gate decision (blessing tag) to approve")
    status = {True: "approved", False: "rejected", None: "timed_out"}[approved]
    now = datetime.now(UTC).isoformat(timespec="seconds")
    for key, value in {STATUS_TAG: status, "approval.by": approver or "-", "approval.at": now}.items():
        client.set_model_version_tag(name, version, key, value)
    client.set_model_version_tag(name, version, "approval.comment", comment or "-")
    if approved:
        promotion = promote(version, decision, config, tracking_uri=uri)
        champion, promoted = promotion.champion, promotion.promoted
        reason = f"{name} v{version} is the new @{alias}, approved by {approver or '?'} ({comment or 'no comment'}); "
        reason += f"previous: {promotion.previous_champion or 'none'}"
    else:
        current = champion_info(config, tracking_uri=uri)
        champion, promoted = (current.version if current else None), False
        stays = f"@{alias} stays v{champion}" if champion else f"no @{alias} yet"
        why = (
            f"rejected by {approver or '?'}: {comment or 'no comment'}"
            if approved is False
            else f"approval timed out after {config.gates.approval_timeout_hours:g} h"
        )
        reason = f"not promoted: {why}; {stays}"
    log.info("approval: %s", reason)
    card = _card(config, version, decision, uri)
    return PromotionOutcome(decision, version, promoted, champion, reason, card)


def await_approval(config: Config, outcome: PromotionOutcome, *, tracking_uri: str | None = None) -> PromotionOutcome:
    """Inside a Prefect flow run: pause for an `ApprovalInput` (at most ``gates.approval_timeout_hours``), then
    `record_approval`. The version is tagged ``approval.flow_run_id`` so that ``ddcolor approve VERSION`` finds the
    run."""
    from prefect import get_client
    from prefect.exceptions import FlowPauseTimeout
    from prefect.flow_runs import pause_flow_run
    from prefect.runtime import flow_run
    from prefect.states import Running

    uri = tracking_client.tracking_uri(tracking_uri)
    name, version = config.registry.model_name, outcome.version
    tracking_client.client(uri).set_model_version_tag(name, version, FLOW_RUN_TAG, str(flow_run.id))
    timeout = max(1, round(config.gates.approval_timeout_hours * 3600))
    try:
        given = pause_flow_run(
            wait_for_input=ApprovalInput, timeout=timeout, poll_interval=max(1, min(10, timeout // 2)),
            key=f"approval-v{version}",
        )  # fmt: skip
    except FlowPauseTimeout:
        with get_client(sync_client=True) as client:  # back to Running, so the run can end Completed
            client.set_flow_run_state(flow_run.id, Running(message="approval timed out"), force=True)
        return record_approval(config, version, approved=None, tracking_uri=uri)
    return record_approval(
        config, version, approved=given.approve, approver=given.approver or "Prefect UI", comment=given.comment,
        tracking_uri=uri,
    )  # fmt: skip


def answer(
    target: str,
    config: Config,
    *,
    approve: bool,
    comment: str = "",
    approver: str = "",
    tracking_uri: str | None = None,
) -> str:
    """``ddcolor approve``: answer the run waiting on `target` (a flow run id, or a version number whose
    ``approval.flow_run_id`` names it); a pending version without a waiting run is finished here. Returns one line.

    Raises:
        ApprovalError: unknown version, or not pending.
    """
    from prefect.flow_runs import resume_flow_run

    given = {"approve": approve, "comment": comment, "approver": approver}
    try:
        run_id = uuid.UUID(target)
    except ValueError:
        run_id = None
    if run_id is None:
        from mlflow.exceptions import MlflowException

        name = config.registry.model_name
        try:
            tags = tracking_client.client(tracking_uri).get_model_version(name, target).tags or {}
        except MlflowException as err:
            raise ApprovalError(f"no version {target!r} of {name!r}: {err}") from None
        if tags.get(STATUS_TAG) != "pending":
            raise ApprovalError(
                f"{name} v{target} is not awaiting approval ({STATUS_TAG}: {tags.get(STATUS_TAG, 'none')})"
            )
        if not tags.get(FLOW_RUN_TAG):
            return record_approval(
                config, target, approved=approve, approver=approver, comment=comment, tracking_uri=tracking_uri
            ).reason
        run_id = uuid.UUID(tags[FLOW_RUN_TAG])
    resume_flow_run(run_id, run_input=given)
    return f"{'approved' if approve else 'rejected'}: flow run {run_id} resumed with the answer"
