"""Where the page data of a checkpoint lands in the restored memory, as the agent reads it from CRIU's
images (``container/memimages.py``) to check it there (``artifact/memcheck.py``)."""

from __future__ import annotations

from pathlib import Path

import pytest

from dynamo_snapshot.agent.artifact import memcheck
from dynamo_snapshot.agent.container import memimages
from dynamo_snapshot.agent.container.memimages import PE_LAZY, PE_PARENT, PE_PRESENT, Span
from tests.agent import criu_images as img

PAGE = memimages.PAGE_SIZE


def _dump(tmp_path: Path, files: dict[str, bytes]) -> Path:
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    return tmp_path


def test_each_process_page_file_is_the_present_pages_of_its_pagemap_in_order(tmp_path: Path) -> None:
    images = _dump(tmp_path, {
        "pstree.img": img.pstree((1, [1, 7]), (9, [9])),
        "pagemap-1.img": img.pagemap(3, (0x1000, 2, PE_PRESENT), (0x8000, 4, PE_LAZY),
                                     (0x10000, 1, PE_PRESENT | PE_LAZY)),
        "pagemap-9.img": img.pagemap(4, (0x2000, 1, PE_PRESENT)),
        "pagemap-shmem-55.img": img.pagemap(5, (0, 3, PE_PRESENT)),
        "pages-3.img": b"", "pages-4.img": b"", "pages-5.img": b"",
        "mm-1.img": img.mm((0x7000, 0x9000, memimages.VMA_AREA_VDSO | 1), (0x1000, 0x3000, 1)),
        "core-7.img": img.core(rseq=(0x1fe0, 32)), "core-1.img": img.core(),
    })
    layout = memimages.read_layout(images, ["pages-3.img", "pages-4.img", "pages-5.img"])
    first = layout.process_of("pages-3.img")
    assert first is not None and first.pid == 1
    assert first.spans == (Span(0x1000, 2 * PAGE), Span(0x10000, PAGE))  # the lazy-only entry is not in the file
    assert first.kernel == ((0x1fe0, 0x2000), (0x7000, 0x9000))  # thread 7's rseq area, the vDSO
    assert layout.process_of("pages-4.img").spans == (Span(0x2000, PAGE),)  # type: ignore[union-attr]
    assert layout.shared == frozenset({"pages-5.img"})  # shared memory: copied and verified instead


def test_a_dump_with_pages_in_a_parent_image_is_refused_naming_the_pagemap(tmp_path: Path) -> None:
    images = _dump(tmp_path, {"pstree.img": img.pstree((1, [1])),
                              "pagemap-1.img": img.pagemap(1, (0x1000, 1, PE_PARENT))})
    with pytest.raises(ValueError, match=r"pagemap-1\.img has pages in a parent image"):
        memimages.read_layout(images, [])


@pytest.mark.parametrize("broken", [b"", b"\x19\x43\x56\x54\0\0\0\0", img.pagemap(1)[:-1] + b"\xff\xff\xff\xff"])
def test_a_malformed_pagemap_is_refused_naming_it(tmp_path: Path, broken: bytes) -> None:
    images = _dump(tmp_path, {"pstree.img": img.pstree((1, [1])), "pagemap-1.img": broken})
    with pytest.raises(ValueError, match=r"pagemap-1\.img"):
        memimages.read_layout(images, [])


def test_a_pagemap_of_a_process_the_tree_does_not_have_is_refused(tmp_path: Path) -> None:
    images = _dump(tmp_path, {"pstree.img": img.pstree((1, [1])), "pagemap-2.img": img.pagemap(1)})
    with pytest.raises(ValueError, match=r"pagemap-2\.img names process 2"):
        memimages.read_layout(images, [])


def test_the_kernel_ranges_are_cut_out_of_what_is_read_from_memory() -> None:
    kernel = ((0x1010, 0x1020), (0x2000, 0x3000))
    assert list(memcheck._split(0x1000, 0x1800, kernel)) == [
        (0x1000, 0x10, True), (0x1010, 0x10, False), (0x1020, 0xfe0, True), (0x2000, 0x800, False)]
    assert list(memcheck._split(0x1800, 0x1000, kernel)) == [(0x1800, 0x800, True), (0x2000, 0x800, False)]


def test_a_chunk_of_a_page_file_is_found_across_the_spans_it_covers() -> None:
    process = memimages.ProcessPages(1, "pages-1.img", (Span(0x1000, 2 * PAGE), Span(0x9000, 2 * PAGE)), ())
    assert list(memcheck._pieces(process, PAGE, 2 * PAGE)) == [(PAGE, 0x2000, PAGE), (2 * PAGE, 0x9000, PAGE)]
