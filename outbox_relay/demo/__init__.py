"""``outbox-relay demo`` and the throwaway PostgreSQL cluster it (and the tests) run on.

- ``run``: the demo itself: writers, rollbacks, the relay, a checked summary;
- ``local_postgres``: a private PostgreSQL cluster from the local binaries (or pgserver).

Nothing here is imported by the relay's runtime.
"""
