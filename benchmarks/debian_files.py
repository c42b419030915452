"""Build the DebianFiles dataset: Debian package descriptions -> the names of the files each package installs.

A real raw-text XMC dataset with tens of thousands of labels, made from two public Debian 12 (bookworm, main)
archive indices that ``apt-get update`` and ``apt-file update`` fetch:

* ``Packages`` (binary-amd64): the package name and the one-line ``Description`` -> the text
  ``"<package>: <description>"``, as the shipped Debtags set;
* ``Contents-amd64`` and ``Contents-all``: every installed path and the packages that install it -> the labels, the
  distinct *file names* (last path component) a package installs.

Kept labels are file names installed by at least ``--min-packages`` packages (a name only one package installs
cannot be learned) and by at most ``--max-share`` of them (``copyright``, ``changelog.Debian.gz`` and the other
files policy puts in nearly every package say nothing about it); names with whitespace (the raw-text layout separates
labels by spaces) or undecodable bytes are left out. Packages left with no label, or with more than
``--max-labels`` (documentation bundles, kernel images and header trees with thousands of generated names), are left
out. Split 80/20 as Debtags: a package is in test when ``sha1(name) mod 5 == 0``.

No package relationship field (Depends, Recommends, Suggests, Pre-Depends, Provides, Breaks, Conflicts, Replaces,
Enhances) is read: only ``Package`` and ``Description`` of the Packages index, and the Contents index.

    apt-get update && apt-get install -y apt-file && apt-file update
    python benchmarks/debian_files.py --out datamodules/shipped/debian-files

The indices change with every point release, so a rebuild on a later day differs slightly from the shipped copy,
whose SOURCE.md records the counts it was built with.
"""

from __future__ import annotations

import argparse
import collections
import gzip
import hashlib
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

LISTS = Path("/var/lib/apt/lists")
SUITE = "deb.debian.org_debian_dists_bookworm_main"
APT_HELPER = "/usr/lib/apt/apt-helper"


def read_index(path: Path) -> Iterator[str]:
    """Lines of an apt list file in any of apt's compressions (``apt-helper cat-file`` decompresses)."""
    with subprocess.Popen([APT_HELPER, "cat-file", str(path)], stdout=subprocess.PIPE) as proc:
        for raw in proc.stdout:
            yield raw.decode("utf-8", errors="replace").rstrip("\n")
    if proc.returncode:
        raise RuntimeError(f"{APT_HELPER} cat-file {path} failed with status {proc.returncode}")


def find_list(pattern: str) -> Path:
    matches = sorted(LISTS.glob(pattern))
    if not matches:
        sys.exit(f"no {LISTS}/{pattern}: run `apt-get update && apt-get install -y apt-file && apt-file update`")
    return matches[0]


def descriptions(packages: Path) -> dict[str, str]:
    """``{package: one-line description}`` from a Packages index (only these two fields are read)."""
    out: dict[str, str] = {}
    name = None
    for line in read_index(packages):
        if line.startswith("Package: "):
            name = line[len("Package: "):].strip()
        elif line.startswith("Description: ") and name is not None:
            out.setdefault(name, line[len("Description: "):].strip())
    return out


def installed_names(contents: list[Path]) -> dict[str, set[str]]:
    """``{package: file names it installs}`` from Contents indices (``path  section/pkg,section/pkg`` lines)."""
    names: dict[str, set[str]] = collections.defaultdict(set)
    for path in contents:
        for line in read_index(path):
            location, _, owners = line.rpartition(" ")
            base = location.strip().rpartition("/")[2]
            if not base or not owners:
                continue
            for owner in owners.split(","):
                names[owner.rpartition("/")[2]].add(base)
    return names


def usable(name: str) -> bool:
    return "\ufffd" not in name and not any(ch.isspace() for ch in name)


def build(texts: dict[str, str], names: dict[str, set[str]], min_packages: int, max_share: float,
          max_labels: int) -> dict[str, tuple[str, list[str]]]:
    """``{package: (text, labels)}`` after the label and package filters of the module docstring."""
    packages = {p: s for p, s in names.items() if p in texts}
    frequency = collections.Counter(name for s in packages.values() for name in s)
    ceiling = max_share * len(packages)
    kept = {n for n, c in frequency.items() if min_packages <= c <= ceiling and usable(n)}
    docs = {}
    for package in sorted(packages):
        labels = sorted(packages[package] & kept)
        text = " ".join(f"{package}: {texts[package]}".split())
        if 0 < len(labels) <= max_labels:
            docs[package] = (text, labels)
    return docs


def is_test(package: str) -> bool:
    return int(hashlib.sha1(package.encode()).hexdigest(), 16) % 5 == 0


def write(docs: dict[str, tuple[str, list[str]]], out: Path) -> dict[str, int]:
    """Write the four gzipped raw-text files (``gzip -n``-like: no name or time in the header); return counts."""
    out.mkdir(parents=True, exist_ok=True)
    counts: dict[str, int] = {}
    for split in ("train", "test"):
        rows = [(t, labels) for p, (t, labels) in docs.items() if is_test(p) == (split == "test")]
        for kind, lines in (("texts", [t for t, _ in rows]), ("labels", [" ".join(ls) for _, ls in rows])):
            target = out / f"{split}_{kind}.txt.gz"
            partial = target.with_suffix(".gz.partial")
            with open(partial, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", compresslevel=9, mtime=0,
                                                           filename="") as f:
                f.write("".join(line + "\n" for line in lines).encode("utf-8"))
            partial.replace(target)
        counts[f"{split}_docs"] = len(rows)
        counts[f"{split}_label_occurrences"] = sum(len(ls) for _, ls in rows)
        counts[f"{split}_labels"] = len({label for _, ls in rows for label in ls})
    return counts


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="output folder (raw-text layout, gzipped)")
    parser.add_argument("--min-packages", type=int, default=3, help="keep file names installed by >= N packages")
    parser.add_argument("--max-share", type=float, default=0.1, help="... and by at most this share of packages")
    parser.add_argument("--max-labels", type=int, default=100, help="leave out packages with more labels than this")
    args = parser.parse_args(argv)
    texts = descriptions(find_list(f"{SUITE}_binary-amd64_Packages*"))
    names = installed_names([find_list(f"{SUITE}_Contents-amd64*"), find_list(f"{SUITE}_Contents-all*")])
    docs = build(texts, names, args.min_packages, args.max_share, args.max_labels)
    for key, value in write(docs, args.out).items():
        print(f"{key}: {value}")


if __name__ == "__main__":
    main()
