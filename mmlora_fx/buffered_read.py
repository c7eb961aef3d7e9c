"""A safetensors file read into one buffer, its tensors views of it, and its values checked while
it is read.

The file is read in chunks by two threads at once: one background thread from its start, and the
caller from its end once it has parsed the header (from a small read of its own), built the
views and validated names and shapes; the caller checks the values of each part as soon as it
is read (the background thread's, or its own), and reads half of what is left when no part is
waiting. `preadv` and torch ops release the GIL. Where a core (and memory bandwidth) is free, the
Python and the checks run under the read; where none is (a busy host), the caller does the work
itself, in about the time of doing it in order, instead of sleeping until a thread that gets no
core is done. One extra thread, whatever the number of cores.

Nothing here raises for a corrupt file (a read's OSError propagates): where the bytes read are
not the file safetensors validated
(another dtype, a misaligned tensor, a header that changed, a file that got shorter or longer),
`finish` says so and the caller reads the file with safetensors instead, which gives its errors.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import threading

import torch

DTYPES = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32, "F64": torch.float64}
# Bytes per read of the background thread: small enough that the caller can check what it read
# soon (and that the last one, which the caller may wait for, is short), large enough that the
# thread takes the GIL seldom (a thread waiting for it while the other runs Python waits up to
# sys.getswitchinterval(), 5 ms; the caller reads meanwhile).
CHUNK_BYTES = 8 << 20


@dataclasses.dataclass
class FileTensors:
    """A weights file's tensors by name (in safetensors' order) and, when read into one buffer,
    that buffer (the whole file, bytes) and its data region as the tensors' one dtype (None when
    they have several, or the file was read tensor by tensor). With `read`, the buffer is still
    being filled: the tensors' values are there once `finish` returned True."""

    tensors: dict[str, torch.Tensor]
    buffer: torch.Tensor | None = None
    data: torch.Tensor | None = None
    read: ChunkedRead | None = None

    def finish(self) -> bool:
        """Read what is left; whether the buffer holds the file as its header describes it."""
        return self.read is None or self.read.finish()

    def close(self) -> None:
        """Stop the read (if any) and wait for its thread: nothing writes the buffer afterwards."""
        if self.read is not None:
            self.read.cancel()

    def value_bound(self) -> float | None:
        """The largest magnitude in the data region, when every value is finite; None when some
        value is not, the file has no single-dtype data region, or the read was incomplete (then
        `finish` is False). Reads the file to its end, checking each part once it is read, with
        `torch.aminmax` (min and max are NaN when any value is, infinite when one is: one pass, no
        temporary; isfinite().all() is 25x slower on bf16 on a CPU)."""
        data = self.data
        if data is None:
            self.finish()
            return None
        itemsize = data.element_size()
        start = data.storage_offset() * itemsize  # the data region's first byte in the buffer
        end = start + data.numel() * itemsize
        parts = [(start, end)] if self.read is None else self.read.parts()
        low, high, finite, checked = math.inf, -math.inf, True, 0
        for begin, stop in parts:
            begin, stop = max(begin, start), min(stop, end)
            if not finite or stop <= begin:
                continue  # read on: the caller then checks tensor by tensor
            # Parts start and end at multiples of the dtype's size, as the data region does.
            part = data[(begin - start) // itemsize:(stop - start) // itemsize]
            part_low, part_high = (value.item() for value in torch.aminmax(part))
            finite = math.isfinite(part_low) and math.isfinite(part_high)
            low, high, checked = min(low, part_low), max(high, part_high), checked + stop - begin
        if not self.finish() or not finite or checked != end - start:
            return None
        return max(abs(low), abs(high))


class ChunkedRead:
    """`handle` (an unbuffered file of `buffer`'s size) read into `buffer`: from its start by one
    background thread, in chunks of `chunk` bytes, and from its end by the caller (`parts`), each
    taking the next part under a lock, until they meet; then closed."""

    def __init__(self, handle, buffer: torch.Tensor, chunk: int | None = None):
        chunk = chunk or CHUNK_BYTES
        self.size = buffer.numel()
        self.header = b""  # the bytes the file must start with (the header parsed before it was read)
        self._handle, self._fd, self._view, self._chunk = handle, handle.fileno(), memoryview(buffer.numpy()), chunk
        self._lock = threading.Lock()
        self._front = 0  # the thread has taken [0, _front) to read
        self._back = self.size  # the caller has taken [_back, size)
        self._front_read = 0  # the thread has read [0, _front_read)
        self._handed = 0  # `parts` has handed out the thread's [0, _handed)
        self._short = False  # a read ended before its part did: the file is shorter than its size
        self._error: BaseException | None = None
        self._finished: bool | None = None
        self._thread = threading.Thread(target=self._run, name="mmlora-fx-read", daemon=True)
        self._thread.start()

    def _read(self, begin: int, end: int) -> bool:
        while begin < end:
            count = os.preadv(self._fd, [self._view[begin:end]], begin)
            if not count:
                return False
            begin += count
        return True

    def _run(self) -> None:
        try:
            while True:
                with self._lock:
                    begin, end = self._front, min(self._front + self._chunk, self._back)
                    if begin >= end or self._short:
                        return
                    self._front = end
                if not self._read(begin, end):
                    self._short = True
                    return
                with self._lock:
                    self._front_read = end
        except BaseException as error:  # noqa: BLE001 (raised by `finish`, in the caller's thread)
            self._error = error
            with self._lock:
                self._back = self._front  # the caller reads nothing more either

    def parts(self):
        """Yield `(begin, end)` byte ranges of the buffer as they are read, each once, together the
        whole file unless a read ended short: the thread's first, else one the caller reads now
        (half of what is left, from the end: the thread reads on meanwhile). Waits for the thread's
        last chunk at the end."""
        while True:
            with self._lock:
                ready = self._front_read
                if ready <= self._handed:
                    end = self._back
                    # A multiple of 8 (or `size` less chunks): of every dtype's size, as the data
                    # region's start and end are.
                    middle = (self._front + (end - self._front) // 2) // 8 * 8
                    begin = max(self._front, min(end - self._chunk, middle))
                    if begin >= end or self._short:
                        break
                    self._back = begin
            if ready > self._handed:
                yield self._handed, ready
                self._handed = ready
                continue
            if not self._read(begin, end):
                self._short = True
                break
            yield begin, end
        self._thread.join()
        if self._front_read > self._handed and not self._short:
            yield self._handed, self._front_read
            self._handed = self._front_read

    def finish(self) -> bool:
        """Read what is left (with the caller's thread too); whether the whole file was read, was
        no longer than its size and starts with `header` (a read's error is raised)."""
        if self._finished is None:
            for _ in self.parts():
                pass
            if self._error is not None:
                raise self._error
            complete = (not self._short and self._front_read == self._back and self._handed == self._front_read
                        and not os.pread(self._fd, 1, self.size))
            self._finished = complete and bytes(self._view[:len(self.header)]) == self.header
            self._handle.close()
        return self._finished

    def cancel(self) -> None:
        """Stop after the chunk being read, and wait for the thread; close the file."""
        with self._lock:
            self._back = self._front
        self._thread.join()
        if self._finished is None:
            self._finished = False  # what is read of a cancelled read is not the file
        self._handle.close()


def parse_header(prefix: bytes, size: int, keys: list[str]) -> tuple[int, tuple[tuple, ...]] | None:
    """The data region's start and `(begin, end, key, dtype, shape, strides)` per tensor, sorted by
    offset, from `prefix` (the file's first bytes, its header whole) of a file of `size` bytes;
    None unless every tensor is one of `DTYPES`, aligned to its dtype, and the header holds
    exactly `keys` (what safetensors validated), offsets covering the data region exactly, sizes
    that match shapes."""
    return _parsed(prefix, size, tuple(keys))


@functools.lru_cache(maxsize=8)  # adapters of one model and rank have the same header: ~0.7 ms each
def _parsed(prefix: bytes, size: int, keys: tuple[str, ...]) -> tuple[int, tuple[tuple, ...]] | None:
    if len(prefix) < 8:
        return None
    start = 8 + int.from_bytes(prefix[:8], "little")
    if start > size or start > len(prefix):
        return None
    try:
        header = json.loads(prefix[8:start])
    except (UnicodeDecodeError, json.JSONDecodeError):
        return None
    if not isinstance(header, dict):
        return None
    header.pop("__metadata__", None)
    if len(header) != len(keys) or sorted(header) != sorted(keys):
        return None
    entries = []
    for key in keys:
        entry = header[key]
        try:
            dtype, shape, (begin, end) = DTYPES[entry["dtype"]], entry["shape"], entry["data_offsets"]
        except (KeyError, TypeError, ValueError):
            return None
        if type(shape) is not list or type(begin) is not int or type(end) is not int:
            return None
        strides, step, numel = [], 1, 1  # contiguous strides, as torch gives them (an empty dim counts as 1)
        for extent in reversed(shape):
            if type(extent) is not int or extent < 0:
                return None
            strides.append(step)
            step *= max(extent, 1)
            numel *= extent
        itemsize = dtype.itemsize
        if not 0 <= begin <= end or end - begin != numel * itemsize or (start + begin) % itemsize:
            return None
        entries.append((begin, end, key, dtype, tuple(shape), tuple(strides[::-1])))
    entries.sort(key=lambda entry: entry[:2])
    position = 0
    for entry in entries:
        if entry[0] != position:
            return None
        position = entry[1]
    if position != size - start:
        return None
    return start, tuple(entries)


def views(buffer: torch.Tensor, start: int, entries: tuple[tuple, ...], keys: list[str]) -> FileTensors | None:
    """`entries` (`parse_header`'s) as views of `buffer` (the file's bytes), by `keys`' order; None
    when the data region does not start aligned to a dtype met."""
    length = entries[-1][1] if entries else 0
    regions: dict[torch.dtype, torch.Tensor] = {}  # the data region as each dtype met
    found = {}
    for begin, _, key, dtype, shape, strides in entries:
        region = regions.get(dtype)
        if region is None:
            if start % dtype.itemsize:
                return None
            region = regions[dtype] = buffer[start:start + length // dtype.itemsize * dtype.itemsize].view(dtype)
        # One op per tensor (a slice and a view are two); as_strided's offset is the storage's.
        found[key] = region.as_strided(shape, strides, region.storage_offset() + begin // dtype.itemsize)
    tensors = {key: found[key] for key in keys}
    data = next(iter(regions.values())) if len(regions) == 1 and length else None
    return FileTensors(tensors, buffer, data)


def start_read(handle, buffer: torch.Tensor, keys: list[str]) -> FileTensors | None:
    """The file (`handle`, unbuffered, at its start, of `buffer`'s size) as views of `buffer`, read
    into it from now on (`FileTensors.read`, which closes `handle` when done);
    None when `parse_header` refuses its header, which is read first with a small read of its own
    (and compared with the buffer's bytes once read)."""
    if not hasattr(os, "preadv"):  # not on Windows: safetensors reads the file there
        return None
    size = buffer.numel()
    fd = handle.fileno()
    prefix = os.pread(fd, 8, 0)
    if len(prefix) == 8:
        prefix += os.pread(fd, min(size, int.from_bytes(prefix, "little")), 8)
    read = ChunkedRead(handle, buffer)
    try:
        parsed = parse_header(prefix, size, keys)
        file = views(buffer, *parsed, keys) if parsed is not None else None
    except BaseException:
        read.cancel()
        raise
    if file is None:
        read.cancel()
        return None
    read.header = prefix[:parsed[0]]
    file.read = read
    return file
