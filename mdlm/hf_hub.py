"""The Hugging Face Hub: repo ids, downloading a model repo into the local cache, uploading a model directory.

A thin layer over ``huggingface_hub`` (``snapshot_download``, ``HfApi.upload_folder``). Only the files of the model
directory format are downloaded (never pickles, never code); the Hub client's own settings apply: ``HF_HOME`` /
``HF_HUB_CACHE`` for the cache, ``HF_HUB_OFFLINE=1`` to resolve from the cache alone, ``HF_TOKEN`` or
``hf auth login`` for private repos and uploads.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from pathlib import Path

# owner/name, as the Hub spells repo ids: letters, digits, '-', '_', '.'; no leading '.' or '-', no '--' or '..'.
_REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]{0,95}/[A-Za-z0-9][\w.-]{0,95}")


def is_repo_id(text: str | os.PathLike[str]) -> bool:
    """True for ``owner/name`` (a Hugging Face Hub model repo id); False for URLs, absolute or ./ paths, and
    anything with more or fewer parts."""
    value = str(text)
    return bool(_REPO_ID.fullmatch(value)) and "--" not in value and ".." not in value and not value.endswith(".")


def check_repo_id(repo_id: str) -> str:
    """``repo_id`` if it is ``owner/name``; a ``ValueError`` naming the field and value otherwise."""
    if not is_repo_id(repo_id):
        raise ValueError(f"repo_id: expected a Hugging Face Hub repo id 'owner/name', got {repo_id!r}")
    return repo_id


def download_repo(repo_id: str, files: Sequence[str], revision: str | None = None) -> Path:
    """The local snapshot folder of ``repo_id`` at ``revision`` with those of ``files`` that the repo has
    (downloaded into the Hub cache, or found there when offline). Raises ``FileNotFoundError`` naming the repo when
    it cannot be resolved (no such repo or revision, offline and not cached, no network)."""
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id, revision=revision, allow_patterns=list(files)))
    except OSError as exc:  # the client's errors (not found, offline, HTTP) are all OSErrors
        at = f" at revision {revision!r}" if revision else ""
        raise FileNotFoundError(f"model {repo_id!r}: no such local directory, and the Hugging Face Hub repo "
                                f"{repo_id!r}{at} could not be resolved ({type(exc).__name__}: {exc})") from exc


def upload_dir(folder: str | os.PathLike[str], repo_id: str, *, revision: str | None = None,
               private: bool | None = None, token: str | None = None, commit_message: str | None = None) -> str:
    """Create the model repo ``repo_id`` if needed and make its files exactly those of ``folder`` in one commit
    (files of an earlier upload that ``folder`` lacks are deleted; ``.gitattributes`` stays). Returns the commit
    URL."""
    from huggingface_hub import HfApi

    check_repo_id(repo_id)
    api = HfApi(token=token)
    api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
    commit = api.upload_folder(repo_id=repo_id, folder_path=str(folder), repo_type="model", revision=revision,
                               commit_message=commit_message or "Upload mdlm model", delete_patterns="*")
    return str(commit.commit_url)
