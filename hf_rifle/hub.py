"""Errors from the Hugging Face Hub, said in one line that names the Hub, the repository and the way out.

huggingface_hub, datasets and transformers report a Hub that cannot be reached, or a repository that does not
exist, as a chain of exceptions ending deep in the HTTP client (httpx, or httpx2 from huggingface_hub 2): these
helpers read that chain and say what failed, where, and what to do, without the client's traceback.
"""

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from huggingface_hub import constants
from huggingface_hub.errors import HfHubHTTPError, HFValidationError
from huggingface_hub.utils import validate_repo_id

# Exception classes, by name in their class hierarchy, that mean the server was not reached: httpx and httpx2 name
# their base TransportError, requests and builtins ConnectionError.
UNREACHABLE_CLASS_NAMES = {"TransportError", "ConnectionError", "TimeoutError", "OfflineModeIsEnabled"}


def hub_endpoint() -> str:
    """The Hub this process talks to: `HF_ENDPOINT` as huggingface_hub read it at import."""
    return constants.ENDPOINT


def is_hub_id(name: str | None) -> bool:
    """Whether `name` names a Hub repository rather than something on this disk."""
    if not name or Path(name).exists():
        return False
    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return True


def exception_chain(error: BaseException) -> Iterator[BaseException]:
    """`error`, then what caused it (`raise ... from`) or was being handled when it was raised, outermost first."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        yield error
        error = error.__cause__ or error.__context__


def is_unreachable(error: BaseException) -> bool:
    """Whether the chain holds a failure to reach the server (refused, unknown host, timed out, offline mode)."""
    return any(
        cls.__name__ in UNREACHABLE_CLASS_NAMES for cause in exception_chain(error) for cls in type(cause).__mro__
    )


def innermost_reason(error: BaseException) -> str:
    """The first line of the deepest exception of the chain, with its type: what actually failed."""
    *_, innermost = exception_chain(error)
    first_line = str(innermost).strip().splitlines()[0] if str(innermost).strip() else ""
    return f"{type(innermost).__name__}: {first_line}" if first_line else type(innermost).__name__


def push_repo_id(args) -> str:
    """The repository `push_to_hub` creates and uploads to, by Trainer's rule: `hub_model_id`, else the name of
    the output folder (in the token owner's namespace)."""
    return args.hub_model_id or Path(args.output_dir).absolute().name


def hub_answer(error: BaseException) -> tuple[int | None, str]:
    """The HTTP status of the first Hub answer in the chain (`HfHubHTTPError`) and its reason, the server's own
    message where it sent one (the Hub says why it refused, e.g. "Invalid credentials in Authorization header"),
    else the status's phrase. (None, the chain's innermost error) where no answer came."""
    for cause in exception_chain(error):
        response = getattr(cause, "response", None) if isinstance(cause, HfHubHTTPError) else None
        if response is not None and getattr(response, "status_code", None) is not None:
            phrase = getattr(response, "reason_phrase", None) or getattr(response, "reason", None) or ""
            message = (cause.server_message or "").strip().splitlines()
            return int(response.status_code), ": ".join(filter(None, [phrase, message[0] if message else ""]))
    return None, innermost_reason(error)


def refusal(status: int | None, request: str, reason: str, saved: str) -> Exception:
    """The error for a Hub that answered `status` to `request` ("create ORG/NAME"), by what the status means and
    what fixes it: 401/403 the token and its rights, 404 the repository id, 405 an endpoint that takes no uploads
    (HF_ENDPOINT set to a mirror), 429 and 5xx a busy or failing Hub, which passes (retry later). `saved` says where
    the run's files wait, if anywhere."""
    hub = f"The Hub at {hub_endpoint()}"
    give_up = "or drop --push_to_hub (push_to_hub=False) to train without uploading."
    if status in (401, 403):
        return PermissionError(
            f"{hub} refused to {request} (HTTP {status} {reason}): the token is missing or invalid, or has no "
            f"write rights there.{saved} Log in with a token that may write to that namespace (`hf auth login`, "
            f"HF_TOKEN or --hub_token), check the repository id (--hub_model_id) and HF_ENDPOINT, {give_up}"
        )
    if status == 404:
        return FileNotFoundError(
            f"{hub} could not {request} (HTTP 404 {reason}): it has no such repository or namespace.{saved} Check "
            f"the repository id (--hub_model_id: ORG/NAME, ORG your user or an organization the token belongs to) "
            f"and HF_ENDPOINT, {give_up}"
        )
    if status == 405:
        return PermissionError(
            f"{hub} refused to {request} (HTTP 405 {reason}): it does not take uploads, as a read-only mirror of the "
            f"Hub does not.{saved} Point HF_ENDPOINT at the Hub itself (or unset it) to push, {give_up}"
        )
    if status == 429:
        return ConnectionError(
            f"{hub} is busy: it rate-limited the request to {request} (HTTP 429 {reason}).{saved} Retry in a few "
            f"minutes, {give_up}"
        )
    if status is not None and status >= 500:
        return ConnectionError(
            f"{hub} failed to {request} (HTTP {status} {reason}): a fault or an overload on the Hub's side, which "
            f"usually passes.{saved} Retry in a few minutes, {give_up}"
        )
    answer = f"HTTP {status} {reason}" if status is not None else reason
    return PermissionError(
        f"{hub} refused to {request} ({answer}).{saved} Check that the token can write there (`hf "
        f"auth login`, HF_TOKEN or --hub_token), the repository id (--hub_model_id) and HF_ENDPOINT, {give_up}"
    )


@contextmanager
def push_errors_explained(repo_id: str, action: str, output_dir: str | None = None):
    """Turn a failed repository creation or upload into an error that says which Hub, which repository, and
    what to do, by what went wrong (`refusal`); after training (`output_dir` given) it also says that nothing was
    lost and how to upload later. A Hub that answered stays the new error's cause (`__cause__`), with its
    status, request id and server message, for whoever needs more than the one line."""
    try:
        yield
    except Exception as error:
        if not (is_unreachable(error) or any(isinstance(e, HfHubHTTPError) for e in exception_chain(error))):
            raise
        saved = (
            f" The model, its card and metrics are saved in {Path(output_dir).resolve()}: upload them later with "
            f"`hf upload {repo_id} {output_dir}`."
            if output_dir
            else ""
        )
        if is_unreachable(error):
            raise ConnectionError(
                f"The Hub at {hub_endpoint()} could not be reached to {action} {repo_id} ({innermost_reason(error)})."
                f"{saved} Check the network and HF_ENDPOINT, and that your token can write there (`hf auth login`, "
                "HF_TOKEN or --hub_token); or drop --push_to_hub (push_to_hub=False) to train without uploading."
            ) from None
        status, reason = hub_answer(error)
        raise refusal(status, f"{action} {repo_id}", reason, saved) from error
