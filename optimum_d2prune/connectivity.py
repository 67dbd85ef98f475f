"""Is the Hugging Face Hub reachable? Asked once, quickly, before a run depends on it.

transformers and datasets retry a failed Hub request for up to a minute before giving up; a run that will need
the Hub asks here first (a 3-second TCP connection) so that an offline user hears so at once, with the local
alternatives, instead of after the model has loaded.
"""

from __future__ import annotations

import os
import socket
from typing import Optional
from urllib.parse import urlparse

_TRUE = ("1", "on", "yes", "true")


def hub_offline_reason(timeout: float = 3.0) -> Optional[str]:
    """`None` when the Hub endpoint accepts a connection, else why not (offline mode set, DNS, refused...)."""
    for variable in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        if os.environ.get(variable, "").strip().lower() in _TRUE:
            return f"{variable} is set"
    from huggingface_hub import constants

    url = urlparse(constants.ENDPOINT)
    host, port = url.hostname or "huggingface.co", url.port or (443 if url.scheme == "https" else 80)
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return None
    except OSError as err:
        return f"{host}:{port} is not reachable ({err.strerror or type(err).__name__})"
