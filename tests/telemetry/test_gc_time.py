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
