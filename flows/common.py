"""Shared flow plumbing: load params.yaml once per flow run and apply command-line overrides."""

from __future__ import annotations

import os
from typing import Any

from cryptoml.config import Params, load_params, replace_section

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")


def params_with(params_path: str, **sections: dict[str, Any] | None) -> Params:
    """params.yaml with ``section={field: value}`` overrides (None values are ignored), validated."""
    params = load_params(params_path)
    for section, changes in sections.items():
        if changes and any(v is not None for v in changes.values()):
            params = replace_section(params, section, **changes)
    return params
