"""The Hugging Face Hub: repo ids, is the Hub reachable, may this user push there, where a model came from, push.

A push is checked before any work (`check_push_access`: the repo id, a token, the Hub answering, the right to
write to the namespace), so that a run does not prune for an hour and then fail on a missing login; a push that
still fails after the model was saved says where the model is and the one command that retries it.
This module imports neither torch nor transformers at import time (the CLI imports it at every start).
"""

from __future__ import annotations

import logging
import os
import re
import shlex
import socket
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional, Union
from urllib.parse import urlparse

from ..errors import InputError, OutputPathError

if TYPE_CHECKING:
    from torch import nn

logger = logging.getLogger(__name__)

PathLike = Union[str, os.PathLike]

#: a Hub model id: "name" (canonical models such as "gpt2") or "namespace/name"
REPO_ID_RE = re.compile(r"^(?:[A-Za-z0-9][\w.-]*/)?[A-Za-z0-9][\w.-]*$")
_LICENSE_RE = re.compile(r"^[A-Za-z0-9][\w.+-]*$")
_TRUE = ("1", "on", "yes", "true")
CARD_NAME = "README.md"


def is_repo_id(text: Any, namespace: bool = False) -> bool:
    """Whether `text` is a Hub model id (`namespace=True`: of the form "user/name", as a push needs)."""
    if not isinstance(text, str) or len(text) > 96 or ".." in text or "--" in text:
        return False
    return bool(REPO_ID_RE.match(text)) and (not namespace or "/" in text)


# --------------------------------------------------------------------------------------------- reachability
def hub_offline_reason(timeout: float = 3.0) -> Optional[str]:
    """`None` when the Hub endpoint accepts a connection, else why not (offline mode set, DNS, refused...).

    transformers and datasets retry a failed Hub request for up to a minute; a run that will need the Hub asks
    here first (a 3-second TCP connection) so that an offline user hears so at once.
    """
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


# ---------------------------------------------------------------------------------------------- push access
def check_push_access(repo_id: str, token: Optional[str] = None, private: bool = False) -> str:
    """Refuse, before any work, a push that cannot succeed; return the user name the token belongs to.

    Checks: `repo_id` is "user/name"; a token is available (`token`, else `HF_TOKEN` / `hf auth login`); the Hub
    answers (`HfApi.whoami`); the token may write (not a read-only token) and the user may write to the namespace
    (their own name, or an organization they belong to with a role other than "read"). `private` only shapes the
    messages (a private repository needs the same rights). Raises `InputError` for a malformed id and
    `OutputPathError` for every other refusal, each in one line with what to do.
    """
    if not is_repo_id(repo_id, namespace=True):
        raise InputError(f'The Hub repository id must look like "user/name", got {repo_id!r}.')
    import huggingface_hub

    token = token or huggingface_hub.get_token()
    if not token:
        raise OutputPathError(f"Cannot push to {repo_id}: no Hugging Face token. Log in with `hf auth login` or set "
                              "HF_TOKEN (a token with write access), or drop --push-to-hub and upload later with "
                              "`hf upload`.")
    offline = hub_offline_reason()
    if offline is not None:
        raise OutputPathError(f"Cannot push to {repo_id}: the Hugging Face Hub is not reachable ({offline}). Drop "
                              "--push-to-hub and upload the saved folder later with `hf upload`.")
    api = huggingface_hub.HfApi(token=token)
    try:
        me = api.whoami()
    except Exception as err:  # noqa: BLE001 - every failure here means "cannot push": said in one line
        status = getattr(getattr(err, "response", None), "status_code", None)
        reason = "the token is invalid or expired" if status == 401 else f"{type(err).__name__}: {err}"
        raise OutputPathError(f"Cannot push to {repo_id}: the Hub did not confirm the token ({reason}). Log in "
                              "again with `hf auth login` or set HF_TOKEN.") from None
    user = str(me.get("name", ""))
    access = ((me.get("auth") or {}).get("accessToken") or {}).get("role")
    if access == "read":
        raise OutputPathError(f"Cannot push to {repo_id}: the token of {user} is read-only. Create a token with "
                              "write access (https://huggingface.co/settings/tokens) and log in with it.")
    namespace = repo_id.split("/")[0]
    roles = {str(o.get("name")): o.get("roleInOrg") for o in me.get("orgs") or [] if isinstance(o, dict)}
    if namespace != user and namespace not in roles:
        allowed = ", ".join([user, *sorted(roles)]) or "none"
        raise OutputPathError(f"Cannot push to {repo_id}: {user or 'this token'} may not write to the namespace "
                              f"{namespace!r} (namespaces of this token: {allowed}). Choose a repository in one of "
                              "them.")
    if namespace != user and roles.get(namespace) == "read":
        raise OutputPathError(f"Cannot push to {repo_id}: {user} has the read role in {namespace!r}. Ask an admin "
                              "of the organization for write access, or push to your own namespace.")
    logger.info("The Hub accepts %s as %s%s.", repo_id, user, " (private)" if private else "")
    return user


def retry_command(folder: PathLike, repo_id: str, private: bool = False) -> str:
    """The shell command that uploads a saved folder (huggingface_hub's CLI)."""
    return f"hf upload {shlex.quote(repo_id)} {shlex.quote(os.fspath(folder))}" + (" --private" if private else "")


# ----------------------------------------------------------------------------------- where the model came from
def _valid_base_model(value: Any, origin: str) -> Optional[str]:
    if value is None:
        return None
    if isinstance(value, str) and is_repo_id(value):
        return value
    logger.warning("Ignoring base_model %r from %s: not a Hub repository id.", str(value)[:80], origin)
    return None


def _valid_license(value: Any, origin: str) -> Optional[str]:
    if value is None:
        return None
    if isinstance(value, str) and _LICENSE_RE.match(value) and len(value) <= 64:
        return value
    logger.warning("Ignoring license %r from %s: not a license identifier.", str(value)[:80], origin)
    return None


def _gguf_source(model: "nn.Module", folder: Optional[Path]):
    """The GGUF file the model was dequantized from: named by its GGUF `quantization_config`, else the one GGUF
    file of a source folder that has no config.json (so the weights cannot have come from anything else)."""
    from .gguf import is_gguf_quantization, read_gguf_info

    quantization = getattr(model.config, "quantization_config", None)
    name = None
    if is_gguf_quantization(quantization):
        name = quantization.get("gguf_file") if isinstance(quantization, dict) else getattr(quantization, "gguf_file",
                                                                                             None)
    if folder is None:
        return None
    if name and (folder / name).is_file():
        return read_gguf_info(folder / name)
    ggufs = sorted(folder.glob("*.gguf"))
    if len(ggufs) == 1 and not (folder / "config.json").is_file():
        return read_gguf_info(ggufs[0])
    return None


def base_model_info(model: "nn.Module", base_model: Optional[str] = None) -> dict[str, Any]:
    """`{"base_model": Hub id or None, "license": ..., "gguf": GgufInfo or None}` of the model that was pruned.

    From the local folder it came from (its card, or the metadata of its GGUF file), else the Hub card of
    `base_model` / a Hub id in `config._name_or_path` (skipped quietly when offline). Every value is validated: a
    `base_model` that is not a Hub id, or a license that is not an identifier, is dropped with a warning.
    """
    name = getattr(model.config, "_name_or_path", None) or ""
    info: dict[str, Any] = {"base_model": None, "license": None, "gguf": None}
    path = Path(name) if name else None
    folder = path if path is not None and path.is_dir() else None
    if folder is not None:
        card = folder / CARD_NAME
        if card.is_file():
            try:
                from huggingface_hub import ModelCard

                data = ModelCard.load(card).data
                info["license"] = _valid_license(data.license, str(card))
                info["base_model"] = _valid_base_model(data.base_model, str(card))
            except Exception as err:  # noqa: BLE001 - a malformed card only costs us the inherited metadata
                logger.warning("Could not read the model card %s (%s); license not inherited.", card, err)
        gguf = _gguf_source(model, folder)
        if gguf is not None:
            info["gguf"] = gguf
            info["base_model"] = info["base_model"] or _valid_base_model(gguf.base_model, gguf.file)
            info["license"] = info["license"] or _valid_license(gguf.license, gguf.file)
    elif name and is_repo_id(name):
        info["base_model"] = name
    if base_model:
        if not is_repo_id(base_model):
            raise InputError(f"`base_model` must be a Hub repository id such as HuggingFaceTB/SmolLM2-135M, got "
                             f"{base_model!r}.")
        info["base_model"] = base_model
    if info["license"] is None and info["base_model"]:
        offline = hub_offline_reason()
        if offline is not None:  # don't spend transformers' minute of retries on a card we cannot get
            logger.info("License of %s not inherited (%s).", info["base_model"], offline)
            return info
        try:
            from huggingface_hub import ModelCard

            card_license = ModelCard.load(info["base_model"]).data.license
            info["license"] = _valid_license(card_license, info["base_model"])
        except Exception as err:  # noqa: BLE001 - offline or private: the card is still written, without a license
            logger.info("License of %s not inherited (%s: %s).", info["base_model"], type(err).__name__, err)
    return info


# ----------------------------------------------------------------------------------------------------- push
def checkpoint_files(save_dir: PathLike) -> list[str]:
    """Relative paths of the files a checkpoint folder holds (what `push_to_hub` uploads), sorted."""
    root = Path(save_dir)
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*")
                  if p.is_file() and not any(part.startswith(".") for part in p.relative_to(root).parts))


def push_to_hub(
    source: Union[PathLike, "nn.Module"],
    repo_id: str,
    *,
    private: bool = False,
    token: Optional[str] = None,
    commit_message: Optional[str] = None,
    revision: Optional[str] = None,
    **save_kwargs: Any,
) -> str:
    """Upload a saved checkpoint folder (or save a pruned model first) to the Hugging Face Hub.

    Args:
        source: a folder written by `save_pruned`, or a pruned model (then `config=`, `report=`, `tokenizer=`
            ... are passed to `save_pruned` through `save_kwargs` and a temporary folder is uploaded).
        repo_id: `"user/name"`; the repository is created if needed.
        private: create the repository as private.
        token: Hub token; default: the one from `HF_TOKEN` or `hf auth login`.

    Returns:
        The URL of the commit.

    Raises:
        OutputPathError: the upload failed; for a folder, the message names it and the `hf upload` command that
            retries the push.
    """
    from torch import nn

    from .save_load import read_record, save_pruned

    if not is_repo_id(repo_id, namespace=True):
        raise InputError(f'`repo_id` must look like "user/name", got {repo_id!r}.')
    if isinstance(source, nn.Module):
        if "config" not in save_kwargs:
            raise InputError("Pushing a model needs its `config=` (the D2PruneConfig), or push a saved folder.")
        with tempfile.TemporaryDirectory(prefix="d2prune-push-") as tmp:
            folder = save_pruned(source, Path(tmp) / "checkpoint", **save_kwargs)
            return _upload(folder, repo_id, private, token, commit_message, revision, kept=False)
    if save_kwargs:
        raise InputError(f"{sorted(save_kwargs)} only apply when pushing a model, not a saved folder.")
    folder = Path(source)
    read_record(folder)  # raises when the folder is not a d2prune checkpoint
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"{folder} has no config.json: save the model with `D2Pruner.save` first.")
    return _upload(folder, repo_id, private, token, commit_message, revision, kept=True)


def _upload(folder: Path, repo_id: str, private: bool, token: Optional[str], commit_message: Optional[str],
            revision: Optional[str], kept: bool) -> str:
    """`create_repo` + `upload_folder`; a failure says how to retry (`kept`: `folder` stays on disk)."""
    from huggingface_hub import HfApi

    files = checkpoint_files(folder)
    api = HfApi(token=token)
    try:
        api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        logger.info("Uploading %d files from %s to %s.", len(files), folder, repo_id)
        commit = api.upload_folder(
            folder_path=str(folder),
            repo_id=repo_id,
            repo_type="model",
            revision=revision,
            allow_patterns=files,
            commit_message=commit_message or "Upload model pruned with optimum-d2prune",
        )
    except Exception as err:  # noqa: BLE001 - whatever the Hub said, the saved folder is what matters
        first = str(err).strip().splitlines()[0] if str(err).strip() else ""
        retry = (f"The model is saved at {folder.absolute()}; retry the push with: "
                 f"{retry_command(folder.absolute(), repo_id, private)}" if kept else
                 "Nothing was kept: save the model with `save_pruned`, then push the folder.")
        raise OutputPathError(f"Pushing to {repo_id} failed ({type(err).__name__}: {first}). {retry}") from err
    return str(getattr(commit, "commit_url", commit))
