"""RSS of a relay process holding 1,000,000 live dedup keys (bench-only hook of `make bench`).

Posting a million events takes minutes, so this builds the production objects in-process
instead: it starts the real ``relay.service.Relay`` from the example configuration (broker
link up, listening on a free port, structlog configured as ``serve`` does, on uvloop), then
commits KEYS realistic keys (``dedup_key`` of the bench token's principal, ``order.created`` and
a UUID reference, ~70 bytes) through the app's ``MemoryDedupStore`` with the same
``claim``/``commit`` calls the ingest stage makes. The key strings are dropped as they are
committed (the store keeps only their 16-byte digests), so what remains is the relay's own
state. It then reads the process's own VmRSS and VmHWM from /proc/self/status.

Prints one JSON object: keys, entries held, evictions, RSS before and after loading (bytes),
peak RSS, bytes per key, load time. The runner passes unique exchange names and deletes them.

    python -m bench.dedup_rss --exchange X --unrouted Y --rejected R --archive Z [--keys 1000000]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import time
import uuid
from pathlib import Path

import uvloop

from relay.dedup.memory import Verdict, dedup_key
from relay.http.app import DEDUP
from relay.http.auth import Principal, TokenAuthenticator
from relay.logs import configure_logging
from relay.service import Relay
from relay.settings import load_settings

DEVNULL = open(os.devnull, "w")  # noqa: SIM115 - the relay's log lines are not measured here
EXAMPLE = Path(__file__).resolve().parent.parent / "config" / "relay.example.toml"


def proc_status(field: str) -> int:
    """A ``kB`` field of /proc/self/status (VmRSS, VmHWM), in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(field)


async def run(args: argparse.Namespace) -> dict[str, object]:
    token = uuid.uuid4().hex
    environ = {
        "RELAY_HTTP_PORT": "0",
        "RELAY_AUTH_TOKENS": token,
        "RELAY_AMQP_URL": args.amqp_url,
        "RELAY_AMQP_EXCHANGE": args.exchange,
        "RELAY_AMQP_UNROUTED_EXCHANGE": args.unrouted,
        "RELAY_AMQP_REJECTED_EXCHANGE": args.rejected,
        "RELAY_ARCHIVE_QUEUE": args.archive,
        "RELAY_STATE_DIR": args.state_dir,
    }
    settings = load_settings(EXAMPLE, environ)
    configure_logging(settings.log.level, "json", DEVNULL)
    principal = TokenAuthenticator(settings.auth.tokens).authenticate(f"Bearer {token}")
    assert isinstance(principal, Principal)
    async with Relay(settings) as relay:
        await asyncio.wait_for(relay.wait_durable(), 15)
        store = relay.app[DEDUP]
        baseline = proc_status("VmRSS")
        started = time.perf_counter()
        for _ in range(args.keys):
            body = {"reference": str(uuid.uuid4())}
            key = dedup_key(principal.id, "order.created", body, b"", settings.dedup.key_fields)
            if await store.claim(key) is not Verdict.CLAIMED:
                raise RuntimeError(f"key {key} was not claimed")
            await store.commit(key)
        load_seconds = time.perf_counter() - started
        del body, key
        rss = proc_status("VmRSS")
        hwm = proc_status("VmHWM")
        entries, evictions = len(store), store.evictions
    return {
        "keys": args.keys,
        "entries": entries,
        "evictions": evictions,
        "rss_baseline_bytes": baseline,
        "rss_bytes": rss,
        "peak_rss_bytes": hwm,
        "bytes_per_key": round((rss - baseline) / args.keys, 1),
        "load_seconds": round(load_seconds, 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--amqp-url", default="amqp://guest:guest@127.0.0.1:5672/")
    parser.add_argument("--exchange", required=True)
    parser.add_argument("--unrouted", required=True)
    parser.add_argument("--rejected", required=True)
    parser.add_argument("--archive", required=True)
    parser.add_argument("--state-dir", default="var/bench-state")
    parser.add_argument("--keys", type=int, default=1_000_000)
    args = parser.parse_args()
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        result = runner.run(run(args))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
