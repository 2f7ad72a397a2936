"""The recipe's dataset and model on the Hub: errors that name the repository, the revision and the Hub; the commit
a run loaded, for its card; and the offline cache, read at the revision asked for.

Offline (`HF_HUB_OFFLINE=1`), `datasets.load_dataset` ignores `revision` and loads whichever version of the
dataset was prepared last, so a run pinned to one commit could silently train on another. The recipe instead
loads the huggingface_hub cache's snapshot of the pinned revision, which is exactly the files fetched for it.
"""

from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from datasets.exceptions import DatasetNotFoundError
from huggingface_hub import constants, snapshot_download
from huggingface_hub.errors import LocalEntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError

from ..hub import exception_chain, hub_endpoint, innermost_reason, is_unreachable

NOT_FOUND_ERRORS = (RepositoryNotFoundError, RevisionNotFoundError, DatasetNotFoundError)
PREPARE_HINT = (
    "fetch it where there is network with the same command plus --prepare_only, then train with HF_HUB_OFFLINE=1 "
    "(docs/distributed.md, 'Compute nodes without network')"
)


@dataclass(frozen=True)
class HubSource:
    """A repository the recipe reads from the Hub, and the flags that name it (for error messages)."""

    kind: str  # "dataset" or "model": huggingface_hub's repo_type
    repo_id: str
    revision: str | None
    id_flag: str
    revision_flag: str

    @property
    def ref(self) -> str:
        return self.revision or "main"

    def __str__(self) -> str:
        return f"{self.kind} {self.repo_id!r} at revision {self.ref!r}"


def where() -> str:
    """Where Hub files come from in this process: the Hub at its endpoint, or only the cache when offline."""
    return "the local cache (HF_HUB_OFFLINE=1)" if constants.HF_HUB_OFFLINE else f"the Hub at {hub_endpoint()}"


def explained_hub_error(error: BaseException, source: HubSource) -> Exception | None:
    """One error that says what could not be loaded, from where, and what to do; None when `error` is not about
    reaching or finding the repository (a bad file inside it, say), which then keeps its own message."""
    chain = list(exception_chain(error))
    if constants.HF_HUB_OFFLINE and any(isinstance(e, LocalEntryNotFoundError) for e in chain):
        return FileNotFoundError(f"{source} is not in the local cache, and HF_HUB_OFFLINE=1 is set: {PREPARE_HINT}.")
    if is_unreachable(error):
        return ConnectionError(
            f"The Hub at {hub_endpoint()} could not be reached to fetch {source}, which is not in the local cache "
            f"({innermost_reason(error)}). Check the network and HF_ENDPOINT; on a machine without network, "
            f"{PREPARE_HINT}."
        )
    if any(isinstance(e, NOT_FOUND_ERRORS) for e in chain):
        return FileNotFoundError(
            f"The Hub at {hub_endpoint()} has no {source}. Check the repository id ({source.id_flag}) and the "
            f"revision ({source.revision_flag}: a branch, tag or commit of that repository); for a private or gated "
            "repository, log in (`hf auth login`) or pass --hub_token."
        )
    return None


@contextmanager
def hub_errors_explained(source: HubSource | None):
    """Re-raise a Hub failure while loading `source` as `explained_hub_error` says it, without the HTTP client's
    traceback; other errors, and everything when `source` is None (a local path), pass unchanged."""
    try:
        yield
    except Exception as error:
        explained = explained_hub_error(error, source) if source else None
        if explained is None:
            raise
        raise explained from None


def cached_snapshot(source: HubSource, cache_dir: str | None = None) -> Path:
    """The cache's folder of `source` at its revision (a branch or tag resolves through the cache's refs), as
    fetched: raises `LocalEntryNotFoundError` when that revision was never fetched."""
    return Path(
        snapshot_download(
            source.repo_id,
            repo_type=source.kind,
            revision=source.ref,
            cache_dir=cache_dir,
            local_files_only=True,
        )
    )


def loaded_commit(source: HubSource, cache_dir: str | None = None) -> str | None:
    """The commit of `source` a run just loaded (its revision as the cache resolved it), or None when unknown."""
    try:
        return cached_snapshot(source, cache_dir).name
    except LocalEntryNotFoundError:
        return None


def revision_record(source: HubSource, commit: str | None) -> tuple[str, str]:
    """The card's line for a Hub source: the revision asked for and the commit it was."""
    resolved = "" if commit in (None, source.ref) else f" (commit {commit})"
    return f"{source.kind} revision", f"{source.ref}{resolved}"
