"""Read tasks: the units of preparation work, planned from the source's metadata only, and their documents.

A task is a run of consecutive source files (or a row range of one Hugging Face Arrow file) of about
:func:`task_bytes` bytes. The plan depends on the corpus alone (file sizes, row counts), never on the cluster,
so the shard files come out the same for any number of workers. :func:`task_documents` runs in Ray workers: it
reads the task's bytes straight from their filesystem (local, ``s3://`` ...), parses them by format
(:meth:`~mdlm.data.sources.SourceFile.documents`) and assigns every document to its split by key.
"""

from __future__ import annotations

from dataclasses import dataclass

from mdlm.config import DataConfig
from mdlm.data.sources import DataError, Source, document_key, hf_slice
from mdlm.data.splits import split_of

MIN_TASK_BYTES = 256 * 2**10
MAX_TASK_BYTES = 8 * 2**20
TASKS_PER_CORPUS = 32  # below MAX_TASK_BYTES a corpus is cut into about this many tasks


@dataclass(frozen=True)
class ReadTask:
    """``files``: indices into ``source.files``; or, for a Hugging Face dataset, rows ``[start, stop)`` of its Arrow
    file ``hf_file`` (an index into ``source.hf_files``), whose first row is row ``offset`` of the split."""

    index: int
    files: tuple[int, ...] = ()
    hf_file: int = -1
    start: int = 0
    stop: int = 0
    offset: int = 0


@dataclass
class TaskDocuments:
    """A task's documents in corpus order: texts and their splits; ``error``: the input problem, if any."""

    texts: list[str]
    splits: list[str]
    error: str | None = None


def task_bytes(total: int) -> int:
    """Target bytes per task for a corpus of ``total`` bytes: about 1/32 of it, within 256 KiB .. 8 MiB."""
    return max(MIN_TASK_BYTES, min(MAX_TASK_BYTES, total // TASKS_PER_CORPUS))


def plan_tasks(source: Source) -> list[ReadTask]:
    """The tasks of ``source``, in corpus order: consecutive files until a task reaches :func:`task_bytes` (a
    bigger file is a task of its own), or slices of each Hugging Face Arrow file of about that many bytes."""
    target = task_bytes(source.num_bytes)
    tasks: list[ReadTask] = []
    if source.kind == "hf":
        offset = 0
        for file_index, (_, rows, size) in enumerate(source.hf_files):
            step = max(1, rows * target // max(size, 1))
            for start in range(0, rows, step):
                tasks.append(ReadTask(len(tasks), hf_file=file_index, start=start, stop=min(rows, start + step),
                                      offset=offset + start))
            offset += rows
        return tasks
    current: list[int] = []
    size = 0
    for index, file in enumerate(source.files):
        if current and file.size >= target:  # a file of a task's size or more is a task of its own
            tasks.append(ReadTask(len(tasks), files=tuple(current)))
            current, size = [], 0
        current.append(index)
        size += file.size
        if size >= target:
            tasks.append(ReadTask(len(tasks), files=tuple(current)))
            current, size = [], 0
    if current:
        tasks.append(ReadTask(len(tasks), files=tuple(current)))
    return tasks


def task_documents(task: ReadTask, source: Source, config: DataConfig, only_split: str | None = None) -> TaskDocuments:
    """Read, parse and split one task's documents (keys ``file/key:index`` or ``NAME:row`` as everywhere)."""
    out = TaskDocuments([], [])

    def add(key: str, text: str) -> None:
        split = split_of(key, config)
        if only_split is None or split == only_split:
            out.texts.append(text)
            out.splits.append(split)

    if task.hf_file >= 0:
        path = source.hf_files[task.hf_file][0]
        values = hf_slice(path, task.start, task.stop, config.text_field).to_pylist()
        for row, text in enumerate(values, start=task.offset):
            if text:
                add(document_key(source.hf_key, row), text)
        return out
    for index in task.files:
        file = source.files[index]
        try:
            docs = file.documents(source.read(file), config)
        except DataError as exc:
            return TaskDocuments([], [], str(exc))
        for doc_index, text in docs:
            add(document_key(file.key, doc_index), text)
    return out
