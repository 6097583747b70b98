"""Where a lab's files live: the manifest ``grader/labs.toml`` names every file of every lab
under the lab's one key (``labNN_<topic>``)."""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

REPO = Path(__file__).resolve().parents[1]
SOLUTIONS = REPO / "solutions"
LABS = REPO / "labs"
DIST = REPO / "grader" / "dist"
MANIFEST = REPO / "grader" / "labs.toml"


@cache
def manifest() -> dict[str, dict[str, Any]]:
    """The manifest as read: ``{key: {"title": ..., "master": path, ...}}``."""
    return tomllib.loads(MANIFEST.read_text())


@dataclass(frozen=True)
class Lab:
    name: str
    entry: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self) -> None:
        if not self.entry:
            if self.name not in manifest():
                raise SystemExit(f"{self.name} is not in {MANIFEST.relative_to(REPO)}")
            object.__setattr__(self, "entry", manifest()[self.name])

    def path(self, key: str) -> Path:
        return REPO / self.entry[key]

    def paths(self, key: str) -> list[Path]:
        value = self.entry.get(key, [])
        return [REPO / v for v in ([value] if isinstance(value, str) else value)]

    @property
    def title(self) -> str:
        return self.entry["title"]

    @property
    def master(self) -> Path:
        return self.path("master")

    @property
    def student_dir(self) -> Path:
        return self.path("student")

    @property
    def student_notebook(self) -> Path:
        return self.student_dir / f"{self.name}.ipynb"

    @property
    def checks(self) -> Path:
        return self.path("checks")

    @property
    def autograder_zip(self) -> Path:
        return DIST / f"{self.name}-autograder.zip"

    @property
    def solution_notebook(self) -> Path:
        """The master with tests stripped and solutions kept: what a perfect student submits."""
        return DIST / f"{self.name}-solution.ipynb"


def all_labs() -> list[Lab]:
    return [Lab(name) for name in sorted(manifest())]


def find_lab(name: str) -> Lab:
    labs = {lab.name: lab for lab in all_labs()}
    for key, lab in labs.items():
        if name in (key, key.split("_")[0]):
            return lab
    raise SystemExit(f"unknown lab {name!r}; the labs are: {', '.join(labs) or 'none'}")


def question_points(lab: Lab) -> list[dict[str, object]]:
    """Each question of the master with its points and how many of them hidden tests decide,
    read from the master's question and test configurations (what otter assign reads)."""
    import re

    import nbformat
    import yaml

    config_block = re.compile(r'""" # BEGIN TEST CONFIG\n(.*?)""" # END TEST CONFIG', re.DOTALL)
    rows: list[dict[str, object]] = []
    for cell in nbformat.read(lab.master, as_version=4).cells:
        source = cell.source.strip()
        if cell.cell_type == "raw" and source.startswith("# BEGIN QUESTION"):
            config = yaml.safe_load(source.removeprefix("# BEGIN QUESTION")) or {}
            rows.append({"question": config["name"], "points": config.get("points", 0),
                         "hidden": 0})
        elif cell.cell_type == "code" and rows and (match := config_block.search(source)):
            test = yaml.safe_load(match.group(1)) or {}
            if test.get("hidden"):
                rows[-1]["hidden"] += test.get("points", 0)
    return rows
