"""The student folder labs/<lab>/: kept in step with the master, never losing a student's work.

`course assign` writes what otter generates into grader/dist/<lab>/ only. labs/<lab>/ changes
only with ``--update-labs``, and then file by file: every file assign writes there is recorded,
with its SHA-256, in ``labs/<lab>/.assigned.json``. A file whose content is neither what assign
wrote last time nor what it would write now has been changed by someone (a student's answers):
the update refuses, naming it, unless ``force`` is given, and even then the changed file is kept
beside the new one as ``<name>.bak-<time>``. Files assign never wrote (export zips, otter's log,
a student's own notes) are never touched.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import time
from pathlib import Path

from .labs import REPO, Lab

STAMP = ".assigned.json"


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _files(folder: Path) -> dict[str, str]:
    return {p.relative_to(folder).as_posix(): _sha(p) for p in sorted(folder.rglob("*"))
            if p.is_file() and p.name != STAMP}


def read_stamp(student_dir: Path) -> dict[str, str]:
    path = student_dir / STAMP
    return json.loads(path.read_text()) if path.exists() else {}


def changed_by_someone(student_dir: Path, fresh: Path) -> list[str]:
    """Files at paths assign writes that hold neither the last nor the new generated content."""
    last, new = read_stamp(student_dir), _files(fresh)
    changed = []
    for rel in sorted(set(last) | set(new)):
        path = student_dir / rel
        if path.is_file() and _sha(path) not in (last.get(rel), new.get(rel)):
            changed.append(rel)
    return changed


class StudentWorkChanged(SystemExit):
    """Updating labs/ would overwrite files someone changed."""


def update_student_folder(lab: Lab, fresh: Path, force: bool = False) -> list[str]:
    """Make labs/<lab>/ what otter generated into ``fresh``; returns the files written."""
    target = lab.student_dir
    changed = changed_by_someone(target, fresh)
    if changed and not force:
        names = "\n  ".join(f"labs/{lab.name}/{rel}" for rel in changed)
        raise StudentWorkChanged(
            f"{lab.name}: not updating labs/, these files were changed after assign wrote them "
            f"(a student's work?):\n  {names}\nSave them elsewhere, or run with --force to keep "
            "each beside the new one as <name>.bak-<time>.")
    stamp_time = time.strftime("%Y%m%d-%H%M%S")
    for rel in changed:
        path = target / rel
        path.rename(path.with_name(f"{path.name}.bak-{stamp_time}"))
    last, new = read_stamp(target), _files(fresh)
    for rel in sorted(set(last) - set(new)):  # generated before, not any more: remove if untouched
        path = target / rel
        if path.is_file() and _sha(path) == last[rel]:
            path.unlink()
    written = []
    for rel in new:
        path = target / rel
        if not path.is_file() or _sha(path) != new[rel]:
            path.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(fresh / rel, path)
            written.append(rel)
    (target / STAMP).write_text(json.dumps(new, indent=1, sort_keys=True) + "\n")
    return written


def _tracked(folder: Path) -> set[str] | None:
    """Paths under ``folder`` that git tracks, or None outside a git checkout."""
    result = subprocess.run(["git", "ls-files", "-z", "--", str(folder)], cwd=REPO,
                            capture_output=True, text=True)
    if result.returncode != 0:
        return None
    return {Path(p).relative_to(folder.relative_to(REPO)).as_posix()
            for p in result.stdout.split("\0") if p}


def out_of_sync(lab: Lab, fresh: Path) -> list[str]:
    """How labs/<lab>/ differs from what otter generates now into ``fresh``: missing files,
    changed files, committed files the master no longer produces, and a stale stamp."""
    target = lab.student_dir
    new = _files(fresh)
    have = _files(target) if target.exists() else {}
    problems = [f"labs/{lab.name}/{rel} is missing" for rel in new if rel not in have]
    problems += [f"labs/{lab.name}/{rel} differs from the master" for rel in new
                 if rel in have and have[rel] != new[rel]]
    tracked = _tracked(target) or set()
    problems += [f"labs/{lab.name}/{rel} is not produced by the master"
                 for rel in sorted(tracked - set(new) - {STAMP})]
    if not problems and read_stamp(target) != new:
        problems.append(f"labs/{lab.name}/{STAMP} does not record what assign wrote")
    return problems
