"""Where a checkpoint's page data lands in the restored processes' memory, read from CRIU's images.

    pstree    ``pstree.img``: every process (its PID in the checkpoint's PID namespace) and its threads
    pagemaps  ``pagemap-<pid>.img``: the head names the process's ``pages-<id>.img``; each entry is a
              range of virtual addresses whose pages follow each other in that file when the entry is
              PE_PRESENT (CRIU's criu/pagemap.c). PE_PARENT (pages in a parent image) is refused: an
              artifact is one complete dump
    kernel    address ranges whose restored bytes the kernel decides, not CRIU's copy of the image:
              the vDSO (the running kernel's own is put in its place, or a proxy of it), AIO rings
              (recreated by the kernel), shadow stacks (CRIU rebuilds them with the CPU's restore
              tokens), each thread's rseq area (the kernel writes the CPU numbers
              the moment the thread is scheduled); from ``mm-<pid>.img`` and ``core-<tid>.img``
    shared    every other ``pages-<id>.img`` (shared anonymous memory and memfd contents, named by
              ``pagemap-shmem-<id>.img``): not in one process at one address, so not checked in memory

Pure decoding of files the restore already verified (they are CRIU's parsed images); every image is
read up to a bound, and a malformed one raises ``ValueError`` naming the file.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from dynamo_snapshot.agent.container.criuimage import (
    CORE_MAGIC,
    MM_MAGIC,
    PAGEMAP_MAGIC,
    PSTREE_MAGIC,
    Fields,
    fields,
    ints,
    message,
    one,
    records,
)

PAGE_SIZE = 4096  # CRIU's PAGE_SIZE on x86-64 and the 4 KiB arm64 kernels it dumps with
MAX_IMAGE_BYTES = 256 << 20  # a pagemap of a fragmented 100 GB process is a few MiB

PE_PARENT, PE_LAZY, PE_PRESENT = 1 << 0, 1 << 1, 1 << 2
VMA_AREA_VDSO, VMA_AREA_AIORING, VMA_AREA_SHSTK = 1 << 3, 1 << 13, 1 << 15

_PAGEMAP = re.compile(r"pagemap-(\d+)\.img")


@dataclass(frozen=True)
class Span:
    """``length`` bytes of a page file, in file order, restored at ``vaddr``."""

    vaddr: int
    length: int


@dataclass(frozen=True)
class ProcessPages:
    pid: int  # in the checkpoint's PID namespace
    pages: str  # the page file, relative to the images
    spans: tuple[Span, ...]
    kernel: tuple[tuple[int, int], ...]  # [start, end) ranges whose restored bytes the kernel decides, sorted
    offsets: tuple[int, ...] = ()  # where each span starts in the page file

    def __post_init__(self) -> None:
        starts, at = [], 0
        for span in self.spans:
            starts.append(at)
            at += span.length
        object.__setattr__(self, "offsets", tuple(starts))

    @property
    def size(self) -> int:
        return sum(s.length for s in self.spans)


@dataclass(frozen=True)
class PageLayout:
    processes: tuple[ProcessPages, ...]
    shared: frozenset[str]  # page files not checked in memory

    def process_of(self, pages: str) -> ProcessPages | None:
        return next((p for p in self.processes if p.pages == pages), None)


def _image(path: Path, magic: int, kind: str) -> list[Fields]:
    with path.open("rb") as f:
        data = f.read(MAX_IMAGE_BYTES + 1)
    if len(data) > MAX_IMAGE_BYTES:
        raise ValueError(f"{path} is larger than the {MAX_IMAGE_BYTES} bytes a {kind} image may take")
    try:
        return [fields(r) for r in records(data, magic, kind)]
    except (ValueError, IndexError) as exc:
        raise ValueError(f"{path} is not a readable CRIU {kind} image: {exc}") from exc


def pagemap(path: Path) -> tuple[int, tuple[Span, ...]]:
    """The pages file ID a pagemap names and the spans its present entries put in that file."""
    head, *entries = _image(path, PAGEMAP_MAGIC, "pagemap") or [{}]
    if 1 not in head:
        raise ValueError(f"{path} has no pagemap head")
    spans: list[Span] = []
    for entry in entries:
        flags = one(entry, 4, -1)
        if one(entry, 3):  # in_parent, before flags existed
            flags = PE_PARENT
        elif flags == -1:
            flags = PE_PRESENT
        if flags & PE_PARENT:
            raise ValueError(f"{path} has pages in a parent image; an artifact is one complete dump")
        pages = one(entry, 5) if 5 in entry else one(entry, 2)
        if flags & PE_PRESENT and pages:
            vaddr, length = one(entry, 1), pages * PAGE_SIZE
            if spans and spans[-1].vaddr + spans[-1].length == vaddr:  # one run of memory and of the file
                spans[-1] = Span(spans[-1].vaddr, spans[-1].length + length)
            else:
                spans.append(Span(vaddr, length))
    return one(head, 1), tuple(spans)


def kernel_ranges(images: Path, pid: int, threads: list[int]) -> list[tuple[int, int]]:
    """The vDSO, AIO rings and shadow stacks of the process, and the rseq area of each of its threads."""
    ranges: list[tuple[int, int]] = []
    mm = images / f"mm-{pid}.img"
    if mm.exists():
        entry = _image(mm, MM_MAGIC, "mm")[0]
        for raw in entry.get(14, []):
            vma = fields(raw) if isinstance(raw, bytes) else {}
            if one(vma, 7) & (VMA_AREA_VDSO | VMA_AREA_AIORING | VMA_AREA_SHSTK):
                ranges.append((one(vma, 1), one(vma, 2)))
    for tid in threads:
        core = images / f"core-{tid}.img"
        if not core.exists():
            continue
        thread = message(_image(core, CORE_MAGIC, "core")[0], 5)
        rseq = message(thread, 15) if thread else None
        if rseq and one(rseq, 1) and one(rseq, 2):
            ranges.append((one(rseq, 1), one(rseq, 1) + one(rseq, 2)))
    return sorted(ranges)


def read_layout(images: Path, page_files: Iterable[str]) -> PageLayout:
    """Every process's page file and where its bytes land; the rest of ``page_files`` (the artifact's
    page data) left to other checks - all of them without a ``pstree.img`` (not a dump CRIU can
    restore, so nothing is checked in memory)."""
    every = set(page_files)
    if not (images / "pstree.img").exists():
        return PageLayout((), frozenset(every))
    tree = _image(images / "pstree.img", PSTREE_MAGIC, "pstree")
    threads = {one(p, 1): ints(p.get(5, [])) for p in tree}
    processes = []
    for path in sorted(images.glob("pagemap-*.img")):
        match = _PAGEMAP.fullmatch(path.name)
        if match is None:  # pagemap-shmem-<id>.img
            continue
        pid = int(match.group(1))
        if pid not in threads:
            raise ValueError(f"{path.name} names process {pid}, which pstree.img does not list")
        pages_id, spans = pagemap(path)
        processes.append(ProcessPages(pid, f"pages-{pages_id}.img", spans,
                                      tuple(kernel_ranges(images, pid, threads[pid] or [pid]))))
    named = {p.pages for p in processes}
    if len(named) != len(processes):
        raise ValueError(f"{images}: two pagemaps name the same page file")
    return PageLayout(tuple(processes), frozenset(every - named))
