"""A real Hub-protocol server on loopback: olah, in offline mode, serving git work trees the tests build.

huggingface_hub, datasets, transformers and timm reach it through `HF_ENDPOINT`, which they read once at import,
so everything that talks to it runs in a subprocess started with `LoopbackHub.env()`. olah comes with the `test`
extra, beside the python running the tests.

olah 0.5.4 in offline mode answers a request that needs the upstream Hub (a missing file at a branch name, or
`/api/{models,datasets}/ORG/NAME` without a revision) with 401 "repo not found"; it answers them from its revision
cache instead, which `publish` writes for every branch, tag and commit before a client asks.
"""

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

OLAH_CONFIG = """[basic]
host = "127.0.0.1"
port = {port}
repos-path = "{repos}"
mirrors-path = ["{mirrors}"]
# The revision cache `publish` writes must never expire during a test session.
metadata-cache-ttl = 1000000000

[accessibility]
offline = true
"""
KIND_FOLDERS = {"model": "models", "dataset": "datasets"}
SITE_CUSTOMIZE = Path(__file__).with_name("site")  # switches datasets' parquet-export lookup off in every process


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def git(repo: Path, *args: str) -> str:
    return subprocess.run(["git", "-C", str(repo), *args], check=True, capture_output=True, text=True).stdout.strip()


class LoopbackHub:
    """olah on a free loopback port over `root/mirrors/{models,datasets}/ORG/NAME` git work trees."""

    def __init__(self, root: Path):
        self.root = root
        self.mirrors, self.repos, self.logs = root / "mirrors", root / "olah-cache", root / "olah-logs"
        for folder in (self.mirrors, self.repos, self.logs):
            folder.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.config = root / "olah.toml"
        self.config.write_text(OLAH_CONFIG.format(port=self.port, repos=self.repos, mirrors=self.mirrors))
        self.process = None

    def start(self) -> None:
        olah = Path(sys.executable).with_name("olah-cli")
        log = open(self.root / "olah.out", "a")  # noqa: SIM115 - olah writes to it until stopped
        self.process = subprocess.Popen(
            [str(olah), "-c", str(self.config), "--log-path", str(self.logs)], stdout=log, stderr=log
        )
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"olah exited with {self.process.returncode}: {self.output()}")
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return
            except OSError:
                time.sleep(0.1)
        raise RuntimeError(f"olah did not listen on port {self.port} within 30 s: {self.output()}")

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(timeout=30)

    def output(self) -> str:
        return (self.root / "olah.out").read_text()[-3000:]

    def publish(self, kind: str, repo_id: str, files: Path, branch: str = "main", message: str = "upload") -> str:
        """Commit the contents of folder `files` as the whole tree of `repo_id`'s `branch` (created from main if
        new) and return the commit, as an upload to the Hub would."""
        repo = self.mirrors / KIND_FOLDERS[kind] / repo_id
        if not (repo / ".git").exists():
            repo.mkdir(parents=True)
            git(repo, "init", "-q", "-b", "main")
            git(repo, "config", "user.email", "tests@hf-rifle.invalid")
            git(repo, "config", "user.name", "hf_rifle tests")
        if branch != "main":  # a new branch starts from main, as `create_branch` does on the Hub
            known = subprocess.run(["git", "-C", str(repo), "rev-parse", "-q", "--verify", f"refs/heads/{branch}"])
            git(repo, "checkout", "-q", *([branch] if known.returncode == 0 else ["-b", branch]))
        for entry in repo.iterdir():
            if entry.name != ".git":
                shutil.rmtree(entry) if entry.is_dir() else entry.unlink()
        shutil.copytree(files, repo, dirs_exist_ok=True)
        git(repo, "add", "-A")
        git(repo, "commit", "-q", "--allow-empty", "-m", message)
        commit = git(repo, "rev-parse", "HEAD")
        git(repo, "checkout", "-q", "main")
        self.write_revision_cache(kind, repo_id, repo)
        return commit

    def write_revision_cache(self, kind: str, repo_id: str, repo: Path) -> None:
        refs = git(repo, "for-each-ref", "--format=%(refname:short) %(objectname)", "refs/heads", "refs/tags")
        revisions = {}
        for line in refs.splitlines():
            ref, commit = line.split()
            revisions[ref] = revisions[commit] = commit
        for commit in git(repo, "rev-list", "--all").splitlines():
            revisions[commit] = commit
        for revision, commit in revisions.items():
            folder = self.repos / "api" / KIND_FOLDERS[kind] / repo_id / "revision" / revision
            folder.mkdir(parents=True, exist_ok=True)
            envelope = {"status_code": 200, "headers": {"content-type": "application/json"}, "cached_at": time.time()}
            body = json.dumps({"id": repo_id, "sha": commit, "lastModified": "2026-01-01T00:00:00.000Z"})
            for name in ("meta_get.json", "meta_head.json"):
                (folder / name).write_text(json.dumps(envelope))
                (folder / f"{name}.body").write_text(body)

    def env(self, hf_home: Path, **extra: str) -> dict[str, str]:
        return hub_env(self.endpoint, hf_home, **extra)


def hub_env(endpoint: str, hf_home: Path, **extra: str) -> dict[str, str]:
    """The environment of a process that uses the Hub at `endpoint`, with its own cache `hf_home` and no token."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGING_FACE_"))}
    return {
        **env,
        "HF_ENDPOINT": endpoint,
        "HF_HOME": str(hf_home),
        "HF_UPDATE_DOWNLOAD_COUNTS": "0",  # datasets' download counter would call a host of its own
        "PYTHONPATH": os.pathsep.join(filter(None, [str(SITE_CUSTOMIZE), env.get("PYTHONPATH")])),
        "HF_HUB_DISABLE_TELEMETRY": "1",
        "PYTHONUNBUFFERED": "1",
        **extra,
    }
