"""The WAL runner (sources/wal/runner.py) and its slot: an invalidated slot stops it in
one line, a drained slot is dropped only while the outbox is still in table mode, and no
switch back to wal comes before that drop.
Against real PostgreSQL: the shared cluster, and for the invalidated slot a throwaway
one whose max_slot_wal_keep_size lets PostgreSQL invalidate a slot that falls behind."""

from __future__ import annotations

from collections.abc import Iterator

import psycopg
import pytest

from outbox_relay.demo import local_postgres
from outbox_relay.errors import SchemaError
from outbox_relay.operations import schema_manager
from outbox_relay.sources.wal import pgoutput, slot
from outbox_relay.sources.wal.errors import SlotLost
from outbox_relay.sources.wal.runner import WalSource
from tests.support.configs import make_config
from tests.support.waiting import wait_for
from tests.support.wal import WalSlot, wal_slot

# One 16 MB segment past the slot's restart position is more than 1 MB: the checkpoint
# after a segment switch invalidates a slot nobody reads.
SMALL_KEEP = {
    "wal_level": "logical",
    "max_slot_wal_keep_size": "1MB",
    "min_wal_size": "32MB",
    "max_wal_size": "64MB",
}


def set_source(dsn: str, source: str, slot_name: str) -> None:
    with psycopg.connect(dsn) as conn:
        schema_manager.set_source(conn, "outbox", source, slot_name=slot_name)


def source_of(dsn: str) -> str:
    with psycopg.connect(dsn) as conn:
        return schema_manager.read_source(conn, "outbox").source


def slot_exists(dsn: str, name: str) -> bool:
    with psycopg.connect(dsn, autocommit=True) as conn:
        return slot.read_state(conn, name) is not None


def invalidate(dsn: str, name: str) -> slot.SlotState:
    """Write WAL past the slot until a checkpoint invalidates it."""

    def lost() -> bool:
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute("CREATE TABLE IF NOT EXISTS filler (n int)")
            conn.execute("INSERT INTO filler SELECT generate_series(1, 1000)")
            conn.execute("SELECT pg_switch_wal()")
            conn.execute("CHECKPOINT")
            state = slot.read_state(conn, name)
        return state is not None and state.wal_status == "lost"

    wait_for(lost, timeout=30, interval=0.05, what=f"slot {name} invalidated")
    with psycopg.connect(dsn, autocommit=True) as conn:
        state = slot.read_state(conn, name)
    assert state is not None
    return state


async def test_an_invalidated_slot_stops_the_relay_in_one_line_naming_what_may_be_unpublished() -> None:
    with local_postgres.running(SMALL_KEEP) as cluster:
        dsn = cluster.dsn
        name = slot.name_for("outbox")
        with psycopg.connect(dsn) as conn:
            schema_manager.install(conn, "outbox")
        with psycopg.connect(dsn, autocommit=True) as conn:
            slot.create(conn, name, name)
        set_source(dsn, "wal", name)
        state = invalidate(dsn, name)
        assert state.confirmed_flush_lsn is not None

        source = WalSource(make_config(dsn, wal={"slot": name}))
        with pytest.raises(SlotLost) as info:
            await source._plan()

        message = str(info.value)
        assert message.count("\n") == 0
        assert message.startswith(
            f"the outbox 'outbox' is in WAL mode but PostgreSQL invalidated its replication slot {name!r} "
            "(wal_status lost: it fell behind by more than max_slot_wal_keep_size): messages enqueued between WAL "
            f"{pgoutput.format_lsn(state.confirmed_flush_lsn)} and "
        )
        assert message.endswith(f"`outbox-relay schema source wal --schema outbox --slot {name}`")
        assert slot_exists(dsn, name), "never dropped or recreated by the relay"


async def test_after_a_lost_slot_the_advised_switch_to_table_drops_it_and_lifts_the_drain_gate() -> None:
    with local_postgres.running(SMALL_KEEP) as cluster:
        dsn = cluster.dsn
        name = slot.name_for("outbox")
        with psycopg.connect(dsn) as conn:
            schema_manager.install(conn, "outbox")
        with psycopg.connect(dsn, autocommit=True) as conn:
            slot.create(conn, name, name)
        set_source(dsn, "wal", name)
        invalidate(dsn, name)
        set_source(dsn, "table", name)  # what SlotLost's line says to do first
        with psycopg.connect(dsn) as conn:
            assert conn.execute("SELECT drain_gate IS NOT NULL FROM outbox.settings").fetchone() == (True,)

        source = WalSource(make_config(dsn, wal={"slot": name}))
        try:
            assert await source._plan() is None, "nothing of a lost slot can be streamed"
        finally:
            await source._session.close()
        assert not slot_exists(dsn, name)
        with psycopg.connect(dsn) as conn:
            assert conn.execute("SELECT drain_gate FROM outbox.settings").fetchone() == (None,)


@pytest.fixture
def outbox_wal(db: str) -> Iterator[WalSlot]:
    with wal_slot(db) as found:
        yield found


async def test_a_switch_back_to_wal_is_refused_while_the_slot_drains_and_the_slot_stays(outbox_wal: WalSlot) -> None:
    db, name = outbox_wal.dsn, outbox_wal.name
    set_source(db, "wal", name)
    set_source(db, "table", name)
    # The slot is not drained yet: back to wal now would put the table's newer rows
    # behind messages that are not streamed yet, and the drop's check would race it.
    with pytest.raises(SchemaError, match="still draining its slot after the switch to table"):
        set_source(db, "wal", name)
    assert source_of(db) == "table"
    assert slot_exists(db, name)
    with psycopg.connect(db) as conn:
        assert conn.execute("SELECT drain_gate IS NOT NULL FROM outbox.settings").fetchone() == (True,)

    source = WalSource(make_config(db, wal={"slot": name}))
    assert await source._drop() is True  # drained: dropped, and the gate with it
    with psycopg.connect(db) as conn:
        assert conn.execute("SELECT drain_gate, drain_next FROM outbox.settings").fetchone() == (None, None)


async def test_a_drained_slot_is_dropped_while_the_outbox_is_in_table_mode(outbox_wal: WalSlot) -> None:
    db, name = outbox_wal.dsn, outbox_wal.name
    set_source(db, "wal", name)
    set_source(db, "table", name)
    source = WalSource(make_config(db, wal={"slot": name}))

    assert await source._drop() is True
    assert not slot_exists(db, name)
    with pytest.raises(SchemaError, match=f"no usable replication slot {name!r}"):
        set_source(db, "wal", name)  # the switch back, after the drop: refused
    assert source_of(db) == "table"


async def test_a_relay_in_table_mode_reads_the_source_on_one_session_not_a_connection_a_poll(db: str) -> None:
    source = WalSource(make_config(db, wal={"slot": slot.name_for("outbox")}))
    pids = set()
    try:
        for _ in range(3):  # what every SOURCE_POLL_S does in table mode, without a slot
            assert await source._plan() is None
            async with source._session() as conn:
                pids.add(conn.info.backend_pid)
    finally:
        await source._session.close()
    assert len(pids) == 1
