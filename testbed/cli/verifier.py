"""``testbed verifier start|status|stop`` and ``testbed events``: the verifier service
(:mod:`testbed.verifier`, docs/verifier.md)."""

from __future__ import annotations

import argparse
import json
import threading
from pathlib import Path

from testbed.cli.exitcodes import EXIT_OK
from testbed.cli.render import emit
from testbed.core.clock import iso_utc
from testbed.core.paths import ClusterPaths, existing_cluster
from testbed.verifier.events import describe, follow
from testbed.verifier.service import (
    DEFAULT_INTERVAL_S,
    DEFAULT_WORKERS,
    VerifierConfig,
    VerifierFiles,
    start_verifier,
    stop_verifiers,
    verifier_status,
)
from testbed.verifier.store import open_store

__all__ = ["register_verifier_commands"]


def register_verifier_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]
                               ) -> None:
    verifier = sub.add_parser("verifier", help="the continuous verifier service "
                                               "(start, status, stop)")
    vsub = verifier.add_subparsers(dest="verifier_command", metavar="ACTION", required=True)
    p = vsub.add_parser("start", help="start a verifier that attests every registered node "
                                      "at an interval")
    p.add_argument("--interval", type=float, default=DEFAULT_INTERVAL_S, metavar="SECONDS",
                   help="how often each node is attested (default: %(default)s)")
    p.add_argument("--deadline", type=float, default=None, metavar="SECONDS",
                   help="per-quote deadline (default: half the interval)")
    p.add_argument("--workers", type=int, default=DEFAULT_WORKERS,
                   help="attestations in flight at most (default: %(default)s)")
    p.add_argument("--db", default=None, metavar="URL",
                   help="postgresql://... to share nodes between verifiers (default: SQLite "
                        "in the cluster directory)")
    p.add_argument("--name", default="verifier",
                   help="this verifier's name (several may share one database)")
    p.add_argument("--webhook", action="append", default=[], metavar="URL",
                   help="POST state changes and failures here (repeatable)")
    p.add_argument("--webhook-secret", type=Path, default=None, metavar="FILE",
                   help="HMAC-SHA256 key of the webhook signatures (a 0600 file)")
    p.add_argument("--push", action="append", default=[], metavar="NODE",
                   help="NODE sends its own evidence (push mode) instead of being polled")
    p.add_argument("--no-hosts", dest="hosts", action="store_false",
                   help="do not attest the lab's hypervisor hosts (default: attest them, as "
                        "rows host:NAME; docs/verifier.md)")
    p.set_defaults(func=cmd_verifier_start)
    p = vsub.add_parser("status", help="the verifiers and each node's last verdict")
    p.add_argument("--db", default=None, metavar="URL", help="the database (default: the "
                                                             "one `start` used)")
    p.set_defaults(func=cmd_verifier_status)
    p = vsub.add_parser("stop", help="stop the cluster's verifiers")
    p.add_argument("--name", default=None, help="only this verifier")
    p.set_defaults(func=cmd_verifier_stop)

    p = sub.add_parser("events", help="attestation results and state changes from the "
                                      "verifier's store")
    p.add_argument("--follow", "-f", action="store_true", help="keep printing new events")
    p.add_argument("--since", type=int, default=0, metavar="SEQ",
                   help="only events after this sequence number")
    p.add_argument("--db", default=None, metavar="URL", help="the database (default: the "
                                                             "one `start` used)")
    p.set_defaults(func=cmd_events)


def _cluster(args: argparse.Namespace) -> ClusterPaths:
    return existing_cluster(args.workdir, args.cluster)


def cmd_verifier_start(args: argparse.Namespace) -> int:
    paths = _cluster(args)
    config = VerifierConfig(
        workdir=paths.workdir, cluster=paths.name, name=args.name, interval=args.interval,
        deadline=args.deadline, db=args.db, webhooks=tuple(args.webhook),
        webhook_secret=args.webhook_secret.absolute() if args.webhook_secret else None,
        push=tuple(args.push), workers=args.workers, hosts=args.hosts)
    pid = start_verifier(config)
    files = VerifierFiles(paths)
    emit(args, {"ok": True, "cluster": paths.name, "name": config.name, "pid": pid,
                "interval": config.interval, "log": str(files.log(config.name)),
                "push_socket": str(files.push_socket(config.name))},
         lambda: print(f"verifier {config.name} of cluster {paths.name} running (pid {pid}), "
                       f"every {config.interval:g} s; log {files.log(config.name)}"))
    return EXIT_OK


def cmd_verifier_status(args: argparse.Namespace) -> int:
    status = verifier_status(_cluster(args), args.db)

    def human() -> None:
        if not status["verifiers"]:
            print(f"no verifier for cluster {status['cluster']} (`testbed verifier start`)")
        for v in status["verifiers"]:
            state = f"running (pid {v['pid']})" if v["running"] else "not running"
            beat = f", heartbeat {iso_utc(v['heartbeat'])}" if "heartbeat" in v else ""
            print(f"verifier {v['name']}: {state}{beat}")
        for n in status["nodes"]:
            when = iso_utc(n["last_time"]) if n["last_time"] else "-"
            check = f" ({n['last_check']})" if n["last_check"] else ""
            stale = "  STALE (no verifier keeps it current)" if n["stale"] else ""
            print(f"  {n['node']:<12} {n['kind']:<5} {n['mode']:<5} {n['state']:<12}"
                  f"{check:<16} {when}{stale}")
    emit(args, status, human)
    return EXIT_OK


def cmd_verifier_stop(args: argparse.Namespace) -> int:
    paths = _cluster(args)
    stopped = stop_verifiers(paths, args.name)
    emit(args, {"ok": True, "cluster": paths.name, "stopped": stopped},
         lambda: print("\n".join(f"verifier {n}: " + (f"stopped ({how})" if how
                                                       else "was not running")
                                 for n, how in stopped.items()) or "no verifier to stop"))
    return EXIT_OK


def cmd_events(args: argparse.Namespace) -> int:
    """Without --follow: the events recorded so far (JSON: one document). With --follow:
    one line per event as it comes (JSON: one object per line), until interrupted."""
    paths = _cluster(args)
    files = VerifierFiles(paths)
    if args.db is None and not files.settings.exists():  # a read command creates nothing
        emit(args, {"cluster": paths.name, "events": []},
             lambda: print(f"no verifier ever ran for cluster {paths.name} "
                           "(`testbed verifier start`)"))
        return EXIT_OK
    store = open_store(files.database_url(args.db))
    try:
        if args.follow:
            for event in follow(store, args.since, threading.Event()):
                print(json.dumps(event.to_dict()) if args.json else describe(event),
                      flush=True)
            return EXIT_OK
        events = []
        after = args.since
        while batch := store.events_after(after):
            events.extend(batch)
            after = batch[-1].seq
        emit(args, {"cluster": paths.name, "events": [e.to_dict() for e in events]},
             lambda: print("\n".join(describe(e) for e in events) or "no events"))
    finally:
        store.close()
    return EXIT_OK
