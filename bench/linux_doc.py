"""The corpus of ``bench/reproduce.py --preset gpu``: the Linux kernel's documentation as Debian ships it.

The Debian 12 package ``linux-doc-6.12`` (main, 39.7 MB .deb) holds the kernel's ``Documentation/`` tree:
10,101 files, 49.4 MB uncompressed, most of it English prose in reStructuredText, plus the devicetree
binding schemas and the sysfs ABI descriptions. It installs from a package registry and works offline::

    apt-get download linux-doc-6.12        # no root needed; or the .deb from packages.debian.org on any OS
    python bench/reproduce.py --preset gpu --corpus linux-doc-6.12_*.deb

:func:`write_corpus` turns the .deb (or a folder it was extracted to) into one JSON line per file
(``{"path", "text"}``, sorted by path, in 16 shards), which the data pipeline then splits by document: every file is one
document, so no file is in two splits. Kept: every file that decodes as UTF-8 after gunzip, except the
translations (``translations/``: not English), the SVG figures and the symbolic links (duplicates).
Kept from 6.12.118-1~deb12u1: 9,538 files, 42.5 MB of text.
"""

from __future__ import annotations

import gzip
import io
import json
import os
import shutil
import tarfile
import tempfile
from collections.abc import Iterator
from pathlib import Path

PACKAGE = "linux-doc-6.12"
VERSION = "6.12.118-1~deb12u1"  # the version the committed figures were made from
DOCUMENTATION = f"usr/share/doc/{PACKAGE}/Documentation/"
SKIPPED_DIRS = ("translations/",)
SKIPPED_SUFFIXES = (".svg",)


class CorpusError(ValueError):
    """The corpus file or folder is not what ``--corpus`` expects; the message names it."""


def deb_members(path: Path) -> Iterator[tuple[str, bytes]]:
    """``(path, bytes)`` of every regular file in a .deb's ``data.tar.*`` (a .deb is an ar archive)."""
    raw = path.read_bytes()
    if not raw.startswith(b"!<arch>\n"):
        raise CorpusError(f"{path}: not a .deb (ar) archive")
    offset = 8
    while offset + 60 <= len(raw):
        header = raw[offset:offset + 60]
        name = header[:16].decode("ascii", "replace").strip().rstrip("/")
        try:
            size = int(header[48:58].decode("ascii").strip())
        except ValueError:
            raise CorpusError(f"{path}: corrupt ar header at byte {offset}") from None
        body = raw[offset + 60:offset + 60 + size]
        offset += 60 + size + (size % 2)
        if not name.startswith("data.tar"):
            continue
        if name.endswith(".zst"):
            raise CorpusError(f"{path}: {name} is zstd-compressed; extract it with dpkg-deb -x and pass the folder")
        with tarfile.open(fileobj=io.BytesIO(body), mode="r:*") as tar:
            for member in tar:
                if member.isfile():
                    handle = tar.extractfile(member)
                    if handle is not None:
                        yield member.name.removeprefix("./"), handle.read()
        return
    raise CorpusError(f"{path}: no data.tar member in the .deb")


def folder_members(root: Path) -> Iterator[tuple[str, bytes]]:
    """``(path relative to the package root, bytes)`` of a folder the .deb was extracted to (``dpkg-deb -x``),
    given as that folder or as its ``Documentation`` folder."""
    if (root / DOCUMENTATION).is_dir():
        docs = root / DOCUMENTATION
    elif root.name == "Documentation":
        docs = root
    else:
        raise CorpusError(f"{root}: neither a folder holding {DOCUMENTATION} nor a Documentation folder")
    for path in sorted(p for p in docs.rglob("*") if p.is_file() and not p.is_symlink()):  # as in the .deb
        yield DOCUMENTATION + path.relative_to(docs).as_posix(), path.read_bytes()


def documents(source: Path) -> Iterator[tuple[str, str]]:
    """``(path under Documentation/, text)`` of every kept file (see the module docstring), in path order."""
    if not source.exists():
        raise CorpusError(f"{source}: no such file or folder; get it with: apt-get download {PACKAGE}")
    members = folder_members(source) if source.is_dir() else deb_members(source)
    kept = []
    for name, data in members:
        if not name.startswith(DOCUMENTATION):
            continue
        relative = name[len(DOCUMENTATION):]
        if name.endswith(".gz"):
            data, relative = gzip.decompress(data), relative[:-3]
        if relative.startswith(SKIPPED_DIRS) or relative.endswith(SKIPPED_SUFFIXES):
            continue
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError:  # the images
            continue
        if text.strip():
            kept.append((relative, text))
    if not kept:
        raise CorpusError(f"{source}: no documentation files under {DOCUMENTATION}")
    yield from sorted(kept)


def write_corpus(source: Path, out: Path, shards: int = 16) -> dict[str, int]:
    """Write the corpus as ``shards`` JSON-lines files (``out/part-NN.jsonl``, contiguous in path order, so the
    pipeline tokenizes them in parallel) through a temporary folder renamed into place; reused when ``out``
    exists. Returns its files and bytes of text."""
    if not out.is_dir():
        lines = [json.dumps({"path": path, "text": text}) for path, text in documents(source)]
        out.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
        try:
            per = -(-len(lines) // shards)
            for index in range(0, len(lines), per):
                (staging / f"part-{index // per:02d}.jsonl").write_text("\n".join(lines[index:index + per]) + "\n",
                                                                         encoding="utf-8")
            os.replace(staging, out)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
    files, size = 0, 0
    for part in sorted(out.glob("part-*.jsonl")):
        for line in part.read_text(encoding="utf-8").splitlines():
            files += 1
            size += len(json.loads(line)["text"].encode("utf-8"))
    return {"files": files, "bytes": size}
