"""Loading an adapter fast (#22): one read into one buffer, values checked in one pass, the buffer
kept as the CPU-cache entry when the file already is the slot layout; the same slots, errors and
refusals as reading each matrix on its own."""

import copy

import pytest
import torch
from safetensors.torch import load_file, save_file

from mmlora_fx import peft_format
from mmlora_fx.adapter_manager import AdapterManager, _coalesced
from mmlora_fx.errors import AdapterValueError
from mmlora_fx.linear_index import LinearIndex
from mmlora_fx.partitions import discover_partitions
from mmlora_fx.peft_format import WEIGHTS_FILE, fold_into, read_adapter, read_factors
from mmlora_fx.serving import ServingPlan

from .conftest import cached_model
from .peft_helpers import all_targets, make_adapter

RANK = 4


@pytest.fixture(scope="module")
def bf16_model():
    return copy.deepcopy(cached_model("tiny-qwen2-vl")).to(torch.bfloat16)


@pytest.fixture(scope="module")
def bf16_adapter(tmp_path_factory, bf16_model):
    """A bf16 adapter of rank RANK on every served linear's kind (tower, connector, language model),
    in bf16 as benchmarks/e2e.py writes them (PEFT saves its float32 copies of the factors)."""
    path = make_adapter(bf16_model, tmp_path_factory.mktemp("bf16") / "a", all_targets("tiny-qwen2-vl"), r=RANK,
                        lora_alpha=3 * RANK, seed=3)
    tensors = {key: value.to(torch.bfloat16) for key, value in load_file(str(path / WEIGHTS_FILE)).items()}
    save_file(tensors, str(path / WEIGHTS_FILE))
    return path


def manager_for(model, max_lora_rank=RANK, adapter=None, **options):
    """Serving the tower, connector and language model (every linear there), or, given `adapter`
    (a path), the linears it adapts: then its file is a slab row as read."""
    linears = LinearIndex(model, discover_partitions(model))
    if adapter is None:
        serving = ServingPlan.build(linears, partitions=["tower", "connector", "language_model"])
    else:
        serving = ServingPlan.build(linears, adapters=[read_factors("x", adapter, linears)])
    return AdapterManager(linears, serving, max_loras=2, max_lora_rank=max_lora_rank, **options)


def expected_slots(manager, path):
    """Each served module's (A, B) as `read_adapter` gives them, and as the file gives them scaled
    in float32 (the fold of half-precision matrices) with no help from the code under test."""
    adapter = read_adapter("x", path, manager.linears, dtype=torch.bfloat16)
    tensors = load_file(str(path / WEIGHTS_FILE))
    expected = {}
    for module, weights in adapter.modules.items():
        a = tensors[f"base_model.model.{module}.lora_A.weight"].flatten(1)
        b = tensors[f"base_model.model.{module}.lora_B.weight"].flatten(1)
        folded = (b.float() * weights.scaling).to(torch.bfloat16)
        assert torch.equal(weights.lora_a, a) and torch.equal(weights.lora_b, folded), module
        expected[module] = (a, folded)
    return expected


def assert_slot(manager, slot, expected):
    for module, buffers in manager.buffers.items():
        if module not in expected:
            assert int(buffers.ranks[slot]) == 0 and not buffers.lora_a[slot].any(), module
            continue
        a, b = expected[module]
        rank = a.shape[0]
        assert int(buffers.ranks[slot]) == rank
        assert torch.equal(buffers.lora_a[slot, :rank], a) and not buffers.lora_a[slot, rank:].any(), module
        assert torch.equal(buffers.lora_b[slot, :, :rank], b) and not buffers.lora_b[slot, :, rank:].any(), module


def test_a_file_in_the_slot_layout_is_cached_as_read_and_scaled_in_place(bf16_model, bf16_adapter):
    manager = manager_for(bf16_model, adapter=bf16_adapter)
    manager.load("a", bf16_adapter)
    [flat] = manager._cpu["a"].flats
    assert flat.dtype == torch.uint8 and flat.numel() == (bf16_adapter / WEIGHTS_FILE).stat().st_size  # the file
    [row] = manager._cpu["a"].rows
    assert row.untyped_storage().data_ptr() == flat.untyped_storage().data_ptr()  # the slab row is the file's data
    expected = expected_slots(manager, bf16_adapter)
    assert len(expected) > 10 and set(expected) == set(manager.buffers)
    [slot] = manager.activate(["a"])
    assert_slot(manager, slot, expected)
    assert manager.stats.slot_copies == 2  # the slab row, and the ranks column (they were all 0)


def test_a_file_adapting_some_served_linears_becomes_one_slab_row(bf16_model, bf16_adapter):
    """Served linears the file does not adapt are zeros in the entry: still one copy per slot write."""
    manager = manager_for(bf16_model)
    manager.load("a", bf16_adapter)
    expected = expected_slots(manager, bf16_adapter)
    assert set(expected) < set(manager.buffers)
    [row] = manager._cpu["a"].rows
    assert row.dtype == torch.bfloat16 and row.numel() == manager._slabs[0].total
    [slot] = manager.activate(["a"])
    assert_slot(manager, slot, expected)
    assert manager.stats.slot_copies == 2


def test_a_file_padded_into_the_slots_gives_the_same_slots(bf16_model, bf16_adapter):
    manager = manager_for(bf16_model, max_lora_rank=RANK + 3)
    manager.load("a", bf16_adapter)
    assert all(flat.dtype == torch.bfloat16 for flat in manager._cpu["a"].flats)  # copied, padded
    [slot] = manager.activate(["a"])
    assert_slot(manager, slot, expected_slots(manager, bf16_adapter))


def mixed(source, target, poison=None):
    """`source`'s adapter with lora_A in float32 and lora_B in bf16 (a file of two dtypes)."""
    import shutil

    shutil.copytree(source, target)
    tensors = {key: value.float() if "lora_A" in key else value for key, value in
               load_file(str(source / WEIGHTS_FILE)).items()}
    if poison is not None:
        key = sorted(key for key in tensors if poison in key)[0]
        tensors[key] = tensors[key].clone()
        tensors[key][0, 0] = float("nan")
    save_file(tensors, str(target / WEIGHTS_FILE))
    return target


def test_a_file_of_two_dtypes_is_checked_tensor_by_tensor(tmp_path, bf16_model, bf16_adapter):
    manager = manager_for(bf16_model)
    path = mixed(bf16_adapter, tmp_path / "mixed")
    manager.load("a", path)
    [slot] = manager.activate(["a"])
    assert_slot(manager, slot, expected_slots(manager, bf16_adapter))  # A was bf16 before: exact in float32
    poisoned = mixed(bf16_adapter, tmp_path / "poisoned", poison="lora_B")
    with pytest.raises(AdapterValueError, match="lora_B holds NaN or infinite values"):
        manager.load("b", poisoned)
    assert manager.names == ["a"]


def test_a_bf16_adapter_that_overflows_once_scaled_is_refused(tmp_path, bf16_model, bf16_adapter):
    import shutil

    path = tmp_path / "large"
    shutil.copytree(bf16_adapter, path)
    tensors = load_file(str(path / WEIGHTS_FILE))
    key = sorted(key for key in tensors if "fc1.lora_B" in key)[0]
    tensors[key][0, 0] = 3e38  # finite in bf16, not times alpha/r = 3
    save_file(tensors, str(path / WEIGHTS_FILE))
    with pytest.raises(AdapterValueError, match=r"fc1': lora_B times its scaling 3 overflows bfloat16"):
        read_adapter("x", path, manager_for(bf16_model).linears, dtype=torch.bfloat16)
    manager = manager_for(bf16_model)
    with pytest.raises(AdapterValueError, match="overflows bfloat16"):
        manager.load("x", path)
    assert manager.names == [] and manager.cpu_cached == []


def test_the_buffer_read_equals_safetensors_tensors(bf16_adapter, tmp_path):
    file = peft_format._read_tensors("a", bf16_adapter)
    assert file.buffer is not None and file.data is not None
    reference = load_file(str(bf16_adapter / WEIGHTS_FILE))
    assert list(file.tensors) == list(reference)
    for key, tensor in reference.items():
        assert file.tensors[key].dtype == tensor.dtype and torch.equal(file.tensors[key], tensor), key
    # Two dtypes, and shapes of every rank, empty ones too.
    odd = {"a": torch.randn(2, 3, 4), "b": torch.randn(5).to(torch.bfloat16), "c": torch.zeros(0, 3),
           "d": torch.tensor(1.5, dtype=torch.float64), "e": torch.randn(3, 7).to(torch.float16)}
    (tmp_path / "odd").mkdir()
    save_file(odd, str(tmp_path / "odd" / WEIGHTS_FILE))
    read = peft_format._read_tensors("odd", tmp_path / "odd")
    assert read.buffer is not None and read.data is None
    for key, tensor in odd.items():
        assert read.tensors[key].dtype == tensor.dtype and torch.equal(read.tensors[key], tensor), key
    # A dtype outside the float ones: read by safetensors, tensor by tensor, as before.
    save_file({"x": torch.arange(6, dtype=torch.int64).reshape(2, 3), "y": torch.ones(3)}, str(tmp_path / WEIGHTS_FILE))
    other = peft_format._read_tensors("b", tmp_path)
    assert other.buffer is None and torch.equal(other.tensors["x"], torch.arange(6).reshape(2, 3))


@pytest.mark.parametrize("out", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("source", [torch.bfloat16, torch.float16, torch.float32])
def test_folding_into_a_view_equals_the_folded_matrix(out, source):
    generator = torch.Generator().manual_seed(0)
    lora_b = (torch.randn(64, 5, generator=generator) * 3).to(source)
    for scaling in (2.0, 0.75, 1 / 3, 8 / 6 ** 0.5, 123.456, 1e-3):
        slot = torch.full((64, 8), 7.0, dtype=out)
        fold_into(slot[:, :5], lora_b, scaling)
        assert torch.equal(slot[:, :5], peft_format._folded(lora_b, scaling, out)), (scaling, source, out)
        assert (slot[:, 5:] == 7).all()
        if source == out:
            in_place = lora_b.clone()
            fold_into(in_place, in_place, scaling)
            assert torch.equal(in_place, peft_format._folded(lora_b, scaling, out))


def test_coalesced_views_cover_exactly_the_tensors():
    buffer = torch.zeros(3000)
    tensors = []
    for block in range(12):  # a layer's block: four linears, two of one size
        base = 200 * block
        tensors += [buffer[base:base + 10], buffer[base + 10:base + 30].view(4, 5), buffer[base + 30:base + 40],
                    buffer[base + 40:base + 70].view(3, 10)]
    tensors += [buffer[2500:2507], buffer[2600:2610].view(5, 2).t()]  # alone; not contiguous
    views = _coalesced(tensors)
    assert len(views) == 6 and sorted(tuple(view.shape) for view in views)[-4:] == [(12, 10), (12, 10), (12, 20),
                                                                                   (12, 30)]
    for view in views:
        view.add_(1)
    expected = torch.zeros(3000)
    for tensor in tensors:
        expected[tensor.storage_offset():tensor.storage_offset() + 10 if not tensor.is_contiguous()
                 else tensor.storage_offset() + tensor.numel()] = 1
    assert torch.equal(buffer, expected)


def test_read_factors_are_views_of_one_buffer(bf16_model, bf16_adapter):
    linears = LinearIndex(bf16_model, discover_partitions(bf16_model))
    factors = read_factors("a", bf16_adapter, linears, dtype=torch.bfloat16)
    pointer = factors.buffer.untyped_storage().data_ptr()
    assert all(f.lora_a.untyped_storage().data_ptr() == pointer == f.lora_b.untyped_storage().data_ptr()
               for f in factors.modules.values())
    assert factors.tensor_bytes == sum(f.lora_a.nbytes + f.lora_b.nbytes for f in factors.modules.values())
