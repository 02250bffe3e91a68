"""The claim check: large payloads through object storage.

- envelope.py: what the broker gets instead of a large payload (headers and a small body);
- stores.py: where payloads go (a filesystem path, an S3-compatible bucket);
- uploads.py: the relay's side (upload before publishing; a store down waits);
- consume.py: `fetch`, the consumer's side (fetch and verify by SHA-256);
- produce.py: `enqueue_large`, the producer's side (upload first, enqueue a reference);
- the sweep of orphaned uploads is an operator command: operations/claim_check_sweep.py.
"""

from outbox_relay.claim_check.consume import fetch
from outbox_relay.claim_check.envelope import CONTENT_TYPE, ClaimCheckError, Reference, reference_in
from outbox_relay.claim_check.produce import enqueue_large, enqueue_large_async
from outbox_relay.claim_check.stores import FileStore, S3Store, Store, open_store

__all__ = [
    "CONTENT_TYPE",
    "ClaimCheckError",
    "FileStore",
    "Reference",
    "S3Store",
    "Store",
    "enqueue_large",
    "enqueue_large_async",
    "fetch",
    "open_store",
    "reference_in",
]
