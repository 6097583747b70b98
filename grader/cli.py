"""The `course` command: assign labs, grade a batch, check what students receive.

    course assign [LAB ...]            build grader/dist/ (zips, solutions) from solutions/
    course assign --update-labs        ... and update labs/, refusing to overwrite changed work
    course grade LAB SUBMISSIONS/      grade a folder of notebooks into final_grades.csv
    course grade ... --ray auto        ... each submission a task on a Ray cluster
    course check                       labs/ in sync with solutions/, and nothing leaked
    course nbgrader LAB [--out DIR]    the lab as an nbgrader course (source/ and release/)
    course release --book HTML [--out DIR]   what students receive, with no answer in it
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .labs import all_labs, find_lab


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="course", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)

    p = commands.add_parser("assign", help="otter assign every lab (or the ones named)")
    p.add_argument("labs", nargs="*")
    p.add_argument("--no-check", action="store_true", help="skip grading the solution")
    p.add_argument("--update-labs", action="store_true",
                   help="also update labs/ (refuses where a file changed since assign wrote it)")
    p.add_argument("--force", action="store_true",
                   help="with --update-labs: update changed files too, keeping each as .bak-<time>")

    p = commands.add_parser("grade", help="grade a folder of submissions without Docker")
    p.add_argument("lab")
    p.add_argument("submissions", type=Path)
    p.add_argument("--out", type=Path, default=Path("grading-output"))
    p.add_argument("--jobs", type=int, default=2)
    p.add_argument("--timeout", type=float, default=900, help="seconds per submission")
    p.add_argument("--cell-timeout", type=int, default=300, help="seconds per notebook cell")
    p.add_argument("--memory-gb", type=float, default=4.0, help="memory cap per submission")
    p.add_argument("--ray", metavar="ADDRESS", default=None,
                   help="grade on a Ray cluster instead of this machine's processes: 'auto' "
                   "for the cluster this machine belongs to, or its HOST:PORT")

    p = commands.add_parser("check", help="labs/ in sync with solutions/, and no leaks")
    p.add_argument("labs", nargs="*")

    p = commands.add_parser("nbgrader", help="export a lab as an nbgrader course and generate "
                            "its release (default folder: grader/dist/nbgrader)")
    p.add_argument("lab")
    p.add_argument("--out", type=Path, default=None)

    p = commands.add_parser("release", help="build the student release (a git repository)")
    p.add_argument("--book", type=Path, required=True, help="the rendered book (HTML folder)")
    p.add_argument("--out", type=Path, default=None, help="default: grader/dist/release")

    p = commands.add_parser("mutation-score", help="how many mutants of each lab's solution "
                            "its hidden tests catch (writes grader/mutation_scores.json)")
    p.add_argument("labs", nargs="*")
    p.add_argument("--sample", type=int, default=None,
                   help="per lab, grade this many operator mutants chosen at random (seeded)")
    p.add_argument("--jobs", type=int, default=2)
    p.add_argument("--timeout", type=float, default=300, help="seconds per mutant")

    args = parser.parse_args(argv)
    labs = [find_lab(n) for n in getattr(args, "labs", [])] or all_labs()

    if args.command == "assign":
        from .assign import assign
        for lab in labs:
            assign(lab, check=not args.no_check, update_labs=args.update_labs,
                   force=args.force)
        return 0

    if args.command == "grade":
        from .grade import grade_batch, submissions_in
        lab = find_lab(args.lab)
        if not lab.autograder_zip.exists():
            raise SystemExit(f"{lab.autograder_zip} is missing: run `make assign` first")
        table = grade_batch(lab.autograder_zip, submissions_in(args.submissions), args.out,
                            jobs=args.jobs, timeout=args.timeout, memory_gb=args.memory_gb,
                            cell_timeout=args.cell_timeout, ray=args.ray)
        print(table.to_string(index=False))
        print(f"\nwrote {args.out / 'final_grades.csv'}, {args.out / 'logs'}/ and the score "
              f"report {args.out / 'report.html'}; each result is "
              f"kept in {args.out / 'results'}/, so the same command again grades only what "
              f"has none")
        return 0

    if args.command == "check":
        import tempfile

        from .assign import build
        from .leaks import find_leaks
        from .student_folder import out_of_sync
        problems = []
        for lab in labs:
            with tempfile.TemporaryDirectory() as tmp:
                build(lab, Path(tmp) / "out")
                problems += out_of_sync(lab, Path(tmp) / "out" / "student") + find_leaks(lab)
        for problem in problems:
            print(problem)
        if problems:
            print("run `make update-labs` and commit labs/ (or fix the leak)")
            return 1
        print(f"labs/ in sync, no leaks ({', '.join(lab.name for lab in labs)})")
        return 0
    if args.command == "mutation-score":
        import json
        import subprocess
        import tempfile

        from .mutation import record
        below = []
        for lab in labs:
            with tempfile.TemporaryDirectory() as tmp:
                out = Path(tmp) / "summary.json"
                command = [sys.executable, "-m", "grader.mutation", lab.name, "--json", str(out),
                           "--jobs", str(args.jobs), "--timeout", str(args.timeout)]
                if args.sample is not None:
                    command += ["--sample", str(args.sample)]
                if subprocess.run(command).returncode != 0:
                    raise SystemExit(f"{lab.name}: the mutation harness failed")
                summary = json.loads(out.read_text())
            record(summary)
            if (summary["score"] < 0.9 or summary["curated_alive"] or
                    summary["rewrites_losing_points"]):
                below.append(lab.name)
        print("recorded in grader/mutation_scores.json" +
              (f"; below 90 %, with a curated bug alive or a rewrite losing points: "
               f"{', '.join(below)}" if below else ""))
        return 1 if below else 0
    if args.command == "release":
        from .release import build_release, default_out
        out = build_release(args.out or default_out(), args.book)
        print(f"wrote the release {out}: a git repository with labs/, course_runtime/ and "
              "book/; `make check` there runs the public tests")
        return 0
    if args.command == "nbgrader":
        from .nbgrader_export import export_lab
        release = export_lab(find_lab(args.lab), args.out)
        print(f"wrote the nbgrader course {release.parents[2]}: source/ and release/ "
              f"({release.name})")
        return 0
    return 2


if __name__ == "__main__":
    sys.exit(main())
