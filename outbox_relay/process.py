"""Process-wide settings of the relay daemon (`outbox-relay run`), not of a library
import: an application that embeds the relay keeps its own.

The garbage collector: the relay makes and drops a few objects per message, and
CPython's default young-generation threshold (700 allocations) ran a collection every
few messages, each full one walking every long-lived object of the process (modules,
the config, the metrics registry). Measured on 100,000-message drains, on and off
alternated (`python -m benchmarks.ab gc`; docs/explanation/performance-kafka.md): relay
CPU per message 29.9 against 30.0 µs (aiokafka, keyless) up to 37.4 against 41.4 µs
(librdkafka, 100 keys); py-spy had the collector at about a tenth of the relay's own
CPU. Garbage in reference cycles waits longer for its collection, so the hot path makes
none that could hold payloads: the relay's per-message objects are freed by their
reference counts, and a broker call that raises leaves no cycle behind
(engine/dispatch.py; tests/unit/test_dispatch.py, ..._leaves_no_garbage_cycle_...).
"""

from __future__ import annotations

import gc

# Allocations between young collections (CPython: 700), and collections of each
# generation between collections of the next (CPython: 10 and 10).
GC_THRESHOLDS = (20_000, 20, 20)


def tune_gc() -> None:
    """Move everything alive now (imports, config, registry) out of the collector's
    sight, and collect less often."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)
