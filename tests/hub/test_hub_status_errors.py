"""A Hub that answers a push with an error is read by its status: 401/403 name the token and its rights, 404 the
repository id, 405 an endpoint that takes no uploads, 429 and 5xx a busy or failing Hub to retry later; the Hub's
answer stays the error's cause. Real huggingface_hub requests: to the loopback Hub (olah, a read-only mirror) for
the statuses it gives, and to a minimal HTTP server on loopback answering the others, as the Hub does."""

import http.server
import json
import threading
from pathlib import Path

import pytest

from .conftest import run_python
from .server import hub_env

pytestmark = [pytest.mark.multiprocess, pytest.mark.slow]

PUSH_WORKER = Path(__file__).with_name("push_status_worker.py")
BAD_STATUSES = {401: "Invalid credentials in Authorization header", 403: "You don't have the rights to create"}
BUSY_STATUSES = {429: "Rate limit reached", 500: "Internal Error", 502: "Bad Gateway", 503: "Service Unavailable"}


class StatusHub(http.server.BaseHTTPRequestHandler):
    """Answers every request about repository `ORG/status-NNN` with HTTP NNN and the Hub's JSON error body: the
    repository creation (`POST /api/repos/create`, name in the body) and the `repo_info` that follows a refused
    `create_repo(exist_ok=True)`."""

    def answer(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        text = self.path + (self.rfile.read(length).decode() if length else "")
        status = next((code for code in {**BAD_STATUSES, **BUSY_STATUSES} if f"status-{code}" in text), 404)
        body = json.dumps({"error": {**BAD_STATUSES, **BUSY_STATUSES}.get(status, "Not Found")}).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_GET = do_POST = do_HEAD = do_PUT = answer

    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def status_hub():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), StatusHub)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def push_errors(env: dict, cases: dict[str, list[str]]) -> dict[str, dict]:
    result = run_python(env, PUSH_WORKER, json.dumps(cases), timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    return json.loads(result.stdout.split("RESULTS ", 1)[1])


def test_token_and_busy_statuses_each_say_their_fix_and_keep_the_hubs_answer(status_hub, tmp_path):
    statuses = [*BAD_STATUSES, *BUSY_STATUSES]
    cases = {str(code): ["create", f"someone/status-{code}"] for code in statuses}
    errors = push_errors(hub_env(status_hub, tmp_path / "hf-home"), cases)

    for code in statuses:
        error = errors[str(code)]
        assert error is not None, f"{code}: the push should have failed"
        assert status_hub in error["message"] and f"someone/status-{code}" in error["message"], error["message"]
        assert f"HTTP {code}" in error["message"], error["message"]
        assert {**BAD_STATUSES, **BUSY_STATUSES}[code] in error["message"]  # the Hub's own reason
        assert error["cause"] in ("HfHubHTTPError", "RepositoryNotFoundError") and error["cause_status"] == code
    for code in BAD_STATUSES:
        assert errors[str(code)]["type"] == "PermissionError"
        assert "token" in errors[str(code)]["message"] and "write rights" in errors[str(code)]["message"]
        assert "Retry" not in errors[str(code)]["message"]
    for code in BUSY_STATUSES:
        assert errors[str(code)]["type"] == "ConnectionError"
        assert "Retry in a few minutes" in errors[str(code)]["message"]
        assert "token" not in errors[str(code)]["message"], errors[str(code)]["message"]
    assert "is busy" in errors["429"]["message"]
    assert "on the Hub's side" in errors["503"]["message"]


def test_the_loopback_hub_refuses_uploads_and_misses_repositories_each_in_its_own_words(loopback_hub, tmp_path):
    hub, _ = loopback_hub
    errors = push_errors(
        hub.env(tmp_path / "hf-home"),
        {"create": ["create", "someone/rifle-run"], "missing repository": ["upload", "someone/no-such-repo"]},
    )

    missing = errors["missing repository"]
    assert missing["type"] == "FileNotFoundError" and missing["cause_status"] == 404
    assert "HTTP 404" in missing["message"] and "upload to someone/no-such-repo" in missing["message"]
    assert "repository id" in missing["message"] and "write rights" not in missing["message"], missing["message"]
    read_only = errors["create"]  # olah is a mirror: it answers a repository creation with 405
    assert read_only["type"] == "PermissionError" and read_only["cause_status"] == 405
    assert "refused to create someone/rifle-run" in read_only["message"] and "HF_ENDPOINT" in read_only["message"]
    assert "mirror" in read_only["message"]
