"""The adapter manager: slot buffers equal PEFT's deltas; LRU, pinning; failed calls change nothing."""

import shutil

import pytest
import torch

from mmlora_fx import zoo
from mmlora_fx.adapter_manager import AdapterManager
from mmlora_fx.errors import (
    AdapterError,
    AdapterTargetError,
    AdapterValueError,
    DuplicateAdapterError,
    MMLoRAError,
    PinnedAdapterError,
    TooManyAdaptersError,
    UnknownAdapterError,
)
from mmlora_fx.linear_index import LinearIndex
from mmlora_fx.partitions import connector_label, discover_partitions, tower_label
from mmlora_fx.peft_format import WEIGHTS_FILE
from mmlora_fx.serving import ServingPlan

from .conftest import cached_model
from .peft_helpers import all_targets, lora_layers, make_adapter, peft_model_with


@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    """Five adapters on tiny Qwen2-VL with mixed ranks, over tower, connector and language model."""
    root = tmp_path_factory.mktemp("adapters")
    model = cached_model("tiny-qwen2-vl")
    ranks = {"a": 2, "b": 4, "c": 8, "d": 3, "e": 5}
    return {name: make_adapter(model, root / name, all_targets("tiny-qwen2-vl"), r=rank, lora_alpha=2 * rank,
                               seed=index, use_rslora=(name == "c"))
            for index, (name, rank) in enumerate(ranks.items())}


def make_manager(adapters, family="tiny-qwen2-vl", **options):
    model = cached_model(family)
    linears = LinearIndex(model, discover_partitions(model))
    serving = options.pop("serving", None) or ServingPlan.build(linears, partitions=["tower", "connector",
                                                                                       "language_model"])
    options.setdefault("max_lora_rank", 8)
    return AdapterManager(linears, serving, **options)


def snapshot(manager):
    return (manager.names, manager.cpu_cached, manager.resident, sorted(manager.pinned),
            {module: (b.lora_a.clone(), b.lora_b.clone(), b.ranks.clone()) for module, b in manager.buffers.items()})


def assert_same(before, after):
    assert before[:4] == after[:4]
    for module, tensors in before[4].items():
        for old, new in zip(tensors, after[4][module]):
            assert torch.equal(old, new), module


@pytest.mark.parametrize("family", list(zoo.ZOO))
def test_slot_buffers_reproduce_peft_delta_for_every_module(tmp_path, family):
    model = cached_model(family)
    tower, connector, language_model = (list(part) for part in zoo.ZOO[family].targets)
    paths = {
        "low": make_adapter(model, tmp_path / "low", tower + connector + language_model, r=2, lora_alpha=4, seed=1),
        "high": make_adapter(model, tmp_path / "high", tower + language_model, r=6, lora_alpha=3, seed=2,
                             use_rslora=True, rank_pattern={language_model[0]: 4}),
    }
    modality = zoo.ZOO[family].modality
    tower_partition, connector_partition = tower_label(modality), connector_label(modality)
    model_linears = LinearIndex(model, discover_partitions(model))
    serving = ServingPlan.build(model_linears, partitions=[tower_partition, connector_partition, "language_model"])
    manager = make_manager(None, family, max_loras=2, serving=serving)
    manager.load_many(paths)
    slots = manager.activate(["high", None, "low"])
    assert slots[1] == -1 and sorted([slots[0], slots[2]]) == [0, 1]
    layers = lora_layers(peft_model_with(model, paths))
    for name, slot in (("high", slots[0]), ("low", slots[2])):
        for module, buffers in manager.buffers.items():
            layer = layers.get(module)
            if layer is not None and name in layer.lora_A:
                torch.testing.assert_close(buffers.delta(slot).double(), layer.get_delta_weight(name).double(),
                                           rtol=1e-5, atol=1e-7)
            else:
                assert int(buffers.ranks[slot]) == 0 and not buffers.lora_a[slot].any(), module
    partitions = {manager.linears[module].partition for module in manager.buffers
                  if int(manager.buffers[module].ranks[slots[2]]) > 0}
    assert {tower_partition, "language_model"} <= partitions
    assert (connector_partition in partitions) == bool(connector)


def test_smaller_ranks_are_padded_with_zeros(adapters):
    manager = make_manager(adapters)
    manager.load("a", adapters["a"])
    [slot] = manager.activate(["a"])
    buffers = next(b for m, b in manager.buffers.items() if m.endswith("layers.0.self_attn.q_proj"))
    assert int(buffers.ranks[slot]) == 2
    assert buffers.lora_a[slot, :2].abs().sum() > 0 and not buffers.lora_a[slot, 2:].any()
    assert not buffers.lora_b[slot, :, 2:].any()


def test_loading_into_a_slot_leaves_other_slots_alone(adapters):
    manager = make_manager(adapters, max_loras=2)
    manager.load_many({name: adapters[name] for name in "abc"})
    manager.activate(["a", "b"])
    before = {module: b.lora_a[manager.resident["b"]].clone() for module, b in manager.buffers.items()}
    manager.activate(["b", "c"])  # evicts a, the least recently used
    assert set(manager.resident) == {"b", "c"}
    for module, b in manager.buffers.items():
        assert torch.equal(b.lora_a[manager.resident["b"]], before[module])


def test_gpu_slots_evict_least_recently_used_and_reuse_slots(adapters):
    manager = make_manager(adapters, max_loras=2, max_cpu_loras=5)
    manager.load_many({name: adapters[name] for name in "abc"})
    manager.activate(["a"])
    manager.activate(["b"])
    manager.activate(["a"])  # b is now the least recently used
    slot_of_b = manager.resident["b"]
    manager.activate(["c"])
    assert list(manager.resident) == ["a", "c"] and manager.resident["c"] == slot_of_b


def test_cpu_cache_evicts_least_recently_used_and_reloads_from_disk(adapters):
    manager = make_manager(adapters, max_loras=1, max_cpu_loras=2)
    manager.load("a", adapters["a"])
    manager.load("b", adapters["b"])
    manager.activate(["a"])  # touches a: b is the least recently used
    manager.load("c", adapters["c"])
    assert manager.cpu_cached == ["a", "c"] and manager.names == ["a", "b", "c"]
    [slot] = manager.activate(["b"])  # read again from its directory
    assert manager.cpu_cached == ["c", "b"]
    fresh = make_manager(adapters, max_loras=1)
    fresh.load("b", adapters["b"])
    [fresh_slot] = fresh.activate(["b"])
    for module, buffers in manager.buffers.items():
        assert torch.equal(buffers.lora_b[slot], fresh.buffers[module].lora_b[fresh_slot])


def test_pinned_adapters_are_never_evicted(adapters):
    manager = make_manager(adapters, max_loras=2, max_cpu_loras=2)
    manager.load("a", adapters["a"], pin=True)
    assert "a" in manager.resident
    for name in "bcde":
        manager.load(name, adapters[name])
        manager.activate([name])
        assert "a" in manager.resident and "a" in manager.cpu_cached
    manager.unpin("a")
    manager.activate(["b"])
    manager.activate(["c"])
    assert "a" not in manager.resident


def test_too_many_pinned_adapters(adapters):
    manager = make_manager(adapters, max_loras=2)
    manager.load("a", adapters["a"], pin=True)
    manager.load("b", adapters["b"], pin=True)
    before = snapshot(manager)
    with pytest.raises(PinnedAdapterError, match=r"adapter 'c': cannot be pinned: 2 adapters are pinned"):
        manager.load("c", adapters["c"], pin=True)
    assert_same(before, snapshot(manager))
    manager.load("c", adapters["c"])
    with pytest.raises(TooManyAdaptersError, match="held by pinned adapters"):
        manager.activate(["c"])


def test_too_many_adapters_in_one_batch(adapters):
    manager = make_manager(adapters, max_loras=2)
    manager.load_many({name: adapters[name] for name in "abc"})
    before = snapshot(manager)
    with pytest.raises(TooManyAdaptersError, match=r"3 distinct adapters \(a, b, c\) but there are only max_loras=2"):
        manager.activate(["a", "b", "a", "c", None])
    assert_same(before, snapshot(manager))


def test_unknown_adapter_name(adapters):
    manager = make_manager(adapters)
    manager.load("a", adapters["a"])
    manager.activate(["a"])
    before = snapshot(manager)
    with pytest.raises(UnknownAdapterError, match=r"adapter 'zed': is not loaded \(loaded: a\)"):
        manager.activate(["a", "zed"])
    assert_same(before, snapshot(manager))
    with pytest.raises(UnknownAdapterError):
        manager.unload("zed")


def test_duplicate_and_reserved_names(adapters):
    manager = make_manager(adapters)
    manager.load("a", adapters["a"])
    before = snapshot(manager)
    with pytest.raises(DuplicateAdapterError, match="adapter 'a': is already loaded"):
        manager.load("a", adapters["b"])
    with pytest.raises(DuplicateAdapterError, match="reserved for the base model"):
        manager.load("__base__", adapters["b"])
    assert_same(before, snapshot(manager))


@pytest.mark.parametrize("breakage", ["nan", "missing", "rank"])
def test_a_failed_load_changes_nothing(tmp_path, adapters, breakage):
    manager = make_manager(adapters, max_loras=2, max_cpu_loras=2)
    manager.load("a", adapters["a"], pin=True)
    manager.load("b", adapters["b"])
    manager.activate(["b", "a"])
    before = snapshot(manager)
    path = tmp_path / "bad"
    shutil.copytree(adapters["c"], path)
    if breakage == "nan":
        from safetensors.torch import load_file, save_file

        tensors = load_file(str(path / WEIGHTS_FILE))
        next(iter(tensors.values()))[0, 0] = float("nan")
        save_file(tensors, str(path / WEIGHTS_FILE))
        error = AdapterValueError
    elif breakage == "missing":
        (path / WEIGHTS_FILE).unlink()
        error = AdapterError
    else:
        manager_rank = manager.max_lora_rank
        assert manager_rank < 16
        path = make_adapter(cached_model("tiny-qwen2-vl"), tmp_path / "big", ["q_proj"], r=16)
        error = AdapterError
    with pytest.raises(error):
        manager.load("c", path)
    assert_same(before, snapshot(manager))


def test_an_adapter_that_went_bad_on_disk_fails_before_any_slot_changes(tmp_path, adapters):
    manager = make_manager(adapters, max_loras=1, max_cpu_loras=1)
    shutil.copytree(adapters["a"], tmp_path / "a")
    manager.load("a", tmp_path / "a")
    manager.load("b", adapters["b"])  # evicts a from the CPU cache
    manager.activate(["b"])
    (tmp_path / "a" / WEIGHTS_FILE).write_bytes(b"garbage")
    before = snapshot(manager)
    with pytest.raises(AdapterError, match="corrupt or unreadable"):
        manager.activate(["a"])
    assert_same(before, snapshot(manager))


def test_unload_frees_and_zeroes_the_slot(adapters):
    manager = make_manager(adapters, max_loras=2)
    manager.load("a", adapters["a"])
    [slot] = manager.activate(["a"])
    manager.unload("a")
    assert manager.names == [] and manager.resident == {}
    assert all(not b.lora_a[slot].any() and int(b.ranks[slot]) == 0 for b in manager.buffers.values())


def test_adapters_outside_an_implicit_serving_set_are_refused(adapters, tmp_path):
    model = cached_model("tiny-qwen2-vl")
    linears = LinearIndex(model, discover_partitions(model))
    lm_only = make_adapter(model, tmp_path / "lm", ["q_proj"])
    serving = ServingPlan.build(linears, [type("A", (), {"modules": {"model.language_model.layers.0.self_attn.q_proj": 0}})])
    manager = AdapterManager(linears, serving, max_loras=2, max_lora_rank=8)
    manager.load("lm", lm_only)
    with pytest.raises(AdapterTargetError, match="does not serve"):
        manager.load("wide", adapters["a"])
    explicit = ServingPlan.build(linears, partitions=["language_model"])
    manager = AdapterManager(linears, explicit, max_loras=2, max_lora_rank=8)
    manager.load("wide", adapters["a"])
    dropped = manager.dropped_modules("wide")
    assert dropped and all(linears[module].partition in ("tower", "connector") for module in dropped)


def test_every_error_is_one_family():
    for error in (AdapterValueError, TooManyAdaptersError, UnknownAdapterError, PinnedAdapterError):
        assert issubclass(error, MMLoRAError)


def _break(kind, source, target):
    """A broken copy of the adapter at `source`, in `target`, for each kind of bad input."""
    import json

    from safetensors.torch import load_file, save_file

    if kind == "missing directory":
        return target / "nowhere"
    shutil.copytree(source, target)
    weights, config_path = target / WEIGHTS_FILE, target / "adapter_config.json"
    tensors = load_file(str(weights))
    config = json.loads(config_path.read_text())
    if kind == "missing config":
        config_path.unlink()
    elif kind == "config not JSON":
        config_path.write_text("{")
    elif kind == "pickle only":
        weights.unlink()
        torch.save({}, target / "adapter_model.bin")
    elif kind == "corrupt safetensors":
        weights.write_bytes(weights.read_bytes()[:100])
    elif kind in ("shape", "target absent", "nan", "inf", "base copy"):
        key = next(k for k in sorted(tensors) if "layers.0.self_attn.q_proj.lora_A" in k)
        if kind == "shape":
            tensors[key] = torch.randn(tensors[key].shape[0], 3)
        elif kind == "target absent":
            for part in ("lora_A", "lora_B"):
                old = key.replace("lora_A", part)
                tensors[old.replace("layers.0", "layers.9")] = tensors.pop(old)
        elif kind == "base copy":
            # A copy of the base head that is not the model's (PEFT saves one when LoRA targets lm_head).
            head = cached_model("tiny-qwen2-vl").lm_head.weight
            tensors["base_model.model.lm_head.base_layer.weight"] = head.detach() + 1e-3
        else:
            tensors[key][0, 0] = float(kind)
        save_file(tensors, str(weights))
    elif kind == "dora":
        config_path.write_text(json.dumps(dict(config, use_dora=True)))
    elif kind == "modules_to_save":
        config_path.write_text(json.dumps(dict(config, modules_to_save=["lm_head"])))
    return target


@pytest.mark.parametrize("kind, error, message", [
    ("missing directory", "AdapterFileError", "does not exist"),
    ("missing config", "AdapterFileError", "adapter_config.json is missing"),
    ("config not JSON", "AdapterFormatError", "not valid JSON"),
    ("pickle only", "AdapterFileError", "pickle"),
    ("corrupt safetensors", "AdapterFileError", "corrupt or unreadable"),
    ("shape", "AdapterShapeError", "do not fit a linear"),
    ("target absent", "AdapterTargetError", "the model does not have"),
    ("nan", "AdapterValueError", "NaN or infinite"),
    ("inf", "AdapterValueError", "NaN or infinite"),
    ("base copy", "BaseWeightCopyError", "module 'lm_head': .*differs from the model's"),
    ("dora", "UnsupportedAdapterError", "DoRA"),
    ("modules_to_save", "UnsupportedAdapterError", "modules_to_save"),
])
def test_every_bad_adapter_is_refused_with_its_error_and_nothing_changes(tmp_path, adapters, kind, error, message):
    from mmlora_fx import errors

    manager = make_manager(adapters, max_loras=2, max_cpu_loras=2)
    manager.load("a", adapters["a"], pin=True)
    manager.load("b", adapters["b"])
    manager.activate(["a", "b"])
    before = snapshot(manager)
    with pytest.raises(getattr(errors, error), match=message) as raised:
        manager.load("bad", _break(kind, adapters["c"], tmp_path / "bad"))
    assert "adapter 'bad'" in str(raised.value)
    assert_same(before, snapshot(manager))


def slot_weights(manager, name):
    """Every served module's (A, B) in `name`'s GPU slot."""
    slot = manager.resident[name]
    return {module: (b.lora_a[slot].clone(), b.lora_b[slot].clone()) for module, b in manager.buffers.items()}


def weights_of(adapters, source, **options):
    """The slot weights `source` gets in a fresh manager: what serving it must look like."""
    fresh = make_manager(adapters, max_loras=1, **options)
    fresh.load("x", adapters[source])
    fresh.activate(["x"])
    return slot_weights(fresh, "x")


def assert_weights_equal(got, expected):
    assert got.keys() == expected.keys()
    for module, (a, b) in got.items():
        assert torch.equal(a, expected[module][0]) and torch.equal(b, expected[module][1]), module


@pytest.mark.parametrize("tier", ["gpu slot", "cpu cache", "disk only"])
def test_reloading_a_name_serves_the_new_weights_in_every_tier(adapters, tier):
    # "a" is reloaded with c's weights (another rank, rsLoRA): wherever "a" sat, the next batch gets c's.
    manager = make_manager(adapters, max_loras=1, max_cpu_loras=1 if tier == "disk only" else 2)
    manager.load("a", adapters["a"])
    manager.activate(["a"])
    if tier != "gpu slot":
        manager.load("b", adapters["b"])  # with one CPU entry, a leaves the CPU cache
        manager.activate(["b"])  # and its GPU slot
        assert "a" not in manager.resident and ("a" in manager.cpu_cached) == (tier == "cpu cache")
    manager.reload("a", adapters["c"])
    manager.activate(["a"])
    assert_weights_equal(slot_weights(manager, "a"), weights_of(adapters, "c"))


def test_a_failed_reload_keeps_the_old_weights_everywhere(tmp_path, adapters):
    manager = make_manager(adapters, max_loras=2)
    manager.load("a", adapters["a"])
    manager.activate(["a"])
    shutil.copytree(adapters["b"], tmp_path / "broken")
    (tmp_path / "broken" / WEIGHTS_FILE).write_bytes(b"garbage")
    before = snapshot(manager)
    with pytest.raises(AdapterError, match="corrupt or unreadable"):
        manager.reload("a", tmp_path / "broken")
    assert_same(before, snapshot(manager))
    with pytest.raises(UnknownAdapterError):
        manager.reload("nobody", adapters["b"])


def test_a_folder_loads_every_good_adapter_and_names_the_bad_ones(tmp_path, adapters):
    from mmlora_fx.errors import AdapterFolderError

    folder = tmp_path / "folder"
    for name in "bcd":
        shutil.copytree(adapters[name], folder / name)
    (folder / "c" / WEIGHTS_FILE).write_bytes(b"garbage")
    (folder / "notes").mkdir()  # no adapter_config.json: not an adapter, skipped
    manager = make_manager(adapters, max_loras=2, max_cpu_loras=4)
    manager.load("a", adapters["a"])
    manager.activate(["a"])
    with pytest.raises(AdapterFolderError, match=r"1 of the adapters .* could not be loaded \(c\)") as raised:
        manager.load_folder(folder)
    assert raised.value.loaded == ["b", "d"] and isinstance(raised.value.failed["c"], AdapterError)
    assert manager.names == ["a", "b", "d"] and "a" in manager.resident
    with pytest.raises(AdapterError, match="not a directory"):
        manager.load_folder(tmp_path / "nowhere")


def test_stats_count_hits_misses_evictions_and_reads_per_tier(adapters):
    manager = make_manager(adapters, max_loras=1, max_cpu_loras=1)
    manager.load("a", adapters["a"])  # one disk read
    manager.load("b", adapters["b"])  # one disk read; a leaves the CPU cache
    manager.activate(["b"])  # GPU miss, CPU hit, one slot write
    manager.activate(["b"])  # GPU hit
    manager.activate(["a"])  # GPU miss and eviction of b, CPU miss (a disk read), b leaves the CPU cache
    stats = manager.stats
    assert (stats.gpu_hits, stats.gpu_misses, stats.gpu_evictions) == (1, 2, 1)
    assert (stats.cpu_hits, stats.cpu_misses, stats.cpu_evictions) == (1, 1, 2)
    assert stats.disk_reads == 3 and stats.disk_read_s > 0 and stats.slot_writes == 2 and stats.slot_write_s > 0


class WritesInto:
    """The ops a block runs that write into `tensors`' storages (TorchDispatchMode): each op's
    name and its destination, so that a test can count copies into the slot buffers."""

    def __init__(self, *tensors):
        self.storages = {tensor.untyped_storage().data_ptr(): index for index, tensor in enumerate(tensors)}
        self.writes: list[tuple[str, int, torch.Tensor]] = []  # (op, which storage, destination)

    def __enter__(self):
        from torch.utils._python_dispatch import TorchDispatchMode

        outer = self

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                schema = func._schema
                if schema.arguments and schema.arguments[0].is_write and isinstance(args[0], torch.Tensor):
                    which = outer.storages.get(args[0].untyped_storage().data_ptr())
                    if which is not None:
                        outer.writes.append((func.__name__, which, args[0]))
                return func(*args, **(kwargs or {}))

        self.mode = Mode()
        self.mode.__enter__()
        return self

    def __exit__(self, *exc):
        self.mode.__exit__(*exc)


def file_slots(manager, path):
    """Every served module's (A, B) slot for the adapter at `path`, from `read_adapter` alone:
    padded with zeros to `max_lora_rank`, zeros where it does not adapt the module."""
    from mmlora_fx.peft_format import read_adapter

    adapter = read_adapter("x", path, manager.linears)
    slots = {}
    for module, buffers in manager.buffers.items():
        a, b = torch.zeros_like(buffers.lora_a[0]), torch.zeros_like(buffers.lora_b[0])
        weights = adapter.modules.get(module)
        if weights is not None:
            a[..., :weights.rank, :] = weights.lora_a
            b[..., :weights.rank] = weights.lora_b
        slots[module] = (a, b)
    return slots


def test_a_slot_is_one_slab_row_written_with_one_copy_per_adapter(tmp_path, adapters):
    """Every served linear's A and B are views of one slot-major slab: slot `s` of all of them
    tiles the contiguous row `slab[s]`. Activating an adapter copies its CPU entry into that row
    with one copy, plus one copy of the ranks column where the slot's ranks change; the slots then
    hold exactly what the files give."""
    shutil.copytree(adapters["a"], tmp_path / "a2")  # a's ranks: a2 replaces a with no ranks copy
    paths = {"a": adapters["a"], "a2": tmp_path / "a2", "c": adapters["c"]}
    manager = make_manager(adapters, max_loras=2)
    [slab] = manager._slabs
    [(table, _)] = manager._rank_tables
    row_bytes = slab.data[0].nbytes
    for slot in range(2):
        row = slab.data[slot]
        covered = 0
        for module, buffers in manager.buffers.items():
            for factor in (buffers.lora_a, buffers.lora_b):
                assert factor.stride(0) == slab.total and factor[slot].is_contiguous(), module
                begin = factor[slot].data_ptr() - row.data_ptr()
                assert 0 <= begin and begin + factor[slot].nbytes <= row_bytes, module
                covered += factor[slot].nbytes
            assert buffers.ranks.is_contiguous() and buffers.ranks.untyped_storage().data_ptr() == \
                table.untyped_storage().data_ptr()
        assert covered == row_bytes  # the factors tile the row (and fit in it without overlapping)
    manager.load_many(paths)
    expected = {name: file_slots(manager, path) for name, path in paths.items()}

    def activate(names, copies):
        before = manager.stats.slot_copies
        with WritesInto(slab.data, table) as writes:
            slots = manager.activate(names)
        assert [(op, which) for op, which, _ in writes.writes] == copies, names
        for op, which, destination in writes.writes:
            assert op == "copy_.default" and destination.numel() == (slab.total if which == 0 else len(manager.buffers))
        assert manager.stats.slot_copies - before == len(copies)
        for name, slot in zip(names, slots):
            assert_weights_equal(slot_weights(manager, name), expected[name])

    row, ranks = ("copy_.default", 0), ("copy_.default", 1)
    activate(["a", "c"], [row, ranks, row, ranks])  # fresh slots: their ranks were 0
    activate(["a2"], [row])  # into the least recently used slot, a's: the same ranks
    activate(["a2", "c"], [])  # resident: nothing to write
    activate(["a"], [row])  # a2's slot again: same ranks
    activate(["c", "a"], [])
    manager.unload("a")
    activate(["a2", "c"], [row, ranks])  # an unloaded slot's ranks were zeroed


def test_factors_in_the_slab_start_aligned_and_its_padding_stays_zero(adapters):
    """At rank 5 no factor of tiny Qwen2-VL is a multiple of 64 elements: each still starts on a
    multiple of 64 (16-byte aligned, as separate allocations were, which Triton's vector loads
    specialise on), the padding between them is zero in every slot after loads and swaps, and the
    slots hold what the files give."""
    manager = make_manager(adapters, max_loras=2, max_lora_rank=5)
    [slab] = manager._slabs
    sizes = [factor[0].numel() for buffers in manager.buffers.values() for factor in (buffers.lora_a, buffers.lora_b)]
    assert any(size % 64 for size in sizes)
    assert slab.total % 64 == 0
    covered = torch.zeros(slab.total, dtype=torch.bool)
    for buffers in manager.buffers.values():
        for factor in (buffers.lora_a, buffers.lora_b):
            begin = (factor[0].data_ptr() - slab.data[0].data_ptr()) // factor.element_size()
            assert begin % 64 == 0
            covered[begin: begin + factor[0].numel()] = True
    names = ["a", "b", "d", "e"]
    paths = {name: adapters[name] for name in names}
    manager.load_many(paths)
    expected = {name: file_slots(manager, path) for name, path in paths.items()}
    for batch in (["a", "e"], ["d"], ["b", "a"]):
        slots = manager.activate(batch)
        assert not slab.data[:, ~covered].any()
        for name, slot in zip(batch, slots):
            assert_weights_equal(slot_weights(manager, name), expected[name])


def test_buffers_of_two_dtypes_are_two_slabs_written_with_one_copy_each(adapters):
    """The fall-back where served linears have two dtypes (a float32 tower under a bf16 language
    model): one slab per dtype, one copy each, and the same slots as the files give, each cast
    to its buffers' dtype."""
    import copy

    from mmlora_fx.peft_format import read_adapter

    model = copy.deepcopy(cached_model("tiny-qwen2-vl")).to(torch.bfloat16)
    linears = LinearIndex(model, discover_partitions(model))
    for name, module in model.named_modules():
        if name in linears and linears[name].partition == "tower":
            module.float()
    linears = LinearIndex(model, discover_partitions(model))
    serving = ServingPlan.build(linears, partitions=["tower", "connector", "language_model"])
    manager = AdapterManager(linears, serving, max_loras=2, max_lora_rank=8)
    assert sorted(str(slab.data.dtype) for slab in manager._slabs) == ["torch.bfloat16", "torch.float32"]
    manager.load("c", adapters["c"])
    with WritesInto(*(slab.data for slab in manager._slabs)) as writes:
        [slot] = manager.activate(["c"])
    assert sorted((op, which) for op, which, _ in writes.writes) == [("copy_.default", 0), ("copy_.default", 1)]
    adapter = read_adapter("c", adapters["c"], linears)
    for module, buffers in manager.buffers.items():
        weights = adapter.modules.get(module)
        if weights is None:
            assert int(buffers.ranks[slot]) == 0 and not buffers.lora_a[slot].any(), module
            continue
        rank = weights.rank
        assert int(buffers.ranks[slot]) == rank
        assert torch.equal(buffers.lora_a[slot, :rank], weights.lora_a.to(buffers.lora_a.dtype)), module
        assert torch.equal(buffers.lora_b[slot, :, :rank], weights.lora_b.to(buffers.lora_b.dtype)), module
        assert not buffers.lora_a[slot, rank:].any() and not buffers.lora_b[slot, :, rank:].any(), module


def test_prefetch_workers_default_to_a_few_and_refuse_none(adapters):
    import os

    from mmlora_fx.adapter_manager import default_prefetch_workers

    assert make_manager(adapters).prefetch_workers == default_prefetch_workers() == min(4, os.cpu_count() or 1)
    assert make_manager(adapters, prefetch_workers=6).prefetch_workers == 6
    with pytest.raises(ValueError, match="prefetch_workers must be a positive int, not 0"):
        make_manager(adapters, prefetch_workers=0)
    with pytest.raises(ValueError, match="not True"):
        make_manager(adapters, prefetch_workers=True)


def test_close_waits_for_a_read_left_on_the_pool_a_new_worker_count_replaced(adapters):
    import threading

    manager = make_manager(adapters, max_loras=2, max_cpu_loras=2, background_reads=True, prefetch_workers=1)
    manager.load_many({name: adapters[name] for name in "ab"})
    manager._cpu.pop("a")  # out of the CPU cache: the next prefetch reads its file
    started, release = threading.Event(), threading.Event()
    read = manager._read_packed

    def held_read(name, path):
        started.set()
        release.wait()
        return read(name, path)

    manager._read_packed = held_read
    manager.prefetch(["a"])
    assert started.wait(10)
    manager.prefetch_workers = 2  # the read stays on the old pool
    closing = threading.Thread(target=manager.close)
    closing.start()
    closing.join(0.2)
    assert closing.is_alive(), "close returned with a read still under way"
    release.set()
    closing.join(10)
    assert not closing.is_alive() and manager._pending["a"][1].done()
