import gc

from slipstream.telemetry.gc_time import GCTime


def test_collections_inside_the_block_are_timed_and_none_after_it():
    with GCTime() as t:
        gc.collect()
        gc.collect()
    assert t.collections >= 2 and t.seconds > 0
    seconds, collections = t.seconds, t.collections
    gc.collect()
    assert (t.seconds, t.collections) == (seconds, collections)
    assert t._callback not in gc.callbacks


def test_the_startup_heap_is_frozen_and_later_cycles_are_still_collected():
    import weakref

    from slipstream.telemetry.gc_time import frozen_startup_heap

    class Node:
        pass

    before = Node()
    before.self = before  # a cycle alive at start-up
    ref_before = weakref.ref(before)
    with frozen_startup_heap() as frozen:
        assert frozen >= 1 and gc.get_freeze_count() > 0
        del before
        gc.collect()
        assert ref_before() is not None  # frozen: no collection walks it
        later = Node()
        later.self = later
        ref_later = weakref.ref(later)
        del later
        gc.collect()
        assert ref_later() is None  # a cycle made after the freeze is still collected
    assert gc.get_freeze_count() == 0
    gc.collect()
    assert ref_before() is None  # handed back at the end: collected again
