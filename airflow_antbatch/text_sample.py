"""Row counts of JSONL and CSV files, estimated from the heads of a few of them.

A text file says nothing of its rows until it is read, and reading a million files to count
them would cost the planner a million whole-object GETs. So the planner reads the first
``SAMPLE_BYTES`` of at most ``SAMPLE_FILES`` files spread over the listing, in one batched
call, and takes their average bytes per row for every file. A sampled file no bigger than the
sample is counted exactly. The estimate only sizes shards: a shard is a byte range, so each row
belongs to the range its first byte falls in whatever the estimate's error (``read_line_range``).
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

from airflow_antbatch.errors import InputError

if TYPE_CHECKING:
    from collections.abc import Sequence

    import fsspec

SAMPLE_BYTES = 64 * 2**10
SAMPLE_FILES = 8


@dataclasses.dataclass(frozen=True)
class TextSample:
    """What the heads of a few files tell about all of them.

    ``splittable`` is False for CSV whose sample holds a line with an odd number of quotes: a
    quoted value spanning lines, which a byte range cut at a line start would tear apart.
    """

    bytes_per_row: float
    counted: dict[str, int]  # exact rows of the sampled files read whole
    splittable: bool

    def rows(self, path: str, size: int) -> float:
        """The file's rows: counted, or its size over the sample's bytes per row."""
        exact = self.counted.get(path)
        return float(exact) if exact is not None else size / self.bytes_per_row


def sample_text(fs: fsspec.AbstractFileSystem, fmt: str, files: Sequence[tuple[str, int]]) -> TextSample:
    """Sample ``files``, (url, size) pairs in listing order: one batched read of a few heads."""
    picked = sample_indexes(len(files), SAMPLE_FILES)
    chosen = [files[i] for i in picked]
    heads = fs.cat_ranges(
        [fs._strip_protocol(url) for url, _ in chosen], 0, [min(size, SAMPLE_BYTES) for _, size in chosen]
    )
    header = fmt == "csv"
    row_bytes = rows = 0
    counted: dict[str, int] = {}
    splittable = True
    for (url, size), head in zip(chosen, heads, strict=True):
        if isinstance(head, BaseException):
            raise InputError(f"cannot read the head of input file {url} to estimate its rows: {head}") from head
        lines = head.splitlines(keepends=True)
        whole = len(head) >= size
        complete = lines if whole else lines[:-1]  # the head's last line may be cut off
        data = complete[1:] if header else complete
        if whole:
            counted[url] = sum(1 for line in data if line.strip())
        row_bytes += sum(len(line) for line in data)
        rows += len(data)
        splittable = splittable and not (header and any(odd_quotes(line) for line in complete))
    # No whole row in any head: every row is longer than a head, so this bounds the rows from above.
    bytes_per_row = row_bytes / rows if rows else float(SAMPLE_BYTES)
    return TextSample(bytes_per_row, counted, splittable)


def sample_indexes(count: int, wanted: int) -> list[int]:
    """Up to ``wanted`` positions spread evenly over ``count`` items, the first and last included."""
    if count <= wanted:
        return list(range(count))
    return sorted({round(i * (count - 1) / (wanted - 1)) for i in range(wanted)})


def odd_quotes(line: bytes) -> bool:
    """A CSV line with an odd number of ``"`` opens or closes a value that spans lines."""
    return line.count(b'"') % 2 == 1
