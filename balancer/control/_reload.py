"""Config reload: the TOML file (`--config PATH`) read again, on SIGHUP or POST /config/reload.

Two parts, as everywhere in the balancer:

- `plan_reload` (pure): the settings in use and the new ones in, a `ReloadPlan` out: what
  changes at run time (the backend list: backends added, removed, reweighted) and the
  settings that differ but only take effect at a start (`needs_restart`, named by their
  TOML key: the listen address, --workers, the TLS files, which have their own reload,
  SIGUSR1, and every other one). A backend keeps its id across a reload (its name, or its
  URL's digest), so the Maglev table moves only the keys the change must move.
- `ConfigReloader` (the thin shell): reads the settings again exactly as the process read
  them at start (`load_settings` with its own command line and environment, so both keep
  their precedence over the file), validates all of it first (a bad file raises ConfigError
  and changes nothing), then applies the plan to the pool: an added backend joins UP (slow
  start ramps it), a removed one is drained first (`Pool.drain`, the --drain-* policy) and
  taken out of the pool once DRAINED (`drained`, called by the drain watcher), a
  reweighted one gets `Pool.set_weight`. The settings that need a restart are logged and
  ignored, never applied half-way; the next reload names them again until a restart.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, fields, replace

from .._config import Settings, load_settings
from .._exceptions import ConfigError, InvalidTransition
from ..datapath._backend import Backend, BackendSpec, backend_id
from ..datapath._pool import Pool
from ._events import (
    BACKEND_ADDED,
    BACKEND_DRAINING,
    BACKEND_REMOVED,
    BACKEND_WEIGHT,
    CONFIG_NEEDS_RESTART,
    CONFIG_RELOAD_FAILED,
    CONFIG_RELOADED,
)
from ._log import log_event

__all__ = ["ConfigReloader", "ReloadPlan", "plan_reload"]

# What a reload applies; every other setting that differs needs a restart.
_AT_RUN_TIME = frozenset({"backends"})
# Not settings of the file: where it is, and the affinity secret generated at start when
# none is given (a reload must not read "none given" as a change).
_NOT_COMPARED = frozenset({"config"})


def _spec_id(spec: BackendSpec) -> str:
    """The pool id of a configured backend: its name, or its (normalized) URL's digest."""
    return spec.name if spec.name is not None else backend_id(spec.url)


@dataclass(frozen=True, slots=True)
class ReloadPlan:
    """What a reload changes. Backends by id; `needs_restart`: TOML keys, sorted."""

    added: tuple[BackendSpec, ...] = ()
    removed: tuple[str, ...] = ()
    reweighted: tuple[tuple[str, int], ...] = ()
    needs_restart: tuple[str, ...] = ()

    @property
    def changes_backends(self) -> bool:
        return bool(self.added or self.removed or self.reweighted)


def plan_reload(current: Settings, new: Settings) -> ReloadPlan:
    """The plan from the settings in use to `new` (both validated). A backend whose id
    stays but whose URL, `backup` or `max-conns` changed needs a restart (or a new name):
    changing it in place would send its pinned clients elsewhere under the same id."""
    needs_restart = {
        f.name
        for f in fields(Settings)
        if f.name not in _AT_RUN_TIME | _NOT_COMPARED
        and getattr(current, f.name) != getattr(new, f.name)
    }
    old_specs = {_spec_id(spec): spec for spec in current.backend_options()}
    new_specs = {_spec_id(spec): spec for spec in new.backend_options()}
    added = tuple(spec for key, spec in new_specs.items() if key not in old_specs)
    removed = tuple(key for key in old_specs if key not in new_specs)
    reweighted = []
    for key, spec in new_specs.items():
        old = old_specs.get(key)
        if old is None:
            continue
        if (old.url, old.backup, old.max_conns) != (spec.url, spec.backup, spec.max_conns):
            needs_restart.add(f"backends ({key})")
        elif old.weight != spec.weight:
            reweighted.append((key, spec.weight))
    return ReloadPlan(added, removed, tuple(reweighted), tuple(sorted(needs_restart)))


class ConfigReloader:
    """Reloads the settings file into `pool`; see the module docstring. `argv` and
    `environ` are the process's own (what `load_settings` read at start); `settings`,
    what it read then (with any generated affinity secret)."""

    def __init__(
        self,
        settings: Settings,
        pool: Pool,
        *,
        argv: Sequence[str],
        environ: Mapping[str, str],
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.settings = settings
        self.pool = pool
        self.reloads = 0  # reloads that were applied (a bad file does not count)
        self._argv = tuple(argv)
        self._environ = dict(environ)
        self._clock = clock
        # Backends removed by a reload and still draining: taken out once DRAINED.
        self._leaving: set[str] = set()

    def read(self) -> Settings:
        """The settings as a start now would read them; raises ConfigError."""
        new = load_settings(self._argv, self._environ)
        if not new.affinity_secrets:  # generated at start: the same one goes on
            new = replace(new, affinity_secrets=self.settings.affinity_secrets)
        return new

    def reload(self, source: str) -> dict[str, object]:
        """Read, validate, apply (module docstring); what changed, as JSON. Raises
        ConfigError (logged as `config_reload_failed`) with nothing changed."""
        try:
            new = self.read()
            plan = plan_reload(self.settings, new)
            self._check(plan)
        except ConfigError as exc:
            log_event(
                CONFIG_RELOAD_FAILED,
                level=logging.WARNING,
                source=source,
                error=str(exc),
                config=str(self.settings.config),
            )
            raise
        self._apply(plan, source)
        # Only what was applied becomes current: a setting that needs a restart is named
        # again by the next reload.
        self.settings = replace(self.settings, backends=new.backends)
        self.reloads += 1
        if plan.needs_restart:
            log_event(
                CONFIG_NEEDS_RESTART,
                level=logging.WARNING,
                source=source,
                settings=list(plan.needs_restart),
                hint="changed in the file but applied only at a start: ignored until then",
            )
        added = [_spec_id(spec) for spec in plan.added]
        log_event(
            CONFIG_RELOADED,
            source=source,
            config=str(self.settings.config),
            added=added,
            removed=list(plan.removed),
            reweighted=dict(plan.reweighted),
            needs_restart=list(plan.needs_restart),
        )
        return {
            "reloads": self.reloads,
            "added": added,
            "removed": list(plan.removed),
            "reweighted": dict(plan.reweighted),
            "needs_restart": list(plan.needs_restart),
        }

    def _check(self, plan: ReloadPlan) -> None:
        """Every change can be made, before any is: a backend added under an id or URL
        the pool holds already (the admin API's, discovery's) is refused."""
        for spec in plan.added:
            key = _spec_id(spec)
            held = self.pool.get(key)
            if held is not None and not (key in self._leaving and held.url == spec.url):
                raise ConfigError("--config", f"backend {key!r} is in the pool already")
            same = self.pool.find(spec.url)
            if same is not None and same.id != key:
                raise ConfigError(
                    "--config", f"{spec.url} is in the pool already, as backend {same.id!r}"
                )

    def _apply(self, plan: ReloadPlan, source: str) -> None:
        now = self._clock()
        for spec in plan.added:
            key = _spec_id(spec)
            if key in self._leaving:  # removed by an earlier reload, still draining: back
                self._leaving.discard(key)
                back = self.pool[key]
                if back.draining:
                    self.pool.enable(key)
                self.pool.set_weight(key, spec.weight)
                log_event(BACKEND_ADDED, backend=key, url=back.url, source=source)
                continue
            added = self.pool.add(
                spec.url,
                name=spec.name,
                weight=spec.weight,
                backup=spec.backup,
                max_conns=spec.max_conns,
            )
            if self.pool.policy.slow_start > 0:
                added.ramp_from = now  # a new backend starts cold: ramp its share
            log_event(BACKEND_ADDED, backend=key, url=added.url, source=source)
        for key in plan.removed:
            backend = self.pool.get(key)
            if backend is None:  # removed by the operator already
                continue
            self._leaving.add(key)
            if backend.draining:
                if backend.drained_reason is not None:  # drained by the operator: done
                    self.drained(backend, backend.drained_reason)
                continue  # the operator's drain goes on; removed when it ends
            try:
                self.pool.drain(key, now)
            except InvalidTransition:  # pragma: no cover - checked just above
                continue
            log_event(
                BACKEND_DRAINING,
                backend=key,
                reason="config",
                in_flight=backend.in_flight,
                sessions="keep" if backend.keep_pinned else "move",
            )
        for key, weight in plan.reweighted:
            weighted = self.pool.get(key)
            if weighted is None:
                continue
            old = weighted.configured_weight
            self.pool.set_weight(key, weight)
            log_event(BACKEND_WEIGHT, backend=key, weight=weight, was=old, source=source)

    def drained(self, backend: Backend, reason: str) -> None:
        """The drain watcher's `on_drained`: a backend a reload removed leaves the pool."""
        if backend.id not in self._leaving:
            return
        self._leaving.discard(backend.id)
        if self.pool.get(backend.id) is backend:
            self.pool.remove(backend.id)
            log_event(
                BACKEND_REMOVED, backend=backend.id, in_flight=backend.in_flight, reason="config"
            )
