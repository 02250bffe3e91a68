"""`dead-letters requeue` and `purge` select what every filter given selects together
(--id AND --topic AND, for purge, --older-than), and refuse --all beside a filter
(issue 17, item 6): the real command against real PostgreSQL."""

from __future__ import annotations

from pathlib import Path

import psycopg
import pytest

from outbox_relay import enqueue
from tests.support.cli import run_cli
from tests.support.configs import write_config


def _two_dead_letters(db: str, tmp_path: Path) -> tuple[Path, str, str]:
    """A config, and the ids of two dead letters: one of topic big.orders, one of other.audit."""
    config = write_config(tmp_path / "relay.yaml", db, sink=tmp_path / "out.jsonl")
    with psycopg.connect(db) as conn:
        big = enqueue(conn, "big.orders", {"n": 1}, key="k1")
        other = enqueue(conn, "other.audit", {"n": 2}, key="k2")
        conn.execute(
            "UPDATE outbox.messages SET dead_lettered_at = now() - interval '10 days', dead_letter_reason = 'x'"
        )
        conn.commit()
    return config, str(big), str(other)


def _dead(db: str) -> list[str]:
    """Topics of the dead letters left, sorted."""
    with psycopg.connect(db) as conn:
        rows = conn.execute("SELECT topic FROM outbox.messages WHERE dead_lettered_at IS NOT NULL").fetchall()
    return sorted(r[0] for r in rows)


def _topics(db: str) -> list[str]:
    """Topics of every row left (purge deletes rows), sorted."""
    with psycopg.connect(db) as conn:
        return sorted(r[0] for r in conn.execute("SELECT topic FROM outbox.messages").fetchall())


def test_requeue_takes_an_id_only_if_its_topic_matches_too(db: str, tmp_path: Path) -> None:
    config, big, other = _two_dead_letters(db, tmp_path)
    outside = run_cli("dead-letters", "requeue", "--config", str(config), "--id", other, "--topic", "big.*")
    assert outside.returncode == 1, outside.stdout + outside.stderr
    assert "requeued 0 message(s)" in outside.stdout
    assert outside.stderr.count("\n") == 1 and other in outside.stderr and "--topic" in outside.stderr
    assert _dead(db) == ["big.orders", "other.audit"], "an id whose topic does not match stays dead"

    both = run_cli("dead-letters", "requeue", "--config", str(config), "--id", big, "--topic", "big.*")
    assert both.returncode == 0 and "requeued 1 message(s)" in both.stdout, both.stdout + both.stderr
    assert _dead(db) == ["other.audit"]


@pytest.mark.parametrize("which", ["topic", "id"])
def test_requeue_refuses_all_beside_a_filter_and_touches_nothing(db: str, tmp_path: Path, which: str) -> None:
    config, big, _ = _two_dead_letters(db, tmp_path)
    given = ["--topic", "big.*"] if which == "topic" else ["--id", big]
    refused = run_cli("dead-letters", "requeue", "--config", str(config), *given, "--all")
    assert refused.returncode == 2, refused.stdout + refused.stderr
    assert refused.stderr.count("\n") == 1 and "--all" in refused.stderr and "alone" in refused.stderr
    assert refused.stdout == ""
    assert _dead(db) == ["big.orders", "other.audit"]

    everything = run_cli("dead-letters", "requeue", "--config", str(config), "--all")
    assert everything.returncode == 0 and "requeued 2 message(s)" in everything.stdout
    assert _dead(db) == []


def test_purge_takes_an_id_only_if_its_topic_matches_too(db: str, tmp_path: Path) -> None:
    config, big, other = _two_dead_letters(db, tmp_path)
    outside = run_cli("dead-letters", "purge", "--config", str(config), "--id", other, "--topic", "big.*", "--yes")
    assert outside.returncode == 1, outside.stdout + outside.stderr
    assert "no dead letters match" in outside.stdout
    assert outside.stderr.count("\n") == 1 and other in outside.stderr and "--topic" in outside.stderr
    assert _topics(db) == ["big.orders", "other.audit"]

    both = run_cli("dead-letters", "purge", "--config", str(config), "--id", big, "--topic", "big.*", "--yes")
    assert both.returncode == 0 and "deleted 1 dead letter(s)" in both.stdout, both.stdout + both.stderr
    assert _topics(db) == ["other.audit"]


def test_purge_asks_with_the_count_of_what_every_filter_selects(db: str, tmp_path: Path) -> None:
    config, big, other = _two_dead_letters(db, tmp_path)
    asked = run_cli("dead-letters", "purge", "--config", str(config), "--id", big, "--id", other, "--topic", "big.*")
    assert asked.returncode == 2 and "1 dead letter(s) would be deleted; pass --yes" in asked.stderr, asked.stderr
    young = run_cli("dead-letters", "purge", "--config", str(config), "--id", big, "--older-than", "30d", "--yes")
    assert young.returncode == 1 and "no dead letters match" in young.stdout, young.stdout + young.stderr
    assert _topics(db) == ["big.orders", "other.audit"]


@pytest.mark.parametrize("which", ["topic", "id", "older-than"])
def test_purge_refuses_all_beside_a_filter_and_touches_nothing(db: str, tmp_path: Path, which: str) -> None:
    config, big, _ = _two_dead_letters(db, tmp_path)
    given = {"topic": ["--topic", "big.*"], "id": ["--id", big], "older-than": ["--older-than", "7d"]}[which]
    refused = run_cli("dead-letters", "purge", "--config", str(config), *given, "--all", "--yes")
    assert refused.returncode == 2, refused.stdout + refused.stderr
    assert refused.stderr.count("\n") == 1 and "--all" in refused.stderr and "alone" in refused.stderr
    assert refused.stdout == ""
    assert _topics(db) == ["big.orders", "other.audit"]

    everything = run_cli("dead-letters", "purge", "--config", str(config), "--all", "--yes")
    assert everything.returncode == 0 and "deleted 2 dead letter(s)" in everything.stdout, everything.stderr
    assert _topics(db) == []


@pytest.mark.parametrize("command", ["requeue", "purge"])
def test_requeue_and_purge_say_what_a_combination_means(command: str) -> None:
    shown = run_cli("dead-letters", command, "--help")
    assert shown.returncode == 0, shown.stderr
    text = " ".join(shown.stdout.split())
    assert "every filter given" in text and "--all" in text and "alone" in text, text
