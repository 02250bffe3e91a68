"""`python -m soak` (or `scripts/soak`): the chaos soak. Not part of the tests;
tests/soak/test_soak.py runs a 3-minute one in CI.

scripts/soak --minutes 3                      # a quick one, a random seed (printed)
scripts/soak --minutes 60 --seed 7 --out /tmp/soak60
scripts/soak --minutes 5 --faults relay_sigkill,kafka_kill   # only these kinds

Exit status: 0 when the checker found nothing, 1 when it found something (each
finding one line on stderr and in summary.json's "failures"), 2 when the soak could
not run (bad arguments, a service that did not start).
"""

from __future__ import annotations

import argparse
import random
import sys
from datetime import UTC, datetime
from pathlib import Path

from outbox_relay.observability.logging_setup import configure
from soak import faults
from soak.run import Options, run

ROOT = Path(__file__).resolve().parent.parent


def parse(argv: list[str]) -> Options:
    parser = argparse.ArgumentParser(prog="scripts/soak", description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, required=True, help="how long the writers run, with faults")
    parser.add_argument("--seed", type=int, default=None, help="the fault schedule's and writers' seed")
    parser.add_argument("--out", type=Path, default=None, help="where summary.json, soak.png and the relays' logs go")
    parser.add_argument("--rate", type=float, default=100.0, help="messages committed per second (default 100)")
    parser.add_argument("--source", choices=("table", "wal"), default="table")
    parser.add_argument("--replicas", type=int, default=3)
    parser.add_argument(
        "--kafka",
        choices=("single", "cluster"),
        default="single",
        help="cluster: 3 brokers (kafka.sh cluster-start), topics with 3 replicas and min.insync.replicas 2",
    )
    parser.add_argument(
        "--toxiproxy",
        action="store_true",
        help="the relays reach PostgreSQL (single), Kafka (single) and RabbitMQ through toxiproxy: network faults",
    )
    parser.add_argument(
        "--rabbitmq",
        nargs="?",
        const="single",
        choices=("single", "cluster"),
        help="RabbitMQ too (a node, or with 'cluster' 3 of them): a quarter of the messages go through it",
    )
    parser.add_argument(
        "--postgres",
        choices=("single", "failover"),
        default="single",
        help="failover: a primary and its synchronous standby, which the postgres_failover fault promotes",
    )
    parser.add_argument(
        "--faults", default="", help=f"comma-separated kinds (default: all of {', '.join(faults.REGISTRY)})"
    )
    parser.add_argument("--gap", default="5,15", help="quiet seconds between faults, MIN,MAX (default 5,15)")
    args = parser.parse_args(argv)
    if args.minutes <= 0 or args.rate <= 0 or args.replicas < 1:
        parser.error("--minutes and --rate must be positive, --replicas at least 1")
    if args.postgres == "failover" and args.source == "wal":
        parser.error("--postgres failover takes the table source: a logical slot does not survive a failover")
    try:
        low, high = (float(x) for x in args.gap.split(","))
    except ValueError:
        parser.error(f"--gap takes MIN,MAX in seconds, not {args.gap!r}")
    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(1_000_000)
    out = args.out or ROOT / "soak" / "results" / f"{datetime.now(UTC):%Y%m%d-%H%M%S}-seed{seed}"
    only = [k.strip() for k in args.faults.split(",") if k.strip()] or None
    return Options(
        minutes=args.minutes,
        seed=seed,
        out=out,
        rate=args.rate,
        source=args.source,
        kafka=args.kafka,
        rabbitmq=args.rabbitmq,
        toxiproxy=args.toxiproxy,
        postgres=args.postgres,
        replicas=args.replicas,
        only=only,
        gap=(low, high),
    )


def main(argv: list[str]) -> int:
    options = parse(argv)
    configure("warning")
    try:
        summary = run(options)
    except (ValueError, RuntimeError, OSError) as exc:
        print(f"soak: {exc}", file=sys.stderr)
        return 2
    checked = summary["checker"]
    print(
        f"[soak] {summary['faults']['injected']} faults injected, {summary['faults']['healed']} healed; "
        f"{checked['committed']} committed, lost {checked['lost']}, phantom {checked['phantom']}, "
        f"unknown {checked['unknown']}, order violations {checked['order_violations']}, "
        f"duplicates {checked['duplicates']} (bound {checked['duplicates_bound']}); "
        f"RSS {summary['rss'].get('first_third_max_kb')} -> {summary['rss'].get('last_third_max_kb')} kB; "
        f"{summary['wall_seconds']:.0f} s in all; {options.out}/summary.json, soak.png"
    )
    for failure in summary["failures"]:
        print(f"soak: FAIL {failure}", file=sys.stderr)
    return 1 if summary["failures"] else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
