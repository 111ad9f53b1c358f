"""Prefect automations kept in the repository (``infra/prefect/automations.yaml``), applied by one command.

``ddcolor automations apply`` (or `apply_automations`) reads the file, creates or updates the notification block it
names from the environment (``url_env``, e.g. ``DDCOLOR_NOTIFY_WEBHOOK_URL``), and creates or replaces each
automation by name on the Prefect server in ``PREFECT_API_URL``: applying twice leaves one automation of each name.

File format: ``notification_block: {type: custom-webhook | slack-webhook, name, url_env}`` and ``automations:`` a list
in Prefect's own automation schema (`prefect.automations.Automation`: name, description, trigger, actions), where
an action's ``block_document_id: notification_block`` stands for the id of that block.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from ddcolor.errors import DDColorError

__all__ = ["DEFAULT_FILE", "AutomationsError", "apply_automations", "load_automations"]

DEFAULT_FILE = Path("infra/prefect/automations.yaml")
_PLACEHOLDER = "notification_block"


class AutomationsError(DDColorError, ValueError):
    """A bad automations file or a missing environment variable; the message names the file and what to do."""


def load_automations(path: str | Path = DEFAULT_FILE) -> dict[str, Any]:
    """The parsed file, checked: ``{"notification_block": {...}, "automations": [{...}, ...]}``.

    Raises:
        AutomationsError: missing file, bad YAML, or a missing / malformed key (named).
    """
    from prefect.automations import AutomationCore

    path = Path(path)
    if not path.is_file():
        raise AutomationsError(f"{path}: no such file (the automations live in {DEFAULT_FILE})")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise AutomationsError(f"{path}: invalid YAML: {err}") from None
    block = data.get("notification_block")
    if not isinstance(block, dict) or not {"type", "name", "url_env"} <= set(block):
        raise AutomationsError(f"{path}: notification_block: needs type, name and url_env")
    if block["type"] not in ("custom-webhook", "slack-webhook"):
        raise AutomationsError(f"{path}: notification_block.type: expected custom-webhook or slack-webhook")
    automations = data.get("automations")
    if not isinstance(automations, list) or not automations:
        raise AutomationsError(f"{path}: automations: expected a non-empty list")
    for i, spec in enumerate(automations):
        try:
            AutomationCore.model_validate(_with_block_id(spec, "00000000-0000-0000-0000-000000000000"))
        except Exception as err:
            raise AutomationsError(f"{path}: automations[{i}] ({spec.get('name', '?')}): {err}") from None
    return data


def _with_block_id(spec: Mapping[str, Any], block_id: str) -> dict[str, Any]:
    actions = [
        {**a, "block_document_id": block_id} if a.get("block_document_id") == _PLACEHOLDER else dict(a)
        for a in spec.get("actions", [])
    ]
    return {**spec, "actions": actions}


def _save_block(block: Mapping[str, Any], environ: Mapping[str, str]) -> str:
    """Create or overwrite the notification block; its document id."""
    from prefect.blocks.notifications import CustomWebhookNotificationBlock, SlackWebhook

    url = environ.get(block["url_env"], "").strip()
    if not url:
        raise AutomationsError(
            f"{block['url_env']} is not set: export the webhook URL notifications go to (see {DEFAULT_FILE})"
        )
    if block["type"] == "slack-webhook":
        notifier = SlackWebhook(url=url)
    else:
        notifier = CustomWebhookNotificationBlock(
            name=block["name"], url=url, json_data={"subject": "{{subject}}", "body": "{{body}}"}
        )
    return str(notifier.save(block["name"], overwrite=True))


def apply_automations(path: str | Path = DEFAULT_FILE, environ: Mapping[str, str] | None = None) -> list[str]:
    """Create or replace (by name) every automation of the file on the Prefect server; return their names.

    Raises:
        AutomationsError: see `load_automations`; the block's URL variable is unset.
    """
    from prefect.automations import Automation

    data = load_automations(path)
    block_id = _save_block(data["notification_block"], os.environ if environ is None else environ)
    names = []
    for spec in data["automations"]:
        automation = Automation.model_validate(_with_block_id(spec, block_id))
        _delete_named(automation.name)
        automation.create()
        names.append(automation.name)
    return names


def _delete_named(name: str) -> None:
    from prefect import get_client

    with get_client(sync_client=True) as client:
        for existing in client.read_automations_by_name(name):
            client.delete_automation(existing.id)
