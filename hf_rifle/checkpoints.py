"""Crash-safe checkpoints: written atomically, verified before a resume, torn ones set aside.

transformers' Trainer writes `checkpoint-N` in place and resumes from the newest such folder even when the
process died while writing it (a missing `trainer_state.json`, a truncated `model.safetensors`), so every
re-run fails until the folder is deleted by hand. `RifleTrainer` instead writes each checkpoint into a staging
folder, flushes every file to disk, writes a manifest of the files and their sizes last, and renames the
folder into place; a resume takes the newest checkpoint whose files all check out, and moves torn ones aside
(never deleting them: they may hold the only copy of some work). A disk that fills up while a checkpoint or the
final model is written stops the run with an `OSError` that says so (`full_disk_explained`).

With several processes, decisions that move shared files are taken once: the main process (global rank 0) finds
the newest complete checkpoint and sets torn ones aside, and the other ranks receive its answer, or its error
(`decided_by_main_process`). Global rank 0 rather than each node's local main, because an `output_dir` is normally
on a filesystem every node shares; a job whose nodes each have their own disk (`save_on_each_node=True`) must keep
those disks' checkpoints alike, as rank 0's answer is used by every node.
"""

import errno
import json
import logging
import os
import pickle
import re
import shutil
import struct
import time
import zipfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TypeVar

import torch
import torch.distributed as dist

logger = logging.getLogger(__name__)

MANIFEST = "hf_rifle_checkpoint.json"
STAGING_DIR = ".hf_rifle-staging"  # where checkpoints are written before being renamed into place
SET_ASIDE_PREFIX = "incomplete-"  # torn checkpoints are renamed to incomplete-checkpoint-N-<time>
CHECKPOINT_NAME = re.compile(r"^checkpoint-(\d+)$")
TRAINER_STATE = "trainer_state.json"
TORCH_ZIP_SUFFIXES = (".pt", ".pth", ".bin")  # torch.save's zip format
FULL_DISK_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
FULL_DISK_TEXTS = ("No space left on device", "Disk quota exceeded")  # OSError's text, also inside safetensors' error
# torch.save's zip writer reports a failed write without its cause: "[enforce fail at inline_container.cc:672] .
# unexpected pos 690624 vs 690512" (or "... failed writing file ..."); it means a full disk when the disk is then full.
TORCH_WRITE_FAILURE_TEXTS = ("unexpected pos", "failed writing file")

T = TypeVar("T")
_deciding = False  # True on the main process while it runs a decision: one nested in it is taken there too


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
    if not (folder / TRAINER_STATE).is_file() and f"{TRAINER_STATE} is missing" not in problems:
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


def checkpoint_folders(output_dir) -> list[Path]:
    """The `checkpoint-N` folders in `output_dir`, oldest (smallest N) first."""
    folder = Path(output_dir)
    if not folder.is_dir():
        return []
    checkpoints = [path for path in folder.iterdir() if path.is_dir() and CHECKPOINT_NAME.match(path.name)]
    return sorted(checkpoints, key=lambda path: int(CHECKPOINT_NAME.match(path.name).group(1)))


def decided_by_main_process(decide: Callable[[], T]) -> T:
    """`decide()`, run by the main process (global rank 0) alone; every rank returns its answer, or raises its error.

    A decision that moves shared files (setting a torn checkpoint aside) races when every rank takes it: one rank
    renames the folder another is reading. So only rank 0 decides, and the others receive the outcome through one
    `broadcast_object_list`, after rank 0 is done with the files. An error reaches every rank with the same type
    and message, so no rank waits in a collective for one that failed. Without an initialized process group (one
    process), `decide()` simply runs. A decision nested in another runs where the outer one does (rank 0).
    """
    global _deciding
    if _deciding or not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return decide()
    outcome: list = [None]
    error = None
    if dist.get_rank() == 0:
        _deciding = True
        try:
            outcome[0] = (True, decide())
        except Exception as raised:
            error = raised
            outcome[0] = (False, shareable_error(raised))
        finally:
            _deciding = False
    dist.broadcast_object_list(outcome, src=0)
    succeeded, value = outcome[0]
    if succeeded:
        return value
    raise error if error is not None else value


def shareable_error(error: Exception) -> Exception:
    """`error` itself when it pickles back to the same type and message; else a `RuntimeError` carrying both, so
    the other ranks still read what rank 0 read."""
    try:
        copy = pickle.loads(pickle.dumps(error))
        if type(copy) is type(error) and str(copy) == str(error):
            return copy
    except Exception:
        pass
    return RuntimeError(f"{type(error).__name__}: {error}")


def newest_complete_checkpoint(output_dir) -> str | None:
    """The newest `checkpoint-N` in `output_dir` that is complete; newer torn ones are set aside with a warning.

    Call it on every rank: the main process decides and moves folders, the others receive its answer
    (`decided_by_main_process`)."""
    return decided_by_main_process(lambda: _newest_complete_checkpoint_here(output_dir))


def _newest_complete_checkpoint_here(output_dir) -> str | None:
    for path in reversed(checkpoint_folders(output_dir)):
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


def tensor_bytes(*states) -> int:
    """The bytes of every tensor in `states` (state dicts, nested): what a checkpoint of them writes, headers aside."""
    total = 0
    for state in states:
        if isinstance(state, torch.Tensor):
            total += state.numel() * state.element_size()
        elif isinstance(state, dict):
            total += tensor_bytes(*state.values())
        elif isinstance(state, list | tuple):
            total += tensor_bytes(*state)
    return total


def is_disk_full(error: BaseException, folder, needed_bytes: Callable[[], int]) -> bool:
    """Whether `error`, raised while writing `needed_bytes()` under `folder`, comes from a full disk (or quota)."""
    if isinstance(error, OSError) and error.errno in FULL_DISK_ERRNOS:
        return True
    text = str(error)
    if any(sign in text for sign in FULL_DISK_TEXTS):
        return True
    return any(sign in text for sign in TORCH_WRITE_FAILURE_TEXTS) and shutil.disk_usage(folder).free < needed_bytes()


@contextmanager
def full_disk_explained(output_dir, what: str, needed_bytes: Callable[[], int]) -> Iterator[None]:
    """Turn a full disk while `what` is written under `output_dir` into an `OSError` (ENOSPC) that says so, how much
    the write needs and which checkpoints are kept, instead of the writer's own error (torch.save's names no cause).

    `needed_bytes` is called only after an error, to size the write (see `tensor_bytes`).
    """
    try:
        yield
    except Exception as error:
        if not is_disk_full(error, output_dir, needed_bytes):
            raise
        raise OSError(errno.ENOSPC, full_disk_message(output_dir, what, needed_bytes())) from error


def full_disk_message(output_dir, what: str, needed: int) -> str:
    """What `full_disk_explained` says: the disk, the write's size, the free space, what is kept and what next."""
    folder = Path(output_dir)
    kept = [path.name for path in checkpoint_folders(folder) if not checkpoint_problems(path)]
    partial = (
        f" The partial checkpoint in {STAGING_DIR}/ is never resumed from; the next save removes it."
        if (folder / STAGING_DIR).exists()
        else ""
    )
    if kept:
        outcome = (
            f"Kept: {', '.join(kept)}, complete.{partial} After freeing space, the same hf-rifle-train command (or "
            f"`train(resume_from_checkpoint=True)`) resumes from {kept[-1]}."
        )
    else:
        outcome = f"No checkpoint is complete yet.{partial} After freeing space, the same command starts over."
    return (
        f"The disk under output_dir {folder} is full: writing {what} (about {_megabytes(needed)}) failed with "
        f"{_megabytes(shutil.disk_usage(folder).free)} free. {outcome}"
    )


def _megabytes(size: int) -> str:
    return f"{size / 1e6:.1f} MB"
