"""bench/linux_doc.py: the ``--preset gpu`` corpus read from a real .deb (built by dpkg-deb) or its folder."""

from __future__ import annotations

import gzip
import importlib.util
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("linux_doc", ROOT / "bench" / "linux_doc.py")
linux_doc = importlib.util.module_from_spec(spec)
spec.loader.exec_module(linux_doc)

needs_dpkg = pytest.mark.skipif(shutil.which("dpkg-deb") is None, reason="dpkg-deb builds the test .deb")


def package_tree(root: Path, texts: dict[str, str]) -> Path:
    """A package tree like linux-doc-6.12's: gzipped and plain text, a translation, an image, an SVG, a link."""
    docs = root / linux_doc.DOCUMENTATION
    for name, text in texts.items():
        path = docs / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if name.endswith(".gz"):
            path.write_bytes(gzip.compress(text.encode("utf-8")))
        else:
            path.write_text(text, encoding="utf-8")
    (docs / "images").mkdir(exist_ok=True)
    (docs / "images" / "logo.gif.gz").write_bytes(gzip.compress(b"GIF89a\x01\x00\xff\xfe\x00"))
    os.symlink("process/howto.rst.gz", docs / "Changes.gz")
    (root / "usr/share/doc/linux-doc-6.12/README").write_text("not documentation\n")
    return root


TEXTS = {"process/howto.rst.gz": "HOWTO do Linux kernel development\n\nThis is the document.\n",
         "admin-guide/sysctl/vm.rst.gz": "Documentation for /proc/sys/vm/\n\ncaf\u00e9 \u2014 unicode too\n",
         "ABI/testing/sysfs-bus-pci": "What: /sys/bus/pci/drivers/.../bind\n",
         "translations/zh_CN/index.rst.gz": "\u4e2d\u6587\u6587\u6863\n",
         "core-api/fig.svg.gz": "<svg xmlns='http://www.w3.org/2000/svg'/>\n",
         "empty.rst.gz": "\n\n"}
KEPT = ["ABI/testing/sysfs-bus-pci", "admin-guide/sysctl/vm.rst", "process/howto.rst"]


def build_deb(tree: Path, out: Path) -> Path:
    debian = tree / "DEBIAN"
    debian.mkdir()
    (debian / "control").write_text("Package: linux-doc-6.12\nVersion: 6.12.118-1~deb12u1\nArchitecture: all\n"
                                    "Maintainer: test <t@example.com>\nDescription: test package\n")
    subprocess.run(["dpkg-deb", "--root-owner-group", "-Zxz", "--build", str(tree), str(out)], check=True,
                   capture_output=True)
    shutil.rmtree(debian)
    return out


@needs_dpkg
def test_deb_folder_and_documentation_folder_give_the_same_documents(tmp_path):
    tree = package_tree(tmp_path / "tree", TEXTS)
    deb = build_deb(tree, tmp_path / "linux-doc-6.12_6.12.118-1~deb12u1_all.deb")
    from_deb = list(linux_doc.documents(deb))
    assert [path for path, _ in from_deb] == KEPT  # sorted; no translation, image, SVG, link, empty or README
    assert dict(from_deb)["admin-guide/sysctl/vm.rst"] == TEXTS["admin-guide/sysctl/vm.rst.gz"]  # gunzipped
    assert list(linux_doc.documents(tree)) == from_deb
    assert list(linux_doc.documents(tree / linux_doc.DOCUMENTATION)) == from_deb


def test_write_corpus_shards_and_reuses(tmp_path):
    texts = {f"dir/doc{i:02d}.rst.gz": f"document {i}\n" for i in range(10)}
    tree = package_tree(tmp_path / "tree", texts)
    out = tmp_path / "corpus"
    stats = linux_doc.write_corpus(tree, out, shards=4)
    parts = sorted(out.glob("part-*.jsonl"))
    assert [p.name for p in parts] == ["part-00.jsonl", "part-01.jsonl", "part-02.jsonl", "part-03.jsonl"]
    rows = [json.loads(line) for p in parts for line in p.read_text().splitlines()]
    assert [r["path"] for r in rows] == sorted(name[:-3] for name in texts)  # contiguous in path order
    assert stats == {"files": 10, "bytes": sum(len(t) for t in texts.values())}
    assert not list(tmp_path.glob(".corpus.tmp-*"))  # the staging folder was renamed into place
    (parts[0]).write_text(json.dumps({"path": "x", "text": "kept"}) + "\n")
    assert linux_doc.write_corpus(tree, out, shards=4)["files"] == 8  # reused, not rewritten


def test_bad_corpus_paths_are_named(tmp_path):
    with pytest.raises(linux_doc.CorpusError, match=r"no such file.*apt-get download linux-doc-6\.12"):
        list(linux_doc.documents(tmp_path / "missing.deb"))
    text = tmp_path / "notes.txt"
    text.write_text("hello")
    with pytest.raises(linux_doc.CorpusError, match=r"notes.txt: not a .deb"):
        list(linux_doc.documents(text))
    with pytest.raises(linux_doc.CorpusError, match="neither a folder holding"):
        list(linux_doc.documents(tmp_path))
    (tmp_path / "pkg" / linux_doc.DOCUMENTATION).mkdir(parents=True)
    with pytest.raises(linux_doc.CorpusError, match="no documentation files"):
        list(linux_doc.documents(tmp_path / "pkg"))
    assert not (tmp_path / "out").exists()
    with pytest.raises(linux_doc.CorpusError):
        linux_doc.write_corpus(tmp_path / "pkg", tmp_path / "out")
    assert not (tmp_path / "out").exists()  # nothing half-written
