"""What can go wrong in the WAL source, one class per cause.

Driver exceptions (psycopg's) are wrapped at the boundary with ``raise ... from exc``.
An argument that cannot be framed (``framing.encode``) raises ``ValueError``, as the
producer API's argument checks do.
"""

from __future__ import annotations

from outbox_relay.errors import OutboxRelayError


class WalSourceError(OutboxRelayError):
    """Base class of the WAL source's errors."""


class FrameError(WalSourceError):
    """A logical message's content is not an outbox frame this relay can read: truncated,
    of a major version it does not know, or with a field that is not what the framing
    says (invalid UTF-8, a negative length)."""


class ProtocolError(WalSourceError):
    """The replication stream sent bytes that are not what the streaming replication
    protocol and pgoutput version 1 define (a truncated or unknown message)."""


class ReplicationError(WalSourceError):
    """The replication connection failed, the server refused to stream the slot, or it
    ended the stream; the message says which, with the server's own words."""


class SlotInUse(ReplicationError):
    """Another connection streams the slot: PostgreSQL lets one walsender use a slot at
    a time (another relay holds it, or the previous connection has not ended yet)."""


class SlotMissing(ReplicationError):
    """The replication slot does not exist (never created, dropped, or not carried to a
    promoted standby): it is never recreated silently, because the WAL between the lost
    slot and a new one would not be read."""


class SlotLost(SlotMissing):
    """The slot exists but PostgreSQL invalidated it (wal_status 'lost': it fell behind
    by more than max_slot_wal_keep_size, and the WAL it needed is gone): it can never
    stream again, so it is treated as a missing slot."""
