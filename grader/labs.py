"""Where a lab's files live. A lab is a folder solutions/labNN_<topic>/ holding <name>.ipynb."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SOLUTIONS = REPO / "solutions"
LABS = REPO / "labs"
DIST = REPO / "grader" / "dist"


@dataclass(frozen=True)
class Lab:
    name: str

    @property
    def master(self) -> Path:
        return SOLUTIONS / self.name / f"{self.name}.ipynb"

    @property
    def student_dir(self) -> Path:
        return LABS / self.name

    @property
    def student_notebook(self) -> Path:
        return self.student_dir / f"{self.name}.ipynb"

    @property
    def autograder_zip(self) -> Path:
        return DIST / f"{self.name}-autograder.zip"

    @property
    def solution_notebook(self) -> Path:
        """The master with tests stripped and solutions kept: what a perfect student submits."""
        return DIST / f"{self.name}-solution.ipynb"


def all_labs() -> list[Lab]:
    return [Lab(p.name) for p in sorted(SOLUTIONS.glob("lab[0-9][0-9]_*")) if
            (p / f"{p.name}.ipynb").exists()]


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
