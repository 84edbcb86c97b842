"""The load generators and small clients of `make bench`.

``wrk`` drives the closed loop (bench/retm.lua), ``openloop`` the fixed-rate open loop
(bench/openloop.py); ``run_json`` runs a bench helper process that prints one JSON object.
"""

from __future__ import annotations

import asyncio
import json
import sys
import uuid
from typing import Any

import aiohttp

from bench.harness import ROOT, child_environ

FIXTURE = ROOT / "tests" / "fixtures" / "order.created.json"
WRK_SCRIPT = ROOT / "bench" / "retm.lua"


async def run_json(argv: list[str], *, env: dict[str, str] | None = None) -> dict[str, Any]:
    """Run a bench helper that prints one JSON object as its last line of stdout."""
    proc = await asyncio.create_subprocess_exec(
        *argv,
        env=env or child_environ(),
        cwd=str(ROOT),
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await proc.communicate()
    if proc.returncode != 0:
        raise RuntimeError(f"{argv[:3]} exited {proc.returncode}: {err.decode()[-2000:]}")
    result: dict[str, Any] = json.loads(out.decode().strip().splitlines()[-1])
    return result


async def wrk(
    path: str, url: str, *, seconds: int, connections: int, threads: int, token: str
) -> dict[str, Any]:
    """wrk (at ``path``) with bench/retm.lua for ``seconds`` (whole seconds, at least 1):
    the WRK_JSON summary plus ``seconds`` run, ``rate`` (req/s), ``ok`` (2xx answers),
    ``max_ms`` and ``failed`` (answers that were not 2xx, socket errors and timeouts).
    An answer slower than 10 s counts as a timeout."""
    argv = [
        path,
        "-t",
        str(threads),
        "-c",
        str(connections),
        "-d",
        f"{max(1, seconds)}s",
        "--timeout",
        "10s",
        "-s",
        str(WRK_SCRIPT),
        url,
        "--",
        str(FIXTURE),
        token or "-",
        uuid.uuid4().hex[:8],
    ]
    proc = await asyncio.create_subprocess_exec(
        *argv,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await proc.communicate()
    for line in out.decode().splitlines():
        if line.startswith("WRK_JSON "):
            result: dict[str, Any] = json.loads(line[len("WRK_JSON ") :])
            break
    else:
        raise RuntimeError(f"wrk printed no summary: {out.decode()[-1000:]} {err.decode()[-500:]}")
    seconds_run = result["duration_us"] / 1e6
    result["seconds"] = round(seconds_run, 3)
    result["rate"] = round(result["requests"] / seconds_run, 1)
    result["ok"] = sum(n for code, n in result["statuses"].items() if code.startswith("2"))
    result["max_ms"] = round(result["latency_us"]["max"] / 1000, 3)
    errors = result["errors"]
    result["failed"] = result["non2xx"] + errors["connect"] + errors["read"] + errors["write"]
    result["failed"] += errors["timeout"]
    return result


async def openloop(
    url: str, *, token: str, rate: float, seconds: float, warmup: float = 1, raw: bool = False
) -> dict[str, Any]:
    """bench/openloop.py at ``rate`` req/s for ``seconds`` (after ``warmup`` seconds at the same
    rate, not counted) against ``url``: its JSON summary (with ``raw``, also
    ``latencies_ms``, every measured latency)."""
    return await run_json(
        [
            sys.executable,
            "-m",
            "bench.openloop",
            url,
            "--token",
            token,
            "--rate",
            str(rate),
            "--seconds",
            str(seconds),
            "--warmup",
            str(warmup),
            "--run-id",
            uuid.uuid4().hex[:8],
            *(["--raw"] if raw else []),
        ]
    )


async def get_json(url: str) -> tuple[int, Any]:
    """GET ``url``: (status, parsed JSON body)."""
    async with aiohttp.ClientSession() as session, session.get(url) as response:
        return response.status, await response.json(content_type=None)
