"""A rolling model update over TorchServe's management API (``dlrm-serve models update``).

TorchServe keeps several versions of one model name side by side and routes
unversioned requests (``/predictions/NAME``) to the default version.  An
update therefore never leaves the name without ready workers:

1. register the new archive beside the running version;
2. wait until the new version has all its workers READY;
3. make it the default (from then on new requests go to it);
4. wait ``drain_s`` for requests already queued on the old version to be
   answered, then unregister the old version (``keep_old`` keeps it, so a
   rollback is one ``set-default``).

Every step goes through :class:`~dlrm_serve.client.core.Client`'s management
calls, so REST and gRPC both work and tokens are renewed as usual.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable

from dlrm_serve.errors import DLRMServeError, ServerError

__all__ = ["UpdateReport", "default_version", "ready_workers", "rolling_update", "versions"]


@dataclass
class UpdateReport:
    """What :func:`rolling_update` did, with the seconds each step took."""

    model: str
    old_version: str | None
    new_version: str
    workers: int = 0
    seconds: dict[str, float] = field(default_factory=dict)
    unregistered: bool = False

    def to_dict(self) -> dict:
        return {
            "model": self.model,
            "old_version": self.old_version,
            "new_version": self.new_version,
            "ready_workers": self.workers,
            "old_version_unregistered": self.unregistered,
            "seconds": {k: round(v, 2) for k, v in self.seconds.items()},
        }


def _entries(described: Any) -> list[dict]:
    return [d for d in (described if isinstance(described, list) else [described]) if isinstance(d, dict)]


def default_version(client: Any, name: str) -> str | None:
    """The version unversioned requests reach (TorchServe describes the default when no version is given)."""
    for entry in _entries(client.describe_model(name)):
        if entry.get("modelVersion") is not None:
            return str(entry["modelVersion"])
    return None


def versions(client: Any, name: str) -> set[str]:
    """Every registered version of ``name``."""
    return {str(e["modelVersion"]) for e in _entries(client.describe_model(name, "all")) if e.get("modelVersion") is not None}


def ready_workers(client: Any, name: str, version: str) -> tuple[int, int]:
    """(READY workers, workers wanted) of one version."""
    ready, wanted = 0, 0
    for entry in _entries(client.describe_model(name, version)):
        workers = entry.get("workers") or []
        ready += sum(1 for w in workers if isinstance(w, dict) and w.get("status") == "READY")
        wanted = max(wanted, int(entry.get("minWorkers") or 0), 1)
    return ready, wanted


def _quietly(fn: Callable, *args: Any) -> None:
    """Clean-up after a failure: its own errors must not hide the first one."""
    try:
        fn(*args)
    except DLRMServeError:
        pass


def rolling_update(
    client: Any,
    name: str,
    url: str,
    version: str,
    *,
    initial_workers: int | None = None,
    ready_timeout_s: float = 300.0,
    drain_s: float = 5.0,
    keep_old: bool = False,
    poll_s: float = 0.5,
    log: Callable[[str], None] | None = None,
    sleep: Callable[[float], None] = time.sleep,
) -> UpdateReport:
    """Replace model ``name`` by archive ``url`` (whose manifest version is ``version``) with no downtime.

    Raises :class:`ServerError` when the new version is already registered,
    when the archive's version is not ``version``, or when the new version
    does not come up READY within ``ready_timeout_s``; in the last two cases
    what was registered is unregistered again and the old version keeps
    serving as before.
    """
    say = log or (lambda msg: None)
    clock = time.monotonic
    old = default_version(client, name)
    if old == str(version):
        raise ServerError(f"{name} version {version} is already the default; nothing to update", status=409)
    report = UpdateReport(name, old, str(version))
    t0 = clock()
    before = versions(client, name)
    if str(version) in before:
        raise ServerError(f"{name} version {version} is already registered (unregister it or pick another version)", status=409)
    say(f"registering {url} as {name} {version} beside {old}")
    client.register_model(url, name, initial_workers=initial_workers, synchronous=True)
    report.seconds["register"] = clock() - t0
    added = versions(client, name) - before
    if str(version) not in added:
        for v in added:  # what the archive really holds goes away again
            _quietly(client.unregister_model, name, v)
        found = ", ".join(sorted(added)) or "an unknown version"
        raise ServerError(
            f"{url} holds {name} {found}, not {version}: pass the archive's own version "
            "(build it with ./build_mar.sh --version V)",
            status=409,
        )
    try:
        t1 = clock()
        deadline = t1 + ready_timeout_s
        while True:
            ready, wanted = ready_workers(client, name, str(version))
            if ready >= wanted:
                break
            if clock() > deadline:
                raise ServerError(f"{name} {version}: {ready} of {wanted} workers READY after {ready_timeout_s:.0f} s", status=504)
            sleep(poll_s)
        report.workers = ready
        report.seconds["ready"] = clock() - t1
        say(f"{name} {version}: {ready} workers READY")
        client.set_default(name, str(version))
    except BaseException:
        # The old version was never replaced: take the half-started one away.
        if default_version(client, name) != str(version):
            _quietly(client.unregister_model, name, str(version))
        raise
    say(f"{name} {version} is the default")
    if old is not None and not keep_old:
        t2 = clock()
        sleep(drain_s)  # requests already queued on the old version are answered meanwhile
        client.unregister_model(name, old)
        report.unregistered = True
        report.seconds["drain_and_unregister"] = clock() - t2
        say(f"unregistered {name} {old}")
    report.seconds["total"] = clock() - t0
    return report
