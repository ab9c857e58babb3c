# Copyright: offline.delivery contributors
# SPDX-License-Identifier: GPL-3.0-or-later
"""The deploy engine: make one host run a release, health-gated, with automatic rollback.

One implementation for every target kind: it plans by comparing fingerprints (``app_runtime``), fetches
before it stops anything, starts level by level in dependency order, waits for each level to be healthy,
and on a failed gate puts the previous release back. Install, upgrade and rollback are all "deploy
release X"; they differ only in where X comes from and what is recorded. Standard library only.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence

from .model import diff_models, select_modules
from .runtime import (ComponentSpec, DeployError, Observed, Runtime, desired_specs, listening_tcp_ports,
                      probe_spec, wait_healthy)
from .state import AppState, check_snapshot, fingerprint_key, restore_snapshot, take_snapshot, utc_now


class HealthGateError(DeployError):
    """A component did not become healthy in time, or a job did not complete successfully."""

    def __init__(self, component: str, reason: str, logs: str = "", job: bool = False) -> None:
        self.component = component
        self.reason = reason
        self.logs = logs
        what = "did not complete" if job else "failed its health check"
        super().__init__("component %s %s: %s" % (component, what, reason))


@dataclass
class Plan:
    added: List[str] = field(default_factory=list)
    changed: List[str] = field(default_factory=list)
    unchanged: List[str] = field(default_factory=list)
    removed: List[str] = field(default_factory=list)
    # Present with the right fingerprint but not running: started again, reported apart from changed.
    restarted: List[str] = field(default_factory=list)

    @property
    def to_start(self) -> List[str]:
        return self.added + self.changed + self.restarted

    @property
    def has_changes(self) -> bool:
        return bool(self.to_start or self.removed)

    def as_dict(self) -> Dict[str, List[str]]:
        return {"added": self.added, "changed": self.changed, "unchanged": self.unchanged,
                "removed": self.removed, "restarted": self.restarted}


def make_plan(specs: Sequence[ComponentSpec], observed: Mapping[str, Observed]) -> Plan:
    plan = Plan()
    for spec in specs:
        seen = observed.get(spec.name)
        if seen is None:
            plan.added.append(spec.name)
        elif seen.fingerprint != spec.fingerprint:
            plan.changed.append(spec.name)
        elif not seen.running:
            plan.restarted.append(spec.name)
        else:
            plan.unchanged.append(spec.name)
    wanted = {s.name for s in specs}
    plan.removed = sorted(n for n in observed if n not in wanted)
    return plan


def check_ports(runtime: Runtime, specs: Sequence[ComponentSpec], plan: Plan, host: str,
                listening: Optional[set] = None) -> None:
    """Refuse, before any change, to start a new component on a host port another program holds."""
    busy = listening_tcp_ports() if listening is None else listening
    clashes = ["%d (%s)" % (port, spec.name) for spec in specs if spec.name in plan.added
               for port in runtime.host_ports(spec) if port in busy]
    if clashes:
        raise DeployError("port(s) %s already in use on %s by another program: stop it, or place the "
                          "component on other hosts (placement.group)" % (", ".join(clashes), host))


def start_levels(specs: Sequence[ComponentSpec]) -> List[List[ComponentSpec]]:
    """Specs (already in dependency order) grouped so each level only depends on earlier ones on this host."""
    level_of: Dict[str, int] = {}
    levels: List[List[ComponentSpec]] = []
    for spec in specs:
        level = 1 + max((level_of[d] for d in spec.local_deps if d in level_of), default=-1)
        level_of[spec.name] = level
        while len(levels) <= level:
            levels.append([])
        levels[level].append(spec)
    return levels


def apply_plan(runtime: Runtime, specs: Sequence[ComponentSpec], plan: Plan, *, health_cap: float,
               log: Callable[[str], None]) -> Dict[str, str]:
    """Make the host match ``specs``; returns component -> "healthy" (a job: "completed"). Raises
    HealthGateError."""
    to_start = set(plan.to_start)
    runtime.prepare([s for s in specs if s.name in to_start])
    if plan.removed:
        log("removing %s" % ", ".join(plan.removed))
        runtime.remove(plan.removed, all_specs=specs)
    health: Dict[str, str] = {}
    for level in start_levels(specs):
        todo = [s for s in level if s.name in to_start]
        if todo:
            log("starting %s" % ", ".join(s.name for s in todo))
            runtime.start(todo, all_specs=specs)
        for spec in level:
            ok, reason = wait_healthy(runtime, spec, cap=health_cap)
            if not ok:
                raise HealthGateError(spec.name, reason, runtime.logs(spec.name), job=spec.is_job)
            health[spec.name] = "completed" if spec.is_job else "healthy"
    return health


@dataclass
class Target:
    """Where and how this host runs the app (the same for every release)."""

    host: str
    platform: str
    registry: str
    secrets: Mapping[str, str]
    # Where each component runs; None for a rollback, which reuses what the kept release was deployed with.
    placement: Optional[Mapping[str, Sequence[str]]] = None
    addresses: Optional[Mapping[str, str]] = None


class Engine:
    """Deploy and roll back one app on one host; results are plain dicts for the modules.

    The specs' fingerprints are keyed with the key of the state's directory (``app_state.fingerprint_key``:
    made on the first deploy; in check mode never made, a key of the run is used instead)."""

    def __init__(self, runtime: Runtime, state: AppState, target: Target, *, health_cap: float, actor: str,
                 check_mode: bool = False, log: Optional[Callable[[str], None]] = None) -> None:
        self.runtime = runtime
        self.state = state
        self.fingerprint_key = fingerprint_key(state.state_dir, create=not check_mode)
        self.target = target
        self.health_cap = health_cap
        self.actor = actor
        self.check_mode = check_mode
        self.messages: List[str] = []
        self.log = log or self.messages.append
        self.patch: Dict[str, Any] = {}  # {"patch": ...} for the history of a deploy of a site release

    # -- building blocks -------------------------------------------------------------------------------

    def specs(self, model: dict, images: Mapping[str, Any], overrides: Mapping[str, Any],
              kept: Optional[Mapping[str, Any]] = None, modules: Optional[Mapping[str, bool]] = None
              ) -> List[ComponentSpec]:
        """What this host runs of ``model``: the components of the site's modules (``modules``: module -> on,
        the site's choices) that are placed here."""
        placement, addresses = self._layout(kept)
        model = select_modules(model, modules or {})[0]
        t = self.target
        return desired_specs(model, images, host=t.host, platform=t.platform, placement=placement,
                             addresses=addresses, secrets=t.secrets, overrides=overrides,
                             registry=t.registry, fingerprint_key=self.fingerprint_key,
                             local_address=self.runtime.local_address)

    def _layout(self, kept: Optional[Mapping[str, Any]]) -> tuple:
        """A kept release runs where it ran when it was deployed; a new one where the target says."""
        if kept is not None:
            return kept["placement"], kept["addresses"]
        if self.target.placement is None:
            raise DeployError("no placement given for %s on %s" % (self.state.app, self.target.host))
        return self.target.placement, self.target.addresses or {}

    def _result(self, *, changed: bool, action: str, version: Optional[str], before: Optional[dict], plan: Plan,
                specs: Sequence[ComponentSpec], model_diff: Optional[dict] = None, **extra: Any) -> Dict[str, Any]:
        result = {
            "changed": changed, "action": action, "app": self.state.app, "version": version,
            "version_before": (before or {}).get("version"),
            "target": self.runtime.kind, "plan": plan.as_dict(),
            "components": {s.name: {"image": s.reference, "fingerprint": s.fingerprint} for s in specs},
            "messages": self.messages,
        }
        if model_diff is not None:
            result["model_diff"] = model_diff
        result.update(extra)
        return result

    # -- deploy (install, upgrade, re-run) -------------------------------------------------------------

    def deploy(self, *, version: str, model: dict, images: Mapping[str, Any],
               overrides: Optional[Mapping[str, Any]], snapshot: bool, auto_rollback: bool,
               modules: Optional[Mapping[str, bool]] = None, patch: Optional[Mapping[str, Any]] = None
               ) -> Dict[str, Any]:
        """Make this host run ``version``: an install, an upgrade, or a reconfigure of the running version.
        ``overrides`` None keeps the site's overrides of the last deploy (also across an uninstall);
        ``modules`` (module -> on) change the site's module choices of the last deploy, the others stay.
        ``patch``: a site release's patch record (a field fix made on site), named in the history entry."""
        self.patch = patch_note(patch)
        last = self.state.current or self.state.previous or {}
        if overrides is None:
            overrides = last.get("overrides") or {}
        choices = {**(last.get("modules") or {}), **(modules or {})}
        select_modules(model, choices, asked=modules or {})   # an unknown module or a broken selection: refused
        running = (self.state.current or {}).get("version")
        action = "install" if not running else "upgrade" if running != version else "reconfigure"
        return self._deploy(version=version, model=model, images=images, overrides=overrides, snapshot=snapshot,
                            auto_rollback=auto_rollback, action=action, modules=choices)

    def _deploy(self, *, version: str, model: dict, images: Mapping[str, Any], overrides: Mapping[str, Any],
                snapshot: bool, auto_rollback: bool, action: str, modules: Mapping[str, bool],
                kept: Optional[Mapping[str, Any]] = None) -> Dict[str, Any]:
        """One deploy of ``version`` as ``action``; ``kept`` is the state's record of it when rolling back."""
        before = self.state.current
        specs = self.specs(model, images, overrides, kept, modules)
        placement, addresses = self._layout(kept)
        plan = make_plan(specs, self.runtime.observe())
        if action != "rollback":
            check_ports(self.runtime, specs, plan, self.target.host)
        self.runtime.check(specs)
        model_diff = None
        if before and before["version"] != version and self.state.release(before["version"]):
            model_diff = diff_models(self.state.release(before["version"])["model"], model)
        state_changes = (not before or before["version"] != version or before["overrides"] != dict(overrides)
                         or (before.get("modules") or {}) != dict(modules))
        on = select_modules(model, modules)[1]
        if self.check_mode:
            return self._result(changed=plan.has_changes or state_changes, action=action, version=version,
                                before=before, plan=plan, specs=specs, model_diff=model_diff, modules=on)
        snapshot_sizes: Dict[str, int] = {}
        if snapshot and before and plan.has_changes:
            snapshot_sizes = self._snapshot(before["version"], specs)
            plan = make_plan(specs, self.runtime.observe())  # the snapshot stopped the stateful components
        at = utc_now()
        try:
            self.runtime.prepare([s for s in specs if s.name in set(plan.to_start)])
        except DeployError as exc:
            # Nothing was stopped or started yet: record the refusal, remove what the fetch unpacked.
            self._prune()
            self.state.add_history({"at": at, "by": self.actor, "action": action, "result": "failed",
                                    "from": (before or {}).get("version"), "to": version, "plan": plan.as_dict(),
                                    "error": str(exc), **self.patch})
            self.state.save()
            where = "%s %s on %s" % (self.state.app, version, self.target.host)
            exc.args = ("%s: %s; nothing was changed" % (where, exc.args[0]),)
            raise
        try:
            health = apply_plan(self.runtime, specs, plan, health_cap=self.health_cap, log=self.log)
        except DeployError as exc:
            self._recover(exc, version=version, before=before, auto_rollback=auto_rollback, at=at, action=action,
                          plan=plan)
            raise
        self.state.record(version=version, model=model, images=images, overrides=overrides, modules=modules,
                          placement=placement, addresses=addresses,
                          fingerprints={s.name: s.fingerprint for s in specs}, target=self.runtime.kind,
                          by=self.actor, at=at)
        if plan.has_changes or state_changes:
            self.state.add_history({"at": at, "by": self.actor, "action": action, "result": "ok",
                                    "from": (before or {}).get("version"), "to": version,
                                    "plan": plan.as_dict(), "snapshot": snapshot_sizes or None, **self.patch})
        saved = self.state.save()
        pruned = self._prune()
        return self._result(changed=plan.has_changes or saved or bool(pruned), action=action, version=version,
                            before=before, plan=plan, specs=specs, model_diff=model_diff, health=health,
                            snapshot=snapshot_sizes or None, modules=on)

    def _prune(self) -> List[str]:
        """What the host keeps for releases the state no longer keeps goes (unpacked images, layers). A
        failure is reported, not raised: the deploy itself succeeded."""
        try:
            pruned = self.runtime.prune(self.state.kept_images())
        except DeployError as exc:
            self.log("could not remove what no kept release uses: %s" % exc)
            return []
        if pruned:
            self.log("removed what no kept release uses: %s" % ", ".join(pruned))
        return pruned

    def _snapshot(self, version: str, specs: Sequence[ComponentSpec]) -> Dict[str, int]:
        """Snapshot the volumes of the components about to change, while they are stopped."""
        stateful = [s for s in specs if s.volumes]
        dirs: Dict[str, str] = {}
        for spec in stateful:
            dirs.update(self.runtime.volume_dirs(spec))
        if not dirs:
            return {}
        self.log("snapshot of %s before the upgrade (their components stop meanwhile)" % ", ".join(sorted(dirs)))
        self.runtime.remove([s.name for s in stateful], all_specs=[s for s in specs if not s.volumes])
        return take_snapshot(self.state.state_dir, self.state.app, version, dirs)

    def _recover(self, exc: DeployError, *, version: str, before: Optional[dict], auto_rollback: bool, at: str,
                 action: str, plan: Plan) -> None:
        """After a failed deploy: back to the release that ran before (or nothing), and write it down."""
        event: Dict[str, Any] = {"at": at, "by": self.actor, "action": action, "result": "failed",
                                 "from": (before or {}).get("version"), "to": version, "plan": plan.as_dict(),
                                 "error": str(exc), **self.patch}
        if isinstance(exc, HealthGateError):
            event["component"] = exc.component
        if auto_rollback:
            try:
                if before:
                    kept = self.state.release(before["version"])
                    specs = self.specs(kept["model"], kept["images"], before["overrides"], kept,
                                       before.get("modules"))
                    apply_plan(self.runtime, specs, make_plan(specs, self.runtime.observe()),
                               health_cap=self.health_cap, log=self.log)
                    event["rolled_back_to"] = before["version"]
                    self._prune()   # what the failed release unpacked goes: the host is as it was
                else:
                    removed = self.runtime.uninstall(keep_data=True)
                    event["rolled_back_to"] = None
                    event["removed"] = removed
            except DeployError as again:
                event["rollback_error"] = str(again)
        self.state.add_history(event)
        self.state.save()
        tail = ""
        if "rollback_error" in event:
            tail = "; the automatic rollback failed too: %s" % event["rollback_error"]
        elif auto_rollback and before:
            tail = "; rolled back to %s, which is healthy" % before["version"]
        elif auto_rollback:
            tail = "; the failed first install was removed (data kept)"
        exc.args = ("%s %s on %s: %s%s" % (self.state.app, version, self.target.host, exc.args[0], tail),)

    # -- rollback ----------------------------------------------------------------------------------------

    def rollback(self, *, version: Optional[str], restore: bool) -> Dict[str, Any]:
        current = self.state.current
        if not current:
            raise DeployError("%s is not installed on %s: nothing to roll back" % (self.state.app, self.target.host))
        goal = version or (self.state.previous or {}).get("version")
        if not goal:
            raise DeployError("%s %s on %s has no previous release to roll back to" %
                              (self.state.app, current["version"], self.target.host))
        kept = self.state.release(goal)
        if not kept:
            raise DeployError("%s %s was never installed on %s (kept releases: %s); install it instead" %
                              (self.state.app, goal, self.target.host, ", ".join(self.state.kept_versions())))
        modules = current.get("modules") or {}
        if goal == current["version"] and not restore:
            specs = self.specs(kept["model"], kept["images"], current["overrides"], kept, modules)
            plan = make_plan(specs, self.runtime.observe())
            if not plan.has_changes:
                return self._result(changed=False, action="rollback", version=goal, before=current, plan=plan,
                                    specs=specs)
        overrides = current["overrides"]
        if restore and not self.check_mode:
            self._restore(goal, kept, overrides, modules)
        return self._deploy(version=goal, model=kept["model"], images=kept["images"], overrides=overrides,
                            snapshot=False, auto_rollback=True, action="rollback", kept=kept, modules=modules)

    def _restore(self, version: str, kept: dict, overrides: Mapping[str, Any], modules: Mapping[str, bool]) -> None:
        specs = self.specs(kept["model"], kept["images"], overrides, kept, modules)
        stateful = [s for s in specs if s.volumes]
        dirs: Dict[str, str] = {}
        for spec in stateful:
            dirs.update(self.runtime.volume_dirs(spec))
        check_snapshot(self.state.state_dir, self.state.app, version, dirs)  # before anything stops
        self.runtime.remove([s.name for s in stateful], all_specs=[s for s in specs if not s.volumes])
        restore_snapshot(self.state.state_dir, self.state.app, version, dirs)
        self.log("restored the data snapshot of %s: %s" % (version, ", ".join(sorted(dirs))))


def patch_note(patch: Optional[Mapping[str, Any]]) -> Dict[str, Any]:
    """``{"patch": {component, base, files, removed, by, at, note}}`` of a site release's patch record, for a history
    entry (what the site changed, by whom and when); {} for a vendor release."""
    if not patch:
        return {}
    files = [{k: f.get(k) for k in ("path", "sha256")} for f in patch.get("files") or [] if isinstance(f, Mapping)]
    return {"patch": {"component": patch.get("component"), "base": (patch.get("base") or {}).get("version"),
                      "files": files, "removed": list(patch.get("removed") or []), "by": patch.get("by"),
                      "at": patch.get("at"), "note": patch.get("note")}}


# -- status ---------------------------------------------------------------------------------------------


def overridden(overrides: Optional[Mapping[str, Any]]) -> Dict[str, List[str]]:
    """Component -> the names of the env variables the site overrides: never their values, which may be
    credentials and stay in the host's 0600 state."""
    return {str(comp): sorted(str(k) for k in (env or {})) for comp, env in sorted((overrides or {}).items())}


def host_status(runtime: Runtime, state: AppState, *, history: int = 10) -> Dict[str, Any]:
    """What this host runs of the app and how each component is doing now (one probe each, no waiting).
    A status goes into reports that leave the site: it names the overridden variables, never their values."""
    current = state.current
    result: Dict[str, Any] = {
        "app": state.app, "target": state.data["target"], "installed": bool(current),
        "version": (current or {}).get("version"), "installed_at": (current or {}).get("installed_at"),
        "by": (current or {}).get("by"), "previous_version": (state.previous or {}).get("version"),
        "overridden": overridden((current or {}).get("overrides")), "kept_releases": state.kept_versions(),
        "modules": {},
        "history": state.data["history"][-history:], "components": {}, "healthy": bool(current),
    }
    if not current:
        return result
    model = state.release(current["version"])["model"]
    result["modules"] = select_modules(model, current.get("modules") or {})[1]
    observed = runtime.observe()
    for name, fp in sorted(current["fingerprints"].items()):
        seen = observed.get(name)
        item: Dict[str, Any] = {"running": bool(seen and seen.running), "started_at": seen.started_at if seen else None,
                                "as_deployed": bool(seen and seen.fingerprint == fp)}
        spec = probe_spec(model, name)
        if spec.is_job:   # a job that succeeded is done, not running
            item.update(running=False, job=True, completed=bool(seen and seen.running))
        if not seen:
            item.update(healthy=False, reason="not present on this host")
        elif not seen.running:
            what = "its last run did not succeed" if spec.is_job else "not running"
            item.update(healthy=False, reason="%s (%s)" % (what, seen.detail))
        else:
            ok, reason = runtime.ready(spec)
            item.update(healthy=ok, reason=reason)
        result["components"][name] = item
        result["healthy"] = result["healthy"] and item["healthy"]
    return result


def uninstall(runtime: Runtime, state: AppState, *, keep_data: bool, actor: str, check_mode: bool) -> Dict[str, Any]:
    """Stop and remove every component of the app on this host; data stays unless ``keep_data`` is False."""
    present = sorted(runtime.observe())
    installed = bool(state.current)
    if check_mode or not (present or installed):
        return {"changed": bool(present or installed), "removed": present, "data_removed": False}
    removed = runtime.uninstall(keep_data=keep_data)
    state.add_history({"at": utc_now(), "by": actor, "action": "uninstall", "result": "ok",
                       "from": (state.current or {}).get("version"), "to": None, "removed": removed,
                       "data_removed": not keep_data})
    state.forget()
    state.save()
    return {"changed": True, "removed": removed, "data_removed": not keep_data}
