"""Pushing an export to the Hugging Face Hub with huggingface_hub (create the repo, upload the folder)."""

from __future__ import annotations

import os

from quantkit.errors import QuantkitError


def check_repo_id(repo_id: str) -> str:
    """Return `repo_id` if the hub accepts it as a model repo name, else raise QuantkitError (before any work)."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError as err:
        first = str(err).splitlines()[0] if str(err) else "invalid"
        raise QuantkitError(f"--push-to-hub {repo_id!r} is not a hub repo id ({first}); write it as OWNER/NAME") from None
    return repo_id


def push_export(folder: str | os.PathLike, repo_id: str, *, private: bool | None = None, token: str | None = None,
                commit_message: str | None = None) -> str:
    """Upload an export folder (model card included) to the hub model repo `repo_id`, creating it if needed; return its URL."""
    from huggingface_hub import HfApi

    check_repo_id(repo_id)
    api = HfApi(token=token)
    try:
        url = api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
        api.upload_folder(folder_path=os.fspath(folder), repo_id=repo_id, repo_type="model",
                          commit_message=commit_message or "Upload quantkit export")
    except Exception as err:  # noqa: BLE001 - network, auth and hub errors come in many types; one line each
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise QuantkitError(f"push to the hub repo {repo_id} failed ({type(err).__name__}: {first}); "
                            f"the export stays in {folder}") from None
    return str(url)
