"""Runs real huggingface_hub pushes (`HfApi().create_repo` as the recipe and Trainer call it, `upload_folder` as
`push_to_hub` does) inside `push_errors_explained`, against the Hub at `HF_ENDPOINT`. argv: JSON {case: [call,
repo_id]} with call "create" or "upload". Prints, per case, the error's type and message and its cause's type and
HTTP status as JSON, or null for a push that went through."""

import json
import sys
import tempfile
from pathlib import Path

from huggingface_hub import HfApi

from hf_rifle.hub import push_errors_explained


def push(call: str, repo_id: str) -> None:
    if call == "create":
        HfApi().create_repo(repo_id, exist_ok=True)
        return
    with tempfile.TemporaryDirectory() as folder:
        Path(folder, "rifle_config.json").write_text("{}\n")
        HfApi().upload_folder(repo_id=repo_id, folder_path=folder)


results = {}
for name, (call, repo_id) in json.loads(sys.argv[1]).items():
    try:
        with push_errors_explained(repo_id, "create" if call == "create" else "upload to"):
            push(call, repo_id)
        results[name] = None
    except Exception as error:
        cause = error.__cause__
        response = getattr(cause, "response", None)
        results[name] = {
            "type": type(error).__name__,
            "message": str(error),
            "cause": type(cause).__name__ if cause is not None else None,
            "cause_status": getattr(response, "status_code", None),
        }
print("RESULTS " + json.dumps(results))
