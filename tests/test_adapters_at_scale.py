"""Adapters at scale (#22): prefetch, files that change while read, pinned sets, and that every
failure leaves what is loaded as it was while the other requests go on."""

import collections
import random
import shutil
import statistics
import threading

import pytest
import torch

import mmlora_fx
from mmlora_fx import adapter_manager, zoo
from mmlora_fx.errors import (
    AdapterChangedError,
    AdapterFileError,
    TooManyAdaptersError,
    UnknownAdapterError,
)
from mmlora_fx.peft_format import WEIGHTS_FILE

from benchmarks import adapters_at_scale

from .peft_helpers import all_targets, make_adapter, peft_logits, peft_model_with, relative_error
from .test_adapter_manager import adapters, assert_same, make_manager, snapshot  # noqa: F401 (a fixture)


def slot_weights(manager, name):
    slot = manager.resident[name]
    return {module: (b.lora_a[slot].clone(), b.lora_b[slot].clone(), int(b.ranks[slot]))
            for module, b in manager.buffers.items()}


@pytest.fixture(scope="module")
def expected(adapters):  # noqa: F811
    """Each adapter's slot contents in a fresh manager of one slot: what serving it must look like."""
    found = {}
    for name, path in adapters.items():
        fresh = make_manager(adapters, max_loras=1)
        fresh.load(name, path)
        fresh.activate([name])
        found[name] = slot_weights(fresh, name)
    return found


def assert_serves(manager, name, expected):
    got = slot_weights(manager, name)
    for module, (a, b, rank) in expected[name].items():
        assert torch.equal(got[module][0], a) and torch.equal(got[module][1], b) and got[module][2] == rank, module


@pytest.mark.parametrize("background", [False, True])
def test_prefetch_makes_the_next_batch_a_hit_with_no_disk_read(adapters, expected, background):  # noqa: F811
    manager = make_manager(adapters, max_loras=2, max_cpu_loras=2, background_reads=background)
    manager.load_many({name: adapters[name] for name in "abc"})  # the CPU cache keeps b and c: a is on disk
    manager.activate(["b"])
    assert "a" not in manager.cpu_cached
    before = manager.stats.disk_reads
    manager.prefetch(["a", None])
    assert manager.announced == ["a"]
    if background:
        manager.wait_for_reads()  # the read ran on the worker; committing it copies a into the free slot
    assert manager.stats.disk_reads == before + 1 and "a" in manager.resident
    stats = manager.stats.__class__(**vars(manager.stats))
    slots = manager.activate(["a", "b", None, "a"])
    after = manager.stats
    assert after.disk_reads == stats.disk_reads and after.slot_writes == stats.slot_writes
    assert (after.gpu_hits - stats.gpu_hits, after.gpu_misses - stats.gpu_misses) == (2, 0)
    assert after.prefetch_hits == stats.prefetch_hits + 1 and after.prefetched == 1
    assert slots[0] == slots[3] == manager.resident["a"] and slots[2] == -1 and manager.announced == []
    assert_serves(manager, "a", expected)
    assert_serves(manager, "b", expected)


def test_a_batch_waits_for_a_background_read_it_needs(adapters, expected):  # noqa: F811
    manager = make_manager(adapters, max_loras=2, max_cpu_loras=2, background_reads=True)
    manager.load_many({name: adapters[name] for name in "abc"})
    manager.prefetch(["a"])
    manager.activate(["a"])  # the read may still run: the batch takes its result, no second read
    assert manager.stats.disk_reads == 4 and manager.stats.cpu_misses == 1
    assert_serves(manager, "a", expected)
    manager.close()


def test_prefetch_never_takes_a_slot_of_the_pending_batch_nor_a_pinned_one(adapters, expected):  # noqa: F811
    manager = make_manager(adapters, max_loras=2, max_cpu_loras=5)
    manager.load_many({name: adapters[name] for name in "abcde"})
    manager.activate(["a", "b"])  # both slots read by the pending batch
    manager.prefetch(["c"])
    assert manager.resident.keys() == {"a", "b"} and manager.stats.prefetch_deferred == 1
    manager.activate(["c", "b"])  # the deferred copy is made now, from the CPU cache
    assert_serves(manager, "c", expected)

    manager = make_manager(adapters, max_loras=3, max_cpu_loras=5)
    manager.load_many({name: adapters[name] for name in "abcde"})
    manager.pin("a")
    manager.activate(["b"])
    manager.activate(["a"])  # pending: a's slot; b's slot may be taken
    manager.prefetch(["c"])  # the free slot
    manager.prefetch(["d"])  # evicts b: not pinned, not pending, not announced
    assert manager.resident.keys() == {"a", "c", "d"} and manager.stats.gpu_evictions == 1
    manager.prefetch(["e"])  # a pinned, c and d announced: no slot, nothing evicted
    assert manager.resident.keys() == {"a", "c", "d"} and manager.stats.prefetch_deferred == 1
    manager.activate(["c", "e", "a"])  # e evicts d, the only slot neither pinned nor in the batch
    assert manager.resident.keys() == {"a", "c", "e"}
    for name in "ace":
        assert_serves(manager, name, expected)


def test_prefetch_of_an_unknown_name_changes_nothing(adapters):  # noqa: F811
    manager = make_manager(adapters, max_loras=2)
    manager.load_many({name: adapters[name] for name in "ab"})
    manager.activate(["a"])
    before, stats = snapshot(manager), manager.stats.prefetched
    with pytest.raises(UnknownAdapterError, match=r"adapter 'zed': is not loaded"):
        manager.prefetch(["b", "zed"])
    assert_same(before, snapshot(manager))
    assert manager.announced == [] and manager.stats.prefetched == stats


@pytest.mark.parametrize("background", [False, True])
def test_a_name_unloaded_while_announced_is_unknown_to_later_batches(adapters, background):  # noqa: F811
    manager = make_manager(adapters, max_loras=2, max_cpu_loras=2, background_reads=background)
    manager.load_many({name: adapters[name] for name in "abc"})  # a on disk only
    manager.activate(["b"])
    manager.prefetch(["a"])
    manager.unload("a")
    assert manager.announced == [] and "a" not in manager.resident
    manager.wait_for_reads()  # a read still running is discarded: the name is gone
    assert "a" not in manager.cpu_cached and "a" not in manager.resident
    assert all(not b.lora_a[slot].any() for b in manager.buffers.values() for slot in range(2)
               if slot not in manager.resident.values())
    with pytest.raises(UnknownAdapterError, match="adapter 'a': is not loaded"):
        manager.activate(["b", "a"])
    manager.activate(["b", "c"])  # the other requests go on


def change(path, how):
    """Change the weights file of `path` as a writer would: rewritten in place (same bytes, a later
    mtime), or replaced by a renamed copy (another inode)."""
    import os

    weights = path / WEIGHTS_FILE
    if how == "rewritten":
        weights.write_bytes(weights.read_bytes())
        stat = weights.stat()
        os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    elif how == "replaced":
        (path / "new").write_bytes(weights.read_bytes())
        os.replace(path / "new", weights)
    else:  # half written: the reader sees a truncated file
        weights.write_bytes(weights.read_bytes()[:100])


def changing_reader(monkeypatch, path, when="after", how="replaced"):
    """The manager's readers (`read_factors`, and `read_adapter` for buffers of several dtypes) as it
    calls them, with the weights file of `path` changed `when` (before: between the first stat and
    the read; after: once read, before the second stat)."""
    for reader in ("read_factors", "read_adapter"):
        monkeypatch.setattr(adapter_manager, reader, changing(getattr(adapter_manager, reader), path, when, how))


def changing(real, path, when, how):
    def read(name, where, *args, **kwargs):
        if where == path and when == "before":
            change(path, how)
        adapter = real(name, where, *args, **kwargs)
        if where == path and when == "after":
            change(path, how)
        return adapter

    return read


@pytest.mark.parametrize("when, how", [("before", "rewritten"), ("after", "replaced"), ("before", "half written")])
def test_a_file_changed_while_read_is_refused_and_nothing_changes(tmp_path, monkeypatch, adapters, expected, when,  # noqa: F811
                                                                  how):
    manager = make_manager(adapters, max_loras=2, max_cpu_loras=2)
    manager.load("a", adapters["a"], pin=True)
    manager.load("b", adapters["b"])
    manager.activate(["a", "b"])
    path = tmp_path / "c"
    shutil.copytree(adapters["c"], path)
    changing_reader(monkeypatch, path, when, how)
    before = snapshot(manager)
    with pytest.raises(AdapterChangedError, match=r"adapter 'c': .* changed on disk while it was being read") as raised:
        manager.load("c", path)
    assert isinstance(raised.value, AdapterFileError) and raised.value.adapter == "c"
    assert_same(before, snapshot(manager))
    with pytest.raises(AdapterFileError):  # changed again, or left corrupt by the half write
        manager.reload("b", path)  # a reload keeps b's old weights
    assert_same(before, snapshot(manager))
    assert_serves(manager, "b", expected)


def test_a_background_read_that_fails_is_raised_for_its_adapter_once(tmp_path, monkeypatch, adapters, expected):  # noqa: F811
    manager = make_manager(adapters, max_loras=2, max_cpu_loras=2, background_reads=True)
    path = tmp_path / "c"
    shutil.copytree(adapters["c"], path)
    manager.load("c", path)
    manager.load_many({name: adapters[name] for name in "ab"})  # c leaves the CPU cache
    manager.activate(["a"])
    changing_reader(monkeypatch, path)
    manager.prefetch(["c"])  # returns; the read fails on the worker
    manager.wait_for_reads()
    assert manager.stats.prefetch_failures == 1 and "c" not in manager.resident
    manager.activate(["a", "b"])  # batches without c go on
    before = snapshot(manager)
    with pytest.raises(AdapterChangedError, match="adapter 'c'"):
        manager.activate(["a", "c"])
    assert_same(before, snapshot(manager))
    monkeypatch.undo()
    manager.activate(["a", "c"])  # the error was raised once: c is read again, now whole
    assert_serves(manager, "c", expected)
    manager.close()


def test_prefetch_serves_the_good_names_then_raises_for_the_bad_one(tmp_path, adapters, expected):  # noqa: F811
    manager = make_manager(adapters, max_loras=3, max_cpu_loras=3)
    path = tmp_path / "c"
    shutil.copytree(adapters["c"], path)
    manager.load("c", path)
    manager.load_many({name: adapters[name] for name in "abd"})  # c leaves the CPU cache
    manager.activate(["d"])
    (path / WEIGHTS_FILE).write_bytes(b"garbage")
    with pytest.raises(AdapterFileError, match="adapter 'c': .*corrupt or unreadable"):
        manager.prefetch(["c", "a"])
    assert "a" in manager.resident and "d" in manager.resident and "c" not in manager.resident
    assert_serves(manager, "a", expected)
    manager.activate(["a", "d", None])


def test_a_pinned_set_that_leaves_no_slot_is_refused_for_that_batch(adapters, expected):  # noqa: F811
    manager = make_manager(adapters, max_loras=3, max_cpu_loras=4)
    manager.load("a", adapters["a"], pin=True)
    manager.load("b", adapters["b"], pin=True)
    manager.load_many({name: adapters[name] for name in "cd"})
    manager.activate(["c"])
    before = snapshot(manager)
    with pytest.raises(TooManyAdaptersError, match=r"the batch needs 2 slots but 2 of the 3 are held by pinned "
                                                   r"adapters \(a, b\)"):
        manager.activate(["c", "d", None])
    assert_same(before, snapshot(manager))
    manager.activate(["c", "a", None])  # a batch that fits goes on
    manager.activate(["d", "b"])
    for name in "abd":
        assert_serves(manager, name, expected)


def test_zipf_steps_with_prefetch_always_serve_each_batch_its_weights(adapters, expected):  # noqa: F811
    """Random Zipf-like mixes, each step prefetching the next: every adapter a batch reads is in
    its slot with its own weights, whatever was evicted, deferred or prefetched meanwhile."""
    manager = make_manager(adapters, max_loras=3, max_cpu_loras=3)
    manager.load_many(adapters)
    names = sorted(adapters)
    rng = random.Random(0)
    weights = [1 / (rank + 1) for rank in range(len(names))]

    def mix():
        return [rng.choices(names + [None], weights + [0.3])[0] for _ in range(4)]

    batches = [mix() for _ in range(40)]
    batches = [b if len({n for n in b if n}) <= 3 else b[:2] + [None, None] for b in batches]
    for step, batch in enumerate(batches):
        slots = manager.activate(batch)
        if step + 1 < len(batches):
            manager.prefetch(batches[step + 1])
        for name, slot in zip(batch, slots):
            if name is not None:
                assert manager.resident[name] == slot
                assert_serves(manager, name, expected)
    stats = manager.stats
    assert stats.prefetch_hits > 0 and stats.gpu_evictions > 0 and stats.prefetch_deferred > 0
    assert stats.disk_reads > len(adapters)  # evicted from the CPU cache and read again by prefetch


def test_prefetched_adapters_equal_peft_per_request_in_a_mixed_batch(tmp_path):
    family = "tiny-qwen2-vl"
    base = zoo.build(family)
    ranks = {"alice": 2, "bob": 4, "carol": 8, "dave": 3}
    paths = {name: make_adapter(base, tmp_path / name, all_targets(family), r=rank, lora_alpha=2 * rank + 1,
                                seed=index) for index, (name, rank) in enumerate(ranks.items())}
    mm = mmlora_fx.compile(zoo.build(family), paths, max_loras=3, max_cpu_loras=3)  # one adapter is on disk only
    peft = peft_model_with(base, paths)
    batch = zoo.make_batch(base, (0, 1, 2))
    singles = zoo.split_batch(base, batch)
    with torch.no_grad():
        mm.eager(**batch, adapter_names=["alice", "bob", None])
        mm.prefetch(["dave", "carol"])
        assert mm.stats().prefetch_deferred == 1  # one free slot: the other waits for its batch
        names = ["carol", "dave", "alice"]
        reads = mm.stats().disk_reads
        logits = mm.eager(**batch, adapter_names=names).logits
    assert mm.stats().disk_reads == reads and mm.stats().prefetch_hits == 1
    for row, (single, name) in enumerate(zip(singles, names)):
        reference = peft_logits(peft, single, name)
        assert relative_error(logits[row], reference) <= 1e-4, (row, name)
        with torch.no_grad():
            plain = base(**single).logits[0]
        assert relative_error(plain, reference) > 1e-2, "the adapter must change the logits"


def test_announcements_no_batch_uses_expire_oldest_first(adapters):  # noqa: F811
    """An adapter announced and never used must not hold a slot against later prefetches forever."""
    manager = make_manager(adapters, max_loras=2, max_cpu_loras=5)
    manager.load_many(adapters)
    for name in "abc":
        manager.prefetch([name])
    assert manager.announced == ["b", "c"]


def gated_reads(monkeypatch, manager, parties=None):
    """The manager's background reads, counted, each waiting (when `parties`) until that many are
    under way at once: a read that has to wait for reads a single worker would run after it
    breaks the barrier (its typed error then fails the test) instead of hanging. Returns the
    count of reads that returned a packed adapter."""
    real = manager._read_packed
    barrier = threading.Barrier(parties, timeout=60) if parties else None
    lock, done = threading.Lock(), [0]

    def read(name, path):
        if barrier is not None:
            barrier.wait()
        packed = real(name, path)
        with lock:
            done[0] += 1
        return packed

    monkeypatch.setattr(manager, "_read_packed", read)
    return done


def test_announced_adapters_are_read_at_once_and_a_corrupt_one_fails_only_its_step(tmp_path, monkeypatch, adapters,  # noqa: F811
                                                                                    expected):
    manager = make_manager(adapters, max_loras=3, max_cpu_loras=3, background_reads=True, prefetch_workers=3)
    path = tmp_path / "c"
    shutil.copytree(adapters["c"], path)
    manager.load("c", path)
    manager.load_many({name: adapters[name] for name in "abde"})
    manager.load("f", adapters["d"])  # the CPU cache keeps d, e, f: a, b and c are on disk
    assert not {"a", "b", "c"} & set(manager.cpu_cached)
    (path / WEIGHTS_FILE).write_bytes(b"garbage")
    gated_reads(monkeypatch, manager, parties=3)  # the three reads only go on once all three run
    manager.prefetch(["a", "b", "c"])
    manager.activate(["a", "b"])  # waits for a's and b's reads, whether c's failed yet or not
    assert_serves(manager, "a", expected)
    assert_serves(manager, "b", expected)
    before = snapshot(manager)
    with pytest.raises(AdapterFileError, match="adapter 'c': .*corrupt or unreadable"):
        manager.activate(["a", "c"])  # the step that needs c: its kept error, or its read's, waited for
    assert_same(before, snapshot(manager))
    manager.activate(["b", "a", None])  # the other requests go on
    stats = manager.stats
    assert stats.disk_reads == 6 + 2 and stats.prefetch_failures == 1 and stats.prefetched == 3
    assert (stats.cpu_misses, stats.cpu_hits, stats.gpu_misses, stats.gpu_hits) == (2, 0, 2, 2)
    assert stats.prefetch_waits <= 1  # 1 when the step came before the reads were done
    monkeypatch.undo()
    shutil.rmtree(path)
    shutil.copytree(adapters["c"], path)
    manager.activate(["a", "c"])  # the error was raised once: c is read again, now whole
    assert_serves(manager, "c", expected)
    manager.close()


def test_many_background_reads_at_once_serve_every_batch_and_count_each_read_once(adapters, expected,  # noqa: F811
                                                                                monkeypatch):
    """Random mixes, each step announcing the next two on three workers, with a CPU cache
    smaller than the set: whatever order the reads finish in (every other step commits them all
    before its batch; the others take what is done, and wait for what they need), every batch
    reads its own weights, each read that returned is counted once, and the counters add up."""
    manager = make_manager(adapters, max_loras=3, max_cpu_loras=3, background_reads=True, prefetch_workers=3)
    manager.load_many(adapters)
    loads = manager.stats.disk_reads
    reads = gated_reads(monkeypatch, manager)
    names = sorted(adapters)
    rng = random.Random(1)
    batches = [rng.sample(names, 2) for _ in range(30)]
    for step, batch in enumerate(batches):
        if step % 2:
            manager.wait_for_reads()
        slots = manager.activate(batch)
        manager.prefetch([name for later in batches[step + 1:step + 3] for name in later])
        for name, slot in zip(batch, slots):
            assert manager.resident[name] == slot
            assert_serves(manager, name, expected)
    manager.wait_for_reads()
    stats = manager.stats
    assert stats.disk_reads == loads + reads[0] and stats.prefetch_failures == 0
    assert stats.cpu_hits + stats.cpu_misses == stats.gpu_misses
    assert stats.gpu_hits + stats.gpu_misses == 2 * len(batches)
    assert stats.cpu_misses <= reads[0]  # a miss takes a background read's result or reads itself
    manager.close()


def test_a_new_worker_count_keeps_the_reads_under_way(adapters, expected, monkeypatch):  # noqa: F811
    manager = make_manager(adapters, max_loras=2, max_cpu_loras=2, background_reads=True, prefetch_workers=1)
    manager.load_many({name: adapters[name] for name in "abcd"})  # a and b are on disk
    real, go = manager._read_packed, threading.Event()

    def held(name, path):
        if name == "a":
            assert go.wait(60)
        return real(name, path)

    monkeypatch.setattr(manager, "_read_packed", held)
    manager.prefetch(["a"])  # held on the one worker
    manager.prefetch_workers = 2  # a's read stays with the old pool; b's goes to the new one
    manager.prefetch(["b"])
    go.set()
    manager.wait_for_reads()
    assert manager.prefetch_workers == 2 and manager.stats.disk_reads == 4 + 2
    assert {"a", "b"} <= set(manager.cpu_cached)
    manager.activate(["a", "b"])
    assert_serves(manager, "a", expected)
    assert_serves(manager, "b", expected)
    manager.close()


def test_turnover_batches_keep_requests_for_many_steps_under_the_cap():
    """benchmarks/adapters_at_scale.py --turnover: a full batch every step, at most `max_distinct`
    adapters, each step the last one's requests less those that finished plus those that joined
    (about `batch / mean` a step), and every joining adapter announced `lookahead` steps before."""
    names = [f"a{index:03d}" for index in range(200)]
    batches, joined, waiting = adapters_at_scale.turnover_batches(names, 400, 8, 4, 1.1, 16, seed=0)
    assert all(len(batch) == 8 and len(set(batch)) <= 4 for batch in batches)
    for before, batch, new in zip(batches, batches[1:], joined[1:]):
        assert not collections.Counter(batch) - collections.Counter(new) - collections.Counter(before)
    assert 0.3 <= statistics.mean(len(new) for new in joined[1:]) <= 0.8  # 8 / 16 = 0.5 expected
    assert max(waiting) > 0  # some requests did wait for the cap
    new = adapters_at_scale.new_per_step(batches)
    assert new[0] == len(set(batches[0])) and statistics.mean(new[1:]) < 1
    lookahead = 3
    announced = adapters_at_scale.turnover_announcements(joined, lookahead, 400)
    for step in range(1, 400):
        assert set(joined[step]) <= set(announced[max(0, step - lookahead)]), step
