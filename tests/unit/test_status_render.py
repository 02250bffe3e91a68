"""`outbox-relay status` as text: the replays and backfills, and how to finish one."""

from __future__ import annotations

from typing import Any

from outbox_relay.operations.status import BackfillInfo, ReplayInfo, Status, render


def _status(**kwargs: Any) -> Status:
    return Status(
        schema="outbox",
        pending=0,
        in_flight=0,
        dead_lettered=0,
        dispatched_retained=0,
        oldest_pending_age_s=None,
        **kwargs,
    )


def test_replays_and_backfills_are_listed_with_how_to_finish_the_unfinished() -> None:
    text = render(
        _status(
            replays=[
                ReplayInfo(7, "ops", "2026-11-22 09:00:00Z", {"topic": "orders.*", "key": None}, 10, 4, False),
                ReplayInfo(6, "ops", "2026-11-21 09:00:00Z", {}, 3, 3, True),
            ],
            backfills=[
                BackfillInfo(
                    2,
                    "dba\x1b[31m",
                    "2026-11-22 08:00:00Z",
                    {"table": "public.orders", "topic": "orders.snapshot"},
                    100,
                    100,
                    True,
                ),
                BackfillInfo(
                    1,
                    "dba",
                    "2026-11-20 08:00:00Z",
                    {"table": "public.users", "topic": "users\n.snapshot"},
                    50,
                    20,
                    False,
                ),
            ],
        )
    )
    assert text.splitlines()[-8:] == [
        "",
        "  replays (newest first)",
        "    #7 2026-11-22 09:00:00Z by ops: topic=orders.*; 4 of 10 copied, "
        "not finished (or still copying): replay --resume 7",
        "    #6 2026-11-21 09:00:00Z by ops: everything retained; 3 of 3 copied, done",
        "",
        "  backfills (newest first)",
        # Recorded text reaches the terminal printable: no escape sequence, no line break.
        "    #2 2026-11-22 08:00:00Z by dba?[31m: public.orders -> orders.snapshot; 100 of 100 enqueued, done",
        "    #1 2026-11-20 08:00:00Z by dba: public.users -> users?.snapshot; 20 of 50 enqueued, "
        "not finished (or still copying): backfill --resume 1",
    ]


def test_no_replay_or_backfill_section_when_there_is_none() -> None:
    text = render(_status())
    assert "replays" not in text and "backfills" not in text
    assert text.splitlines()[0] == "schema outbox"
