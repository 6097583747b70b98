"""The Docker images, checked without a Docker engine: each Dockerfile is parsed (continuations
joined, comments dropped, ARG and ENV defaults substituted) and held to the properties a build or a
grading run depends on. Every check is also run on broken variants of the real files, so that a
check that cannot fail would show here."""

from __future__ import annotations

import json
import re
import shlex
import shutil
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

import pytest
from packaging.requirements import InvalidRequirement, Requirement
from packaging.utils import canonicalize_name

from grader.labs import REPO

DOCKER = REPO / "docker"
CPU_INDEX = "https://download.pytorch.org/whl/cpu"
KEYWORDS = {"FROM", "RUN", "CMD", "LABEL", "MAINTAINER", "EXPOSE", "ENV", "ADD", "COPY",
            "ENTRYPOINT", "VOLUME", "USER", "WORKDIR", "ARG", "ONBUILD", "STOPSIGNAL",
            "HEALTHCHECK", "SHELL"}
SHELL_OPERATORS = {"&&", "||", ";", "|", "&"}
# pip options that take a value (the value is not a requirement).
PIP_VALUE_OPTIONS = {"-c", "--constraint", "-r", "--requirement", "-i", "--index-url",
                     "--extra-index-url", "-f", "--find-links", "-t", "--target", "--prefix",
                     "--root", "--platform", "--python-version", "--implementation", "--abi",
                     "--report", "--src", "--upgrade-strategy", "--progress-bar", "--log",
                     "--cache-dir", "--timeout", "--retries", "--proxy", "--trusted-host",
                     "--cert", "--client-cert", "--only-binary", "--no-binary", "--config-settings",
                     "-C", "--global-option"}


# ---------------------------------------------------------------------------------------------
# The parser
# ---------------------------------------------------------------------------------------------

@dataclass
class Instruction:
    keyword: str
    value: str  # continuations joined, ARG/ENV values substituted
    line: int
    workdir: str  # the WORKDIR in effect
    env: dict[str, str] = field(default_factory=dict)  # ARG and ENV values in effect

    def __str__(self) -> str:
        return f"line {self.line}: {self.keyword} {self.value}"


@dataclass
class PipInstall:
    instruction: Instruction
    tokens: list[str]

    def option_values(self, *names: str) -> list[str]:
        values = []
        for i, token in enumerate(self.tokens):
            for name in names:
                if token == name and i + 1 < len(self.tokens):
                    values.append(self.tokens[i + 1])
                elif token.startswith(name + "=") and name.startswith("--"):
                    values.append(token.split("=", 1)[1])
        return values

    @property
    def requirements(self) -> list[str]:
        found, skip = [], False
        for token in self.tokens:
            if skip:
                skip = False
            elif token in PIP_VALUE_OPTIONS:
                skip = True
            elif token in ("-e", "--editable"):
                continue
            elif not token.startswith("-"):
                found.append(token)
        return found

    @property
    def named(self) -> list[Requirement]:
        """The requirements that are package names, not local paths."""
        named = []
        for token in self.requirements:
            if token.startswith((".", "/")):
                continue
            try:
                named.append(Requirement(token))
            except InvalidRequirement:
                continue
        return named

    @property
    def local(self) -> list[str]:
        """Local project paths, absolute, without extras."""
        return [str(PurePosixPath(self.instruction.workdir) / re.sub(r"\[.*\]$", "", token))
                for token in self.requirements if token.startswith((".", "/"))]

    @property
    def constrained(self) -> bool:
        return bool(self.option_values("-c", "--constraint") or
                    "PIP_CONSTRAINT" in self.instruction.env)

    def installs(self, package: str) -> bool:
        return any(canonicalize_name(r.name) == package for r in self.named)

    def __str__(self) -> str:
        return f"line {self.instruction.line}: pip install {' '.join(self.tokens)}"


_VARIABLE = re.compile(r"\$(?:\{(\w+)(?::-([^}]*))?\}|(\w+))")


def substitute(text: str, variables: dict[str, str]) -> str:
    """$NAME, ${NAME} and ${NAME:-default}; unknown names are left as they are ($PATH)."""
    def value(match: re.Match[str]) -> str:
        name = match.group(1) or match.group(3)
        if name in variables:
            return variables[name]
        return match.group(2) if match.group(2) is not None else match.group(0)
    return _VARIABLE.sub(value, text)


def logical_lines(text: str) -> list[tuple[int, str]]:
    """(first line number, text) of each instruction: a trailing backslash joins the next line,
    and comment lines are dropped, inside continuations too, as Docker does."""
    lines, buffer, start = [], "", 0
    for number, raw in enumerate(text.splitlines(), 1):
        stripped = raw.strip()
        if stripped.startswith("#") or not stripped:
            continue
        if not buffer:
            start = number
        if stripped.endswith("\\"):
            buffer += raw.rstrip()[:-1]
            continue
        lines.append((start, (buffer + raw).strip()))
        buffer = ""
    if buffer:
        raise ValueError(f"line {start}: the file ends inside a line continuation")
    return lines


class Dockerfile:
    def __init__(self, text: str, name: str = "Dockerfile"):
        self.name = name
        self.instructions: list[Instruction] = []
        global_args: dict[str, str] = {}  # ARGs before the first FROM: visible in FROM lines
        variables: dict[str, str] = {}
        workdir = "/"
        for number, line in logical_lines(text):
            keyword, rest = re.match(r"(\S+)\s*(.*)", line, re.DOTALL).groups()
            keyword = keyword.upper()
            if keyword not in KEYWORDS:
                raise ValueError(f"{name} line {number}: unknown instruction {keyword!r} (a "
                                 "missing backslash at the end of the line before?)")
            in_stage = any(i.keyword == "FROM" for i in self.instructions)
            value = substitute(rest.strip(), variables if in_stage else global_args)
            if keyword == "FROM":
                variables, workdir = {}, "/"
            elif keyword == "ARG":
                key, equals, default = value.partition("=")
                if not in_stage:
                    global_args[key] = default
                else:
                    variables[key] = default if equals else global_args.get(key, "")
            elif keyword == "ENV":
                variables.update(parse_env(value))
            elif keyword == "WORKDIR":
                workdir = str(PurePosixPath(workdir) / value)
            self.instructions.append(Instruction(keyword, value, number, workdir,
                                                 dict(variables)))

    @classmethod
    def read(cls, path: Path) -> Dockerfile:
        return cls(path.read_text(), path.name)

    def stages(self) -> list[list[Instruction]]:
        stages: list[list[Instruction]] = []
        for instruction in self.instructions:
            if instruction.keyword == "FROM":
                stages.append([])
            if stages:
                stages[-1].append(instruction)
        return stages

    def final(self, keyword: str | None = None) -> list[Instruction]:
        stage = self.stages()[-1] if self.stages() else []
        return [i for i in stage if keyword is None or i.keyword == keyword]

    def all(self, keyword: str) -> list[Instruction]:
        return [i for i in self.instructions if i.keyword == keyword]

    def pip_installs(self) -> list[PipInstall]:
        found = []
        for run in self.final("RUN"):
            for command in shell_commands(run.value):
                for i, token in enumerate(command[:-1]):
                    # pip, /opt/venv/bin/pip3, python -m pip
                    if re.fullmatch(r"pip[\d.]*", PurePosixPath(token).name) and \
                            command[i + 1] == "install":
                        found.append(PipInstall(run, command[i + 2:]))
                        break
        return found

    def copies(self) -> list[tuple[Instruction, dict[str, str], list[str], str]]:
        """(instruction, flags, sources, absolute destination) of each COPY and ADD."""
        found = []
        for instruction in self.instructions:
            if instruction.keyword not in ("COPY", "ADD"):
                continue
            value = instruction.value
            flags = {}
            while value.startswith("--"):
                flag, _, value = value.partition(" ")
                name, _, flag_value = flag[2:].partition("=")
                flags[name] = flag_value
                value = value.strip()
            parts = json.loads(value) if value.startswith("[") else shlex.split(value)
            *sources, destination = parts
            found.append((instruction, flags, sources,
                          str(PurePosixPath(instruction.workdir) / destination)
                          + ("/" if destination.endswith("/") or destination in (".", "./")
                             else "")))
        return found

    def copied_paths(self) -> set[str]:
        """Absolute paths in the image of the files and folders the COPYs create."""
        paths = set()
        for _, flags, sources, destination in self.copies():
            if "from" in flags:
                continue
            for source in sources:
                if destination.endswith("/") or len(sources) > 1:
                    paths.add(str(PurePosixPath(destination) / PurePosixPath(source).name))
                else:
                    paths.add(destination)
        return paths


def parse_env(value: str) -> dict[str, str]:
    tokens = shlex.split(value)
    if tokens and "=" not in tokens[0]:  # the legacy form: ENV NAME value with spaces
        return {tokens[0]: " ".join(tokens[1:])}
    return dict(token.split("=", 1) for token in tokens)


def shell_commands(script: str) -> list[list[str]]:
    """The simple commands of a shell-form RUN, split at && || ; | &."""
    lexer = shlex.shlex(script, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    commands: list[list[str]] = [[]]
    for token in lexer:
        if token in SHELL_OPERATORS:
            commands.append([])
        else:
            commands[-1].append(token)
    return [c for c in commands if c]


def dockerignore_patterns(text: str) -> list[str]:
    lines = [line.strip() for line in text.splitlines()]
    patterns = [line.strip("/") for line in lines if line and not line.startswith("#")]
    if any(p.startswith("!") for p in patterns):
        raise ValueError(".dockerignore exceptions (!) are not handled by this checker")
    return patterns


def _pattern_regex(pattern: str) -> re.Pattern[str]:
    """Docker's matching: patterns are anchored at the context root, `*` and `?` stay within
    one path segment, `**` spans any number of them."""
    regex, i = "", 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            regex, i = regex + "(?:.*/)?", i + 3
        elif pattern.startswith("**", i):
            regex, i = regex + ".*", i + 2
        elif pattern[i] == "*":
            regex, i = regex + "[^/]*", i + 1
        elif pattern[i] == "?":
            regex, i = regex + "[^/]", i + 1
        else:
            regex, i = regex + re.escape(pattern[i]), i + 1
    return re.compile(regex)


def is_ignored(path: str, patterns: list[str]) -> bool:
    """Whether the context path, or a folder above it, matches a .dockerignore pattern."""
    parts = PurePosixPath(path).parts
    prefixes = ["/".join(parts[:n]) for n in range(1, len(parts) + 1)]
    return any(_pattern_regex(p).fullmatch(prefix) for p in patterns for prefix in prefixes)


def constraint_names(path: Path) -> set[str]:
    names = set()
    for line in path.read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            names.add(canonicalize_name(Requirement(line).name))
    return names


# ---------------------------------------------------------------------------------------------
# The checks: each returns the problems it finds
# ---------------------------------------------------------------------------------------------

def unpinned_bases(dockerfile: Dockerfile) -> list[str]:
    problems, stages = [], set()
    for instruction in dockerfile.all("FROM"):
        tokens = [t for t in instruction.value.split() if not t.startswith("--")]
        image = tokens[0]
        if len(tokens) >= 3 and tokens[1].lower() == "as":
            stages.add(tokens[2].lower())
        if image.lower() in stages or image == "scratch" or "@sha256:" in image:
            continue
        last = image.rsplit("/", 1)[-1]
        tag = last.partition(":")[2]
        if not tag or tag == "latest" or "$" in tag:
            problems.append(f"{instruction}: the base image needs an explicit version tag")
    return problems


def missing_sources(dockerfile: Dockerfile, root: Path = REPO) -> list[str]:
    patterns = dockerignore_patterns((root / ".dockerignore").read_text())
    problems = []
    for instruction, flags, sources, _ in dockerfile.copies():
        if "from" in flags:
            continue
        for source in sources:
            if re.match(r"https?://", source):
                continue
            if is_ignored(source.rstrip("/"), patterns):
                problems.append(f"{instruction}: {source} is excluded by .dockerignore")
            elif not (list(root.glob(source)) if any(c in source for c in "*?[") else
                      (root / source).exists()):
                problems.append(f"{instruction}: {source} does not exist in the repository")
    return problems


def torch_problems(dockerfile: Dockerfile, cpu: bool) -> list[str]:
    installs = dockerfile.pip_installs()
    problems = []
    torch_at = [n for n, p in enumerate(installs) if p.installs("torch")]
    if not torch_at:
        return ["torch is never installed (by name and version)"]
    for install in installs:
        for requirement in install.named:
            if canonicalize_name(requirement.name) != "torch":
                continue
            specs = list(requirement.specifier)
            if len(specs) != 1 or specs[0].operator not in ("==", "===") or "*" in specs[0].version:
                problems.append(f"{install}: torch must be pinned to one version")
            indexes = install.option_values("-i", "--index-url")
            extra = install.option_values("--extra-index-url")
            if cpu and indexes != [CPU_INDEX]:
                problems.append(f"{install}: a CPU image must take torch from --index-url "
                                f"{CPU_INDEX} (only), or pip may pick a CUDA build")
            if not cpu and any("/whl/cpu" in url for url in indexes + extra):
                problems.append(f"{install}: the CUDA image takes torch's CPU build")
    for n, install in enumerate(installs):
        if install.local and n < torch_at[0]:
            problems.append(f"{install}: the course is installed before torch, so pip takes "
                            "torch from PyPI (a CUDA build) instead of the one chosen here")
    return problems


def constraint_problems(dockerfile: Dockerfile,
                        constraints: Path = REPO / "requirements" / "constraints.txt",
                        needed: tuple[str, ...] = ("pyproject.toml", "course_runtime",
                                                   "course_reference", "grader")) -> list[str]:
    problems = []
    pinned_names = constraint_names(constraints)
    copied = dockerfile.copied_paths()
    installs = dockerfile.pip_installs()
    if not any(install.local for install in installs):
        problems.append("the course is never pip-installed")
    for install in installs:
        exact = all(len(r.specifier) == 1 and next(iter(r.specifier)).operator == "=="
                    for r in install.named)
        if install.local and not install.constrained:
            problems.append(f"{install}: the course must be installed with -c "
                            "requirements/constraints.txt")
        elif not install.constrained and not exact:
            problems.append(f"{install}: neither constrained nor pinned")
        for path in install.option_values("-c", "--constraint"):
            if str(PurePosixPath(install.instruction.workdir) / path) not in copied:
                problems.append(f"{install}: the constraints file {path} is not copied there")
        if install.constrained:
            floating = [str(r) for r in install.named if not r.specifier and
                        canonicalize_name(r.name) not in pinned_names]
            if floating:
                problems.append(f"{install}: {', '.join(floating)} not pinned by the "
                                "constraints file")
        for project in install.local:
            for path in needed:
                if f"{project}/{path}" not in copied:
                    problems.append(f"{install}: {project}/{path} is not copied into the image")
    return problems


ANSWER_KEY = ("course_reference", "grader", "solutions", "tests")


def answer_key_problems(dockerfile: Dockerfile) -> list[str]:
    """The student image must hold nothing a student must not see."""
    return [f"{instruction}: copies {source}, which holds answers, into the student image"
            for instruction, flags, sources, _ in dockerfile.copies()
            for source in sources if source.rstrip("/").split("/")[0] in ANSWER_KEY]


def _is_root(user: str) -> bool:
    return user.split(":")[0] in ("root", "0")


def lab_problems(dockerfile: Dockerfile) -> list[str]:
    problems = []
    users = dockerfile.final("USER")
    user = users[-1].value if users else "root"
    if _is_root(user):
        problems.append("JupyterLab would run as root: switch to an unprivileged USER")
    elif not user.split(":")[0].isdigit() and not any(
            re.search(rf"\b(useradd|adduser)\b.*\b{re.escape(user.split(':')[0])}\b", r.value)
            for r in dockerfile.final("RUN")):
        problems.append(f"USER {user} is never created (useradd/adduser)")
    if not any(re.fullmatch(r"8888(/tcp)?", port) for expose in dockerfile.final("EXPOSE")
               for port in expose.value.split()):
        problems.append("port 8888 is not EXPOSEd")
    labs = [(flags, destination, sources) for _, flags, sources, destination in
            dockerfile.copies() if "labs" in [s.rstrip("/") for s in sources]]
    if not labs:
        problems.append("labs/ is not copied into the image")
    elif not _is_root(user) and labs[0][0].get("chown", "").split(":")[0] != user.split(":")[0]:
        problems.append(f"labs/ is copied as root, so {user} cannot save the notebooks "
                        "(COPY --chown)")
    commands = dockerfile.final("CMD")
    if not commands:
        return problems + ["no CMD: the container would not start JupyterLab"]
    value = commands[-1].value
    argv = json.loads(value) if value.startswith("[") else shlex.split(value)
    if argv[:2] != ["jupyter", "lab"] and argv[:3] != ["python", "-m", "jupyter"]:
        problems.append(f"CMD {value} does not start `jupyter lab`")
    if "--ip=0.0.0.0" not in argv:
        problems.append("JupyterLab listens only inside the container: add --ip=0.0.0.0")
    notebook_dir = next((a.split("=", 1)[1] for a in argv if a.startswith(
        ("--notebook-dir=", "--ServerApp.root_dir="))), commands[-1].workdir)
    if labs and notebook_dir.rstrip("/") != labs[0][1].rstrip("/"):
        problems.append(f"JupyterLab opens {notebook_dir}, not the labs ({labs[0][1]})")
    return problems


def otter_problems(dockerfile: Dockerfile) -> list[str]:
    """What otter grade's Dockerfile, setup.sh and run_autograder need from the base image."""
    problems = []
    base = dockerfile.final("FROM")[0].value.split()[0]
    if not re.match(r"(docker\.io/(library/)?)?ubuntu:|.*[:-]ubuntu\d", base):
        problems.append(f"{base}: otter's setup.sh needs apt-get and an Ubuntu `uname -p`")
    users = dockerfile.final("USER")
    if users and not _is_root(users[-1].value):
        problems.append(f"USER {users[-1].value}: otter's setup installs with apt-get and into "
                        "/root, as root")
    if dockerfile.final("ENTRYPOINT"):
        problems.append("ENTRYPOINT: otter runs /autograder/run_autograder as the command")
    for instruction in dockerfile.instructions:
        if "/root/miniforge3" in instruction.value:
            problems.append(f"{instruction}: otter's Miniforge install fails if "
                            "/root/miniforge3 exists")
    jupyter_path = (dockerfile.final()[-1].env.get("JUPYTER_PATH", "")
                    if dockerfile.final() else "")
    kernels = []
    for run in dockerfile.final("RUN"):
        for command in shell_commands(run.value):
            if "ipykernel" in command and "install" in command:
                name = command[command.index("--name") + 1] if "--name" in command else ""
                prefix = (command[command.index("--prefix") + 1] if "--prefix" in command
                          else None)
                kernels.append((name, prefix))
    if not any(name == "python3" and prefix and f"{prefix.rstrip('/')}/share/jupyter" in
               jupyter_path.split(":") for name, prefix in kernels):
        problems.append("no `python3` kernel found first through JUPYTER_PATH: otter would run "
                        "the notebook in otter-env, which has neither torch nor the course")
    installs = dockerfile.pip_installs()
    for package in ("otter-grader", "ipykernel"):
        if not any(install.installs(package) for install in installs):
            problems.append(f"{package} is not installed beside the course: the kernel runs "
                            "otter's cells")
    return problems


# ---------------------------------------------------------------------------------------------
# The real files
# ---------------------------------------------------------------------------------------------

IMAGES = {"grader.Dockerfile": "cpu", "grader-cuda.Dockerfile": "cuda", "lab.Dockerfile": "cpu"}


def image(name: str) -> Dockerfile:
    return Dockerfile.read(DOCKER / name)


def release_context(tmp_path: Path) -> Path:
    """The student image is built from the release: its layout, with the release's .dockerignore
    (a release build takes minutes; the layout is what the Dockerfile can see)."""
    from grader.release import LAYOUT, TEMPLATE

    for entry in LAYOUT:
        path = tmp_path / entry
        if entry.endswith("/"):
            path.mkdir(parents=True, exist_ok=True)
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text("")
    shutil.copy(TEMPLATE / "dockerignore", tmp_path / ".dockerignore")
    return tmp_path


STUDENT_NEEDS = ("pyproject.toml", "course_runtime")


@pytest.mark.parametrize("name", sorted(IMAGES))
def test_base_images_are_pinned(name):
    assert unpinned_bases(image(name)) == []


@pytest.mark.parametrize("name", sorted(IMAGES))
def test_copied_sources_exist_and_are_in_the_context(name, tmp_path):
    root = release_context(tmp_path) if name == "lab.Dockerfile" else REPO
    assert missing_sources(image(name), root) == []


@pytest.mark.parametrize("name", sorted(IMAGES))
def test_torch_is_pinned_and_from_the_right_build(name):
    assert torch_problems(image(name), cpu=IMAGES[name] == "cpu") == []


@pytest.mark.parametrize("name", sorted(IMAGES))
def test_the_course_is_installed_with_the_constraints(name):
    if name == "lab.Dockerfile":
        assert constraint_problems(image(name), needed=STUDENT_NEEDS) == []
    else:
        assert constraint_problems(image(name)) == []


def test_the_lab_image_serves_jupyterlab_as_a_student():
    assert lab_problems(image("lab.Dockerfile")) == []


def test_the_lab_image_holds_no_answer():
    assert answer_key_problems(image("lab.Dockerfile")) == []


@pytest.mark.parametrize("name", ["grader.Dockerfile", "grader-cuda.Dockerfile"])
def test_the_grader_images_are_bases_otter_grade_can_use(name):
    assert otter_problems(image(name)) == []


@pytest.mark.filterwarnings("ignore::DeprecationWarning:traitlets")
def test_otter_template_still_asks_what_the_checks_assume():
    """The otter checks encode otter 7.0.0's Dockerfile and setup.sh: if an upgrade changes
    them, re-read them and update grader.Dockerfile and these checks."""
    import otter.grade

    template = (Path(otter.grade.__file__).parent / "Dockerfile").read_text()
    assert "apt-get install" in template and "ARG BASE_IMAGE" in template
    assert "ENTRYPOINT" not in template and "USER" not in template
    import otter.execute.preprocessor
    import otter.generate

    setup = (Path(otter.generate.__file__).parent / "templates" / "python" / "setup.sh").read_text()
    assert "miniforge3" in setup.lower() and "-b" in setup and "uname -p" in setup
    assert "mamba env create" in setup, "otter no longer grades from its own conda env"
    source = Path(otter.execute.preprocessor.__file__).read_text()
    assert '["name"] = "python3"' in source, "otter no longer forces the python3 kernel"


def test_dockerignore_keeps_local_state_out_of_the_context():
    patterns = dockerignore_patterns((REPO / ".dockerignore").read_text())
    for path in (".venv/bin/python", "book/_build/html/index.html",
                 "grader/dist/lab01_autograd-autograder.zip", "course_reference/__pycache__/x.pyc"):
        assert is_ignored(path, patterns), f"{path} would be sent to the Docker daemon"
    for path in ("course_reference/autograd/tensor.py", "labs/lab01_autograd/lab01_autograd.ipynb",
                 "requirements/constraints.txt", "pyproject.toml"):
        assert not is_ignored(path, patterns), f"{path} is needed by the images"


# ---------------------------------------------------------------------------------------------
# The checks can fail: broken variants of the real files
# ---------------------------------------------------------------------------------------------

CHECKS = {
    "bases": unpinned_bases,
    "sources": missing_sources,
    "torch-cpu": lambda d: torch_problems(d, cpu=True),
    "torch-cuda": lambda d: torch_problems(d, cpu=False),
    "constraints": constraint_problems,
    "lab": lab_problems,
    "answers": answer_key_problems,
    "student-constraints": lambda d: constraint_problems(d, needed=STUDENT_NEEDS),
    "otter": otter_problems,
}

BROKEN = [
    # (file, text to replace, replacement, check, expected problem)
    ("grader.Dockerfile", "FROM ubuntu:22.04", "FROM ubuntu", "bases", "explicit version"),
    ("grader.Dockerfile", "FROM ubuntu:22.04", "FROM ubuntu:latest", "bases", "explicit version"),
    ("grader.Dockerfile", "COPY grader grader", "COPY graders grader", "sources",
     "does not exist"),
    ("grader.Dockerfile", "COPY grader grader", "COPY .venv .venv", "sources", "excluded"),
    ("lab.Dockerfile", "COPY course_runtime course_runtime",
     "COPY course_runtime course_runtime\nCOPY course_reference course_reference", "answers",
     "holds answers"),
    ("lab.Dockerfile", "COPY course_runtime course_runtime", "", "student-constraints",
     "course_runtime is not copied"),
    ("grader.Dockerfile", '"torch==${TORCH_VERSION}"', "torch", "torch-cpu", "pinned"),
    ("grader.Dockerfile", '"torch==${TORCH_VERSION}"', "torch>=2.4", "torch-cpu", "pinned"),
    ("grader.Dockerfile", "--index-url https://download.pytorch.org/whl/cpu", "",
     "torch-cpu", "CPU image"),
    ("lab.Dockerfile", "--index-url https://download.pytorch.org/whl/cpu",
     "--extra-index-url https://download.pytorch.org/whl/cpu", "torch-cpu", "CPU image"),
    ("grader-cuda.Dockerfile", '"torch==${TORCH_VERSION}"',
     '"torch==${TORCH_VERSION}" --index-url https://download.pytorch.org/whl/cpu',
     "torch-cuda", "CPU build"),
    ("grader-cuda.Dockerfile", "ARG TORCH_VERSION=2.13.0", "ARG TORCH_VERSION=2.*",
     "torch-cuda", "pinned"),
    ("grader.Dockerfile", "pip install -c requirements/constraints.txt .", "pip install .",
     "constraints", "-c requirements/constraints.txt"),
    ("lab.Dockerfile", "COPY requirements/constraints.txt requirements/constraints.txt",
     "COPY requirements/constraints.txt constraints.txt", "student-constraints", "not copied"),
    ("lab.Dockerfile", '".[lab]"', '".[lab]" black', "student-constraints",
     "black not pinned"),
    ("grader.Dockerfile", "COPY course_reference course_reference", "", "constraints",
     "course_reference is not copied"),
    ("lab.Dockerfile", "USER student", "USER root", "lab", "as root"),
    ("lab.Dockerfile", "USER student", "", "lab", "as root"),
    ("lab.Dockerfile", "USER student", "USER teacher", "lab", "never created"),
    ("lab.Dockerfile", "EXPOSE 8888", "EXPOSE 8080", "lab", "8888"),
    ("lab.Dockerfile", "CMD [", "# CMD [", "lab", "no CMD"),
    ("lab.Dockerfile", '"--ip=0.0.0.0", ', "", "lab", "--ip=0.0.0.0"),
    ("lab.Dockerfile", "COPY --chown=student:student labs", "COPY labs", "lab", "--chown"),
    ("lab.Dockerfile", '"--notebook-dir=/home/student/labs"', '"--notebook-dir=/tmp"', "lab",
     "not the labs"),
    ("grader.Dockerfile", "FROM ubuntu:22.04", "FROM debian:12.8", "otter", "uname -p"),
    ("grader.Dockerfile", "WORKDIR /\n", "USER nobody\nWORKDIR /\n", "otter", "as root"),
    ("grader-cuda.Dockerfile", "WORKDIR /\n", 'WORKDIR /\nENTRYPOINT ["bash"]\n', "otter",
     "ENTRYPOINT"),
    ("grader.Dockerfile", "/opt/course/venv", "/root/miniforge3", "otter", "/root/miniforge3"),
    ("grader.Dockerfile", "JUPYTER_PATH=/opt/course/share/jupyter",
     "JUPYTER_DATA_DIR=/opt/course/share/jupyter", "otter", "JUPYTER_PATH"),
    ("grader-cuda.Dockerfile", "--prefix /opt/course --name python3",
     "--prefix /opt/course --name course", "otter", "JUPYTER_PATH"),
    ("grader.Dockerfile", '"otter-grader[grading]" ipykernel', "ipykernel", "otter",
     "otter-grader is not installed"),
]


@pytest.mark.parametrize("name, old, new, check, expected", BROKEN,
                         ids=[f"{b[3]}-{i}" for i, b in enumerate(BROKEN)])
def test_each_check_fails_on_a_broken_dockerfile(name, old, new, check, expected):
    text = (DOCKER / name).read_text()
    assert old in text, f"the mutation no longer applies to {name}: {old!r}"
    problems = CHECKS[check](Dockerfile(text.replace(old, new), name))
    assert any(expected in problem for problem in problems), problems


CONTINUED = """\
FROM ubuntu:22.04
RUN pip install --no-deps "torch==2.13.0" \\
    # Docker drops a comment line inside a continuation
    --index-url https://download.pytorch.org/whl/cpu \\
    && pip install -c requirements/constraints.txt .
"""


def test_parser_joins_continuations_and_drops_their_comments():
    dockerfile = Dockerfile(CONTINUED)
    assert [i.keyword for i in dockerfile.instructions] == ["FROM", "RUN"]
    torch, course = dockerfile.pip_installs()
    assert torch.option_values("--index-url") == [CPU_INDEX] and torch.installs("torch")
    assert course.local == ["/"] and course.constrained
    assert torch_problems(dockerfile, cpu=True) == []


def test_parser_rejects_a_broken_continuation():
    with pytest.raises(ValueError, match="unknown instruction '--INDEX-URL'"):
        Dockerfile(CONTINUED.replace('"torch==2.13.0" \\', '"torch==2.13.0"'))
    with pytest.raises(ValueError, match="inside a line continuation"):
        Dockerfile(CONTINUED.rstrip() + " \\\n")


def test_course_installed_before_torch_is_caught():
    swapped = ("FROM ubuntu:22.04\n"
               "RUN pip install -c requirements/constraints.txt . \\\n"
               f"    && pip install --no-deps torch==2.13.0 --index-url {CPU_INDEX}\n")
    assert any("before torch" in p for p in torch_problems(Dockerfile(swapped), cpu=True))


def test_dockerignore_matching():
    patterns = dockerignore_patterns("# comment\n.venv\n**/__pycache__\nbook/_build/\n*.log\n")
    assert is_ignored(".venv", patterns) and is_ignored(".venv/lib/x.py", patterns)
    assert is_ignored("__pycache__/a.pyc", patterns) and is_ignored("a/b/__pycache__", patterns)
    assert is_ignored("book/_build/html", patterns) and is_ignored("x.log", patterns)
    assert not is_ignored("book/part1.md", patterns) and not is_ignored("venv", patterns)
