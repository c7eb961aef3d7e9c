"""Reading a weights file in parts by two threads while its values are checked (`buffered_read`):
the parts cover the file once, a bad value in any part (the last one too) is refused as before,
and a file that gets shorter, longer or another header while read falls back to safetensors."""

import copy
import json
import os
import shutil
import threading

import pytest
import torch
from safetensors.torch import load_file, save_file

from mmlora_fx import buffered_read, peft_format
from mmlora_fx.adapter_manager import AdapterManager
from mmlora_fx.errors import AdapterChangedError, AdapterFileError, AdapterTargetError, AdapterValueError
from mmlora_fx.linear_index import LinearIndex
from mmlora_fx.partitions import discover_partitions
from mmlora_fx.peft_format import WEIGHTS_FILE, read_factors
from mmlora_fx.serving import ServingPlan

from .conftest import cached_model
from .peft_helpers import all_targets, make_adapter

CHUNK = 512  # bytes (a multiple of 8): the tiny adapter's file then takes dozens of parts


@pytest.fixture(scope="module")
def model():
    return copy.deepcopy(cached_model("tiny-qwen2-vl")).to(torch.bfloat16)


@pytest.fixture(scope="module")
def linears(model):
    return LinearIndex(model, discover_partitions(model))


@pytest.fixture(scope="module")
def adapter(tmp_path_factory, model):
    path = make_adapter(model, tmp_path_factory.mktemp("bf16") / "a", all_targets("tiny-qwen2-vl"), r=4,
                        lora_alpha=12, seed=5)
    tensors = {key: value.to(torch.bfloat16) for key, value in load_file(str(path / WEIGHTS_FILE)).items()}
    save_file(tensors, str(path / WEIGHTS_FILE))
    assert (path / WEIGHTS_FILE).stat().st_size > 16 * CHUNK
    return path


@pytest.fixture
def small_chunks(monkeypatch):
    monkeypatch.setattr(buffered_read, "CHUNK_BYTES", CHUNK)


def no_reader_thread_left():
    return not any(thread.name == "mmlora-fx-read" for thread in threading.enumerate())


@pytest.mark.parametrize("who", ["thread", "caller", "both"])
def test_the_parts_cover_the_file_once_and_hold_its_bytes(adapter, small_chunks, monkeypatch, who):
    """Whoever reads (the thread alone, the caller alone, both), the parts cover the file once."""
    real_read = buffered_read.ChunkedRead._read
    if who == "caller":  # a thread that gets no core
        monkeypatch.setattr(buffered_read.ChunkedRead, "_run", lambda self: None)
    elif who == "both":  # the thread reads once the caller has read its first part, from the end,
        caller_read, thread_read = threading.Event(), threading.Event()  # and the caller then waits for it

        def ordered(self, begin, end):
            if threading.current_thread().name == "mmlora-fx-read":
                assert caller_read.wait(10)
                read = real_read(self, begin, end)
                thread_read.set()
                return read
            if caller_read.is_set():
                assert thread_read.wait(10)
            read = real_read(self, begin, end)
            caller_read.set()
            return read

        monkeypatch.setattr(buffered_read.ChunkedRead, "_read", ordered)
    file = peft_format._open_tensors("a", adapter)
    if who == "thread":
        file.read._thread.join()
    parts = list(file.read.parts())
    size = file.buffer.numel()
    if who == "thread":
        assert parts == [(0, size)]
    else:  # the caller's from the end, halving what is left
        assert parts[0][1] == size and parts[0][0] >= size // 2 - 8
        assert len(parts) > (4 if who == "caller" else 2)
    if who == "both":
        assert any(begin == 0 for begin, _ in parts)  # the thread's, from the start
    position = 0
    for begin, end in sorted(parts):
        assert begin == position and end > begin
        position = end
    assert position == size
    assert file.finish()
    assert bytes(file.buffer.numpy()) == (adapter / WEIGHTS_FILE).read_bytes()
    for key, tensor in load_file(str(adapter / WEIGHTS_FILE)).items():
        assert torch.equal(file.tensors[key], tensor), key
    file.close()
    assert no_reader_thread_left()


def last_tensor(path):
    """The key of the tensor whose data ends the file, from its header."""
    raw = (path / WEIGHTS_FILE).read_bytes()
    header = json.loads(raw[8:8 + int.from_bytes(raw[:8], "little")])
    header.pop("__metadata__", None)
    return max(header, key=lambda key: header[key]["data_offsets"][1])


def poisoned(source, target, where, value):
    """`source` with `value` written into bf16 element 0 of the first data bytes or the last ones."""
    shutil.copytree(source, target)
    weights = target / WEIGHTS_FILE
    raw = bytearray(weights.read_bytes())
    start = 8 + int.from_bytes(raw[:8], "little")
    position = start if where == "first" else len(raw) - 2
    raw[position:position + 2] = torch.tensor([value], dtype=torch.bfloat16).view(torch.int16).numpy().tobytes()
    weights.write_bytes(bytes(raw))
    return target


@pytest.mark.parametrize("where, value, message", [
    ("first", float("nan"), "holds NaN or infinite values"), ("first", float("-inf"), "holds NaN or infinite values"),
    ("last", float("nan"), "holds NaN or infinite values"), ("last", float("inf"), "holds NaN or infinite values"),
    ("last", 3e38, "lora_B times its scaling 3 overflows bfloat16")])  # finite in bf16, not times alpha/r = 3
def test_a_bad_value_in_any_part_is_refused_as_when_read_whole(tmp_path, adapter, linears, monkeypatch, where, value,
                                                                message):
    assert last_tensor(adapter).endswith("lora_B.weight")
    path = poisoned(adapter, tmp_path / "bad", where, value)
    with pytest.raises(AdapterValueError) as whole:  # the file in one part
        read_factors("a", path, linears, dtype=torch.bfloat16)
    monkeypatch.setattr(buffered_read, "CHUNK_BYTES", CHUNK)
    with pytest.raises(AdapterValueError, match=message) as parts:
        read_factors("a", path, linears, dtype=torch.bfloat16)
    assert str(parts.value) == str(whole.value)
    if where == "last":
        module = last_tensor(path).removeprefix("base_model.model.").rsplit(".lora_", 1)[0]
        assert parts.value.module == module
    assert no_reader_thread_left()


def manager_for(model, linears):
    serving = ServingPlan.build(linears, partitions=["tower", "connector", "language_model"])
    return AdapterManager(linears, serving, max_loras=2, max_lora_rank=4)


def changed_when_read(monkeypatch, path, how):
    """The weights file of `path` changed after safetensors validated it and its header was read,
    before its parts are."""
    real = buffered_read.ChunkedRead.__init__

    def init(self, handle, buffer, *args, **kwargs):
        weights = path / WEIGHTS_FILE
        if os.path.samefile(os.readlink(f"/proc/self/fd/{handle.fileno()}"), weights):
            if how == "truncated":
                os.truncate(weights, weights.stat().st_size // 2)
            elif how == "header":  # the same size, its metadata changed
                weights.write_bytes(weights.read_bytes().replace(b'"format":"pt"', b'"format":"px"', 1))
            else:  # longer
                with open(weights, "ab") as appended:
                    appended.write(b"\0" * 64)
        real(self, handle, buffer, *args, **kwargs)

    monkeypatch.setattr(buffered_read.ChunkedRead, "__init__", init)


@pytest.mark.parametrize("how", ["truncated", "longer"])
def test_a_file_changed_while_read_in_parts_is_refused_and_nothing_is_lost(tmp_path, model, linears, adapter,
                                                                          small_chunks, monkeypatch, how):
    manager = manager_for(model, linears)
    manager.load("kept", adapter)
    [slot] = manager.activate(["kept"])
    before = {module: (buffers.lora_a[slot].clone(), buffers.lora_b[slot].clone())
              for module, buffers in manager.buffers.items()}
    path = tmp_path / "c"
    shutil.copytree(adapter, path)
    changed_when_read(monkeypatch, path, how)
    with pytest.raises(AdapterChangedError, match="changed on disk while it was being read"):
        manager.load("c", path)
    assert manager.names == ["kept"] and manager.cpu_cached == ["kept"]
    [slot] = manager.activate(["kept"])
    for module, (a, b) in before.items():
        buffers = manager.buffers[module]
        assert torch.equal(buffers.lora_a[slot], a) and torch.equal(buffers.lora_b[slot], b), module
    assert no_reader_thread_left()


def test_a_truncated_read_is_read_again_by_safetensors_which_refuses_it(tmp_path, linears, adapter, small_chunks,
                                                                        monkeypatch):
    path = tmp_path / "t"
    shutil.copytree(adapter, path)
    changed_when_read(monkeypatch, path, "truncated")
    with pytest.raises(AdapterFileError, match="corrupt or unreadable"):
        read_factors("t", path, linears, dtype=torch.bfloat16)
    assert no_reader_thread_left()


def test_a_header_changed_while_read_is_read_again_by_safetensors(tmp_path, linears, adapter, small_chunks,
                                                                  monkeypatch):
    """Same size, another header (its metadata): the bytes read are not the header parsed."""
    path = tmp_path / "h"
    shutil.copytree(adapter, path)
    weights = path / WEIGHTS_FILE
    save_file(load_file(str(weights)), str(weights), metadata={"format": "pt"})
    assert b'"format":"pt"' in weights.read_bytes()
    changed_when_read(monkeypatch, path, "header")  # after its header was read, before its parts
    real_load, reads = peft_format._load_file, []
    monkeypatch.setattr(peft_format, "_load_file", lambda *args: reads.append(args) or real_load(*args))
    factors = read_factors("h", path, linears, dtype=torch.bfloat16)
    assert len(reads) == 1 and factors.buffer is None  # read again, tensor by tensor
    expected = read_factors("h", adapter, linears, dtype=torch.bfloat16)
    for module, pair in expected.modules.items():
        assert torch.equal(factors.modules[module].lora_b, pair.lora_b), module


def test_an_error_found_from_the_header_stops_the_read(tmp_path, linears, adapter, small_chunks):
    """Refused before the values are read (a target the model lacks): no thread reads on."""
    path = tmp_path / "x"
    shutil.copytree(adapter, path)
    tensors = load_file(str(path / WEIGHTS_FILE))
    key = sorted(tensors)[0]
    tensors["base_model.model.missing.lora_A.weight"] = tensors[key].clone()
    tensors["base_model.model.missing.lora_B.weight"] = tensors[key].t().contiguous()
    save_file(tensors, str(path / WEIGHTS_FILE))
    with pytest.raises(AdapterTargetError):
        read_factors("x", path, linears, dtype=torch.bfloat16)
    assert no_reader_thread_left()
