"""ches_filter.inputs: the page releaser hands the dataset's mapped pages back and the data reads back the same."""

from __future__ import annotations

import os
import re

import pytest


def _mapped(files):
    """``[(start, stop, rss_kb)]`` of this process's mappings of ``files`` (from /proc/self/smaps)."""
    out = []
    current = None
    with open("/proc/self/smaps", encoding="utf-8", errors="replace") as handle:
        for line in handle:
            fields = line.split(maxsplit=5)
            if fields and re.fullmatch(r"[0-9a-f]+-[0-9a-f]+", fields[0]):
                current = None
                if len(fields) == 6 and fields[5].strip() in files:
                    start, stop = (int(x, 16) for x in fields[0].split("-"))
                    current = [start, stop, 0]
                    out.append(current)
            elif current is not None and fields[0] == "Rss:":
                current[2] = int(fields[1])
    return [tuple(m) for m in out]


@pytest.mark.skipif(not os.path.exists("/proc/self/smaps"), reason="the page releaser acts on Linux only")
def test_page_releaser_unmaps_the_dataset_pages_and_the_data_reads_back(tmp_path):
    import datasets

    from ches_filter.inputs import PageReleaser

    rows = {"text": [f"{i:06d} " + "lorem ipsum " * 80 for i in range(6000)]}  # ~6 MB of Arrow
    datasets.Dataset.from_dict(rows).save_to_disk(str(tmp_path / "ds"))
    ds = datasets.load_from_disk(str(tmp_path / "ds"))
    files = {os.path.realpath(f["filename"]) for f in ds.cache_files}
    assert files
    before = ds[:]["text"]  # touches every page of the mapping
    assert before == rows["text"]
    mapped = _mapped(files)
    assert mapped and sum(rss for *_, rss in mapped) > 1024, mapped  # over 1 MB resident

    release = PageReleaser(ds)
    assert release.files == files and release.madvise is not None
    calls = []
    real = release.madvise

    def spy(start, length, advice):
        result = real(start, length, advice)
        calls.append((start, length, advice, result))
        return result

    release.madvise = spy
    release()
    assert sorted((start, start + length) for start, length, *_ in calls) == sorted((a, b) for a, b, _ in mapped)
    assert all(advice == 4 and result == 0 for *_, advice, result in calls)  # MADV_DONTNEED, and it succeeded
    after = _mapped(files)
    assert sum(rss for *_, rss in after) < sum(rss for *_, rss in mapped) / 4, (mapped, after)
    assert ds[:]["text"] == rows["text"]  # faulted back in from the file, unchanged

    in_memory = datasets.Dataset.from_dict({"text": ["a"]})
    idle = PageReleaser(in_memory)
    assert idle.files == set() and idle.madvise is None
    idle()  # nothing to release, no error
