"""Crash-safe checkpoints: written atomically, verified before a resume, torn ones set aside.

transformers' Trainer writes `checkpoint-N` in place and resumes from the newest such folder even when the
process died while writing it (a missing `trainer_state.json`, a truncated `model.safetensors`), so every
re-run fails until the folder is deleted by hand. `RifleTrainer` instead writes each checkpoint into a staging
folder, flushes every file to disk, writes a manifest of the files and their sizes last, and renames the
folder into place; a resume takes the newest checkpoint whose files all check out, and moves torn ones aside
(never deleting them: they may hold the only copy of some work).
"""

import json
import logging
import os
import re
import struct
import time
import zipfile
from pathlib import Path

logger = logging.getLogger(__name__)

MANIFEST = "hf_rifle_checkpoint.json"
STAGING_DIR = ".hf_rifle-staging"  # where checkpoints are written before being renamed into place
SET_ASIDE_PREFIX = "incomplete-"  # torn checkpoints are renamed to incomplete-checkpoint-N-<time>
CHECKPOINT_NAME = re.compile(r"^checkpoint-(\d+)$")
TRAINER_STATE = "trainer_state.json"
TORCH_ZIP_SUFFIXES = (".pt", ".pth", ".bin")  # torch.save's zip format


def _fsync(path: Path) -> None:
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def finalize_checkpoint_(folder) -> None:
    """Flush every file of `folder` to disk, then write the manifest (itself flushed) as the last file."""
    folder = Path(folder)
    files = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST):
        _fsync(path)
        files[path.relative_to(folder).as_posix()] = path.stat().st_size
    temporary = folder / f"{MANIFEST}.tmp"
    temporary.write_text(json.dumps({"files": files}, indent=1, sort_keys=True) + "\n")
    _fsync(temporary)
    temporary.rename(folder / MANIFEST)
    _fsync(folder)


def checkpoint_problems(folder) -> list[str]:
    """What makes `folder` unusable for a resume; empty when it is complete.

    With a manifest, every listed file must exist with its recorded size. With or without one (checkpoints
    written by a plain Trainer have none), `trainer_state.json` must parse, every safetensors file must hold
    its whole header and data, and every torch file its zip directory.
    """
    folder = Path(folder)
    problems = []
    manifest = folder / MANIFEST
    if manifest.is_file():
        try:
            listed = json.loads(manifest.read_text())["files"]
        except (ValueError, KeyError) as error:
            return [f"{MANIFEST} is unreadable ({error})"]
        for name, size in listed.items():
            path = folder / name
            if not path.is_file():
                problems.append(f"{name} is missing")
            elif path.stat().st_size != size:
                problems.append(f"{name} has {path.stat().st_size} bytes, {size} were written")
    if not (folder / TRAINER_STATE).is_file():
        problems.append(f"{TRAINER_STATE} is missing")
    reported = {problem.split(" ", 1)[0] for problem in problems}
    for path in sorted(p for p in folder.iterdir() if p.is_file() and p.name not in reported):
        if problem := _file_problem(path):
            problems.append(problem)
    return problems


def _file_problem(path: Path) -> str | None:
    try:
        if path.name == TRAINER_STATE:
            json.loads(path.read_text())
        elif path.suffix == ".safetensors":
            with open(path, "rb") as handle:
                (header_size,) = struct.unpack("<Q", handle.read(8))
                header = json.loads(handle.read(header_size))
            end = max((info["data_offsets"][1] for key, info in header.items() if key != "__metadata__"), default=0)
            if path.stat().st_size < 8 + header_size + end:
                return f"{path.name} is truncated ({path.stat().st_size} of {8 + header_size + end} bytes)"
        elif path.suffix in TORCH_ZIP_SUFFIXES:
            with zipfile.ZipFile(path) as archive:
                archive.infolist()
    except (ValueError, struct.error, zipfile.BadZipFile, UnicodeDecodeError, OSError) as error:
        return f"{path.name} is unreadable ({type(error).__name__}: {error})"
    return None


def newest_complete_checkpoint(output_dir) -> str | None:
    """The newest `checkpoint-N` in `output_dir` that is complete; newer torn ones are set aside with a warning."""
    folder = Path(output_dir)
    if not folder.is_dir():
        return None
    checkpoints = sorted(
        (int(match.group(1)), path)
        for path in folder.iterdir()
        if path.is_dir() and (match := CHECKPOINT_NAME.match(path.name))
    )
    for _, path in reversed(checkpoints):
        problems = checkpoint_problems(path)
        if not problems:
            return str(path)
        set_aside = path.with_name(f"{SET_ASIDE_PREFIX}{path.name}-{time.strftime('%Y%m%d-%H%M%S')}")
        path.rename(set_aside)
        logger.warning(
            "Checkpoint %s is incomplete (%s), probably written by a process that was killed: moved it to %s "
            "and resumed from the newest complete checkpoint instead. Delete it once you no longer need it.",
            path,
            "; ".join(problems),
            set_aside,
        )
    return None


def check_resumable(checkpoint) -> None:
    """Refuse an explicitly named checkpoint that is incomplete, before anything is trained."""
    if not Path(checkpoint).is_dir():
        raise ValueError(f"resume_from_checkpoint={checkpoint!r} is not a folder. Pass a checkpoint-N folder.")
    problems = checkpoint_problems(checkpoint)
    if problems:
        raise ValueError(
            f"Checkpoint {checkpoint} is incomplete: {'; '.join(problems)}. It was probably written by a process "
            "that was killed. Resume from an earlier checkpoint, or pass resume_from_checkpoint=True to take the "
            "newest complete one."
        )
