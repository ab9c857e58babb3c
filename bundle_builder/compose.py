"""Convert a docker-compose file into the application model (``bundle-builder from-compose``).

Everything that is not converted, or converted on an assumption, becomes a report line
(``services.<name>.<key>: what happened and what to do``); nothing is dropped silently. The returned model
is validated with ``app_model.load_model`` before it is handed back.
"""

from __future__ import annotations

import pathlib
import re
import shlex
from typing import Any, Dict, List, Mapping, Optional, Tuple

from offline_delivery_core.app import model as app_model
from offline_delivery_core.common import names

MAX_CONFIG_FILE_BYTES = 1024 * 1024
# Docker's healthcheck defaults, made explicit so the converted component behaves as it did under compose.
DOCKER_HEALTH_DEFAULTS = {"interval": 30, "timeout": 30, "retries": 3, "start_period": 0}
_GO_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(ns|us|µs|ms|s|m|h)")
_GO_UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1, "m": 60, "h": 3600}
_COMPOSE_MEMORY = re.compile(r"^(\d+)\s*(b|k|kb|m|mb|g|gb|t|tb)?\Z", re.IGNORECASE)
_COMPOSE_MEMORY_UNITS = {"": "", "b": "", "k": "Ki", "kb": "Ki", "m": "Mi", "mb": "Mi", "g": "Gi", "gb": "Gi",
                         "t": "Ti", "tb": "Ti"}
_HOST_KEY = re.compile(r"HOST|ADDR|SERVER|URL|URI|DSN|ENDPOINT", re.IGNORECASE)
_VAR = re.compile(r"\$(?:\$|\{([^}]*)\}|([A-Za-z_][A-Za-z0-9_]*))")
_VAR_BODY = re.compile(r"^([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?+])(.*))?\Z", re.DOTALL)

# Service keys the converter reads; anything else is reported with a hint when one helps.
_HANDLED_KEYS = {
    "image", "build", "command", "entrypoint", "environment", "env_file", "ports", "expose", "volumes",
    "depends_on", "healthcheck", "deploy", "configs", "secrets", "user", "links", "scale", "cpus", "mem_limit",
    "cap_add", "restart", "profiles",
}
# compose's depends_on condition for a one-shot container its dependents wait for; the model's job kind.
COMPLETED = "service_completed_successfully"
# restart policies of a container meant to run once (compose's default is "no")
_ONE_SHOT_RESTARTS = ("no", "on-failure")
# what a job cannot have (docs/app-model.md): the converter drops these from a job, noting each
_JOB_DROPS = {
    "ports": "a job listens on nothing",
    "health": "a job is done when it exits 0; no probe runs",
    "replicas": "a job runs once",
    "exports": "a job is not reachable",
}
_HINTS = {
    "restart": "the product restarts failed components itself (systemd Restart=on-failure, compose "
               "restart: unless-stopped, k8s restartPolicy)",
    "networks": "each application gets one network; components reach each other through exports "
                "(${host}), not compose network aliases",
    "container_name": "names are derived from the application and component names",
    "hostname": "components reach each other through exports (${host})",
    "working_dir": "set WORKDIR in the image instead",
    "labels": "the model has no labels",
    "logging": "logs go to the target's log system (docker logs, journald, kubectl logs)",
    "privileged": "refused on purpose: components run unprivileged",
    "network_mode": "each application gets one network",
    "platform": "platforms are chosen when the bundle is built (--platform)",
    "extends": "resolve extends first (docker compose config) and convert the result",
}


class ComposeError(ValueError):
    """The compose file cannot be converted at all (not a mapping, no services, or an invalid result)."""


def from_compose(compose: dict, *, name: str, version: str, base_dir: pathlib.Path) -> Tuple[dict, List[str]]:
    """The model for a parsed compose file, and report lines for all that was not converted as-is.

    ``base_dir`` is the compose file's directory: env_file, bind-mounted files, configs and ``.env`` are
    read relative to it. Raises ComposeError when nothing sensible can be produced.
    """
    converter = _Converter(pathlib.Path(base_dir), name=name, version=version)
    model = converter.convert(compose)
    try:
        app_model.load_model(model, source="converted model")
    except app_model.ModelError as exc:
        raise ComposeError("the converted model is not valid; fix the compose file or edit the output:\n%s"
                           % exc) from exc
    return model, converter.report


class _Converter:
    def __init__(self, base_dir: pathlib.Path, *, name: str, version: str) -> None:
        self.base_dir = base_dir
        self.name = name
        self.version = version
        self.report: List[str] = []
        self.names: Dict[str, str] = {}           # compose service name -> component name
        self.volume_owner: Dict[str, str] = {}    # model volume name -> component
        self.top: Dict[str, Any] = {}
        self.secret_names: Dict[str, str] = {}    # compose secret name -> model secret name
        self.dotenv: Dict[str, str] = {}
        self.used_vars: List[str] = []
        self.missing_vars: List[str] = []
        # (dependent component, dependency component) -> the compose condition as written
        self.dep_conditions: Dict[Tuple[str, str], str] = {}

    def note(self, path: str, message: str) -> None:
        self.report.append("%s: %s" % (path, message))

    # ------------------------------------------------------------------------------------ document

    def convert(self, compose: object) -> dict:
        if not isinstance(compose, dict):
            raise ComposeError("a compose file is a mapping with a 'services' key, got %s" % type(compose).__name__)
        compose = self.interpolate_document(compose)
        services = compose.get("services")
        if not isinstance(services, dict) or not services:
            raise ComposeError("the compose file has no services (expected a mapping under 'services')")
        self.top = compose
        self.top_level_notes(compose)
        secrets = self.convert_secrets(compose.get("secrets"))
        self.names = self.component_names(services)
        components: Dict[str, dict] = {}
        for service, spec in services.items():
            if service not in self.names:
                continue
            component = self.convert_service(str(service), spec)
            if component is not None:
                components[self.names[service]] = component
        self.resolve_jobs(services, components)
        self.export_host_references(components)
        self.note_host_name_references(components)
        modules = self.convert_profiles(services, components)
        model: Dict[str, Any] = {
            "apiVersion": app_model.API_VERSION,
            "kind": app_model.KIND,
            "name": self.name,
            "version": self.version,
            "description": "Converted from a docker-compose file by bundle-builder from-compose",
        }
        if secrets:
            model["secrets"] = secrets
        if modules:
            model["modules"] = modules
        model["components"] = components
        return model

    def convert_profiles(self, services: Mapping, components: Mapping[str, dict]) -> Dict[str, dict]:
        """compose profiles -> optional modules, off unless the site turns them on (as a profile is inactive
        unless named). A component belongs to one module: a service in several profiles joins the first."""
        modules: Dict[str, dict] = {}
        for service, spec in services.items():
            component = self.names.get(service)
            profiles = spec.get("profiles") if isinstance(spec, dict) else None
            if component not in components or profiles is None:
                continue
            path = "services.%s.profiles" % service
            if not isinstance(profiles, list) or not profiles or not all(isinstance(p, str) for p in profiles):
                self.note(path, "expected a list of profile names; not converted (the component always runs)")
                continue
            module = _sanitize_name(profiles[0])
            if not module:
                self.note(path, "profile %r cannot be turned into a module name; not converted (the component "
                          "always runs)" % profiles[0])
                continue
            modules.setdefault(module, {"components": [], "default": False,
                                        "description": "compose profile %s" % profiles[0]})
            modules[module]["components"].append(component)
            if len(profiles) > 1:
                self.note(path, "in module %s only (a component belongs to one module): profiles %s not converted"
                          % (module, ", ".join(profiles[1:])))
        for module, spec in sorted(modules.items()):
            self.note("profiles", "module %s (off unless the site turns it on: app_modules: {%s: true}): %s"
                      % (module, module, ", ".join(spec["components"])))
        return modules

    def top_level_notes(self, compose: Mapping) -> None:
        for key, value in compose.items():
            key = str(key)
            if key in ("services", "secrets", "configs", "volumes"):
                continue
            if key.startswith("x-"):
                self.note(key, "extension ignored")
            elif key == "name":
                if value != self.name:
                    self.note("name", "compose project name %r not used; the application is named %r (--name)"
                              % (value, self.name))
            elif key == "version":
                self.note("version", "compose file format version %r ignored (obsolete); the application version is "
                          "%s (--version)" % (value, self.version))
            else:
                self.note(key, "top-level %r not converted (unsupported by the model)%s"
                          % (key, self.hint(key)))
        for vol_name, spec in (compose.get("volumes") or {}).items():
            if isinstance(spec, dict):
                extra = sorted(k for k in spec if k != "name")
                if extra:
                    self.note("volumes.%s" % vol_name, "%s not converted: model volumes are plain persistent "
                              "directories/volumes on each target" % ", ".join(extra))

    @staticmethod
    def hint(key: str) -> str:
        return " — " + _HINTS[key] if key in _HINTS else ""

    # ------------------------------------------------------------------------------------ interpolation

    def interpolate_document(self, compose: dict) -> dict:
        """Apply compose's own ${VAR} substitution with values from .env only (reproducible: never the shell)."""
        dotenv_path = self.base_dir / ".env"
        if dotenv_path.is_file():
            self.dotenv = self.parse_env_file(dotenv_path, ".env")
        result = self.substitute(compose)
        if self.used_vars:
            self.note(".env", "substituted from .env: %s" % ", ".join(sorted(set(self.used_vars))))
        if self.missing_vars:
            self.note("interpolation", "variables not set in .env, replaced by their default or an empty string: %s "
                      "(the shell environment is not read, so the conversion is reproducible)"
                      % ", ".join(sorted(set(self.missing_vars))))
        return result

    def substitute(self, value: Any) -> Any:
        if isinstance(value, dict):
            return {k: self.substitute(v) for k, v in value.items()}
        if isinstance(value, list):
            return [self.substitute(v) for v in value]
        if isinstance(value, str) and "$" in value:
            return _VAR.sub(self.replace_var, value)
        return value

    def replace_var(self, match: "re.Match[str]") -> str:
        if match.group(0) == "$$":
            return "$"
        body = match.group(1) if match.group(1) is not None else match.group(2)
        parsed = _VAR_BODY.match(body)
        if not parsed:
            self.note("interpolation", "invalid substitution %r left as is" % match.group(0))
            return match.group(0)
        var, op, arg = parsed.groups()
        value = self.dotenv.get(var)
        if value is not None:
            self.used_vars.append(var)
        if op in (":-", "-"):
            if value is None or (op == ":-" and value == ""):
                if value is None:
                    self.missing_vars.append(var)
                return arg
            return value
        if op in (":+", "+"):
            return arg if (value if op == ":+" else value is not None) else ""
        if value is None:
            self.missing_vars.append(var)
            return ""
        return value

    # ------------------------------------------------------------------------------------ names

    def component_names(self, services: Mapping) -> Dict[str, str]:
        names: Dict[str, str] = {}
        taken: Dict[str, str] = {}
        for service in services:
            wanted = _sanitize_name(str(service))
            if not wanted:
                self.note("services.%s" % service, "service name cannot be turned into a component name; skipped")
                continue
            if wanted in taken:
                self.note("services.%s" % service, "component name %r is already taken by service %r; skipped"
                          % (wanted, taken[wanted]))
                continue
            if wanted != service:
                self.note("services.%s" % service, "renamed to component %r (lowercase letters, digits, '-')" % wanted)
            names[service] = wanted
            taken[wanted] = str(service)
        return names

    # ------------------------------------------------------------------------------------ services

    def convert_service(self, service: str, spec: object) -> Optional[dict]:
        path = "services.%s" % service
        if not isinstance(spec, dict):
            self.note(path, "expected a mapping, got %s; skipped" % type(spec).__name__)
            return None
        component: Dict[str, Any] = {"image": self.convert_image(service, spec, path)}
        for key in ("entrypoint", "command"):
            if spec.get(key) is not None:
                argv = self.convert_argv(spec[key], "%s.%s" % (path, key))
                if argv is not None:
                    component[key] = argv
        if spec.get("user") is not None:
            component["user"] = str(spec["user"])
        if spec.get("cap_add"):
            # beyond the contained default every target applies (docs/app-model.md, security); the model
            # validates the names
            caps = spec["cap_add"] if isinstance(spec["cap_add"], list) else [spec["cap_add"]]
            component["security"] = {"capabilities": [str(c) for c in caps]}
            self.note("%s.cap_add" % path, "kept as security.capabilities: %s (every other capability is dropped "
                      "on every target)" % ", ".join(str(c) for c in caps))
        ports = self.convert_ports(spec, path)
        if ports:
            component["ports"] = ports
        env = self.convert_environment(spec, path)
        if env:
            component["env"] = env
        config_files, volumes = self.convert_volumes(service, spec.get("volumes"), path)
        config_files += self.convert_configs(spec.get("configs"), path)
        config_files += self.convert_service_secrets(spec.get("secrets"), path)
        if config_files:
            component["config_files"] = config_files
        if volumes:
            component["volumes"] = volumes
        health = self.convert_healthcheck(spec.get("healthcheck"), path)
        if health:
            component["health"] = health
        self.convert_deploy(spec, path, component)
        depends_on = self.convert_depends_on(service, spec, path)
        if depends_on:
            component["depends_on"] = depends_on
        for key in spec:
            key = str(key)
            if key in _HANDLED_KEYS:
                continue
            if key.startswith("x-"):
                self.note("%s.%s" % (path, key), "extension ignored")
            else:
                self.note("%s.%s" % (path, key), "not converted (unsupported by the model)%s" % self.hint(key))
        return component

    def convert_image(self, service: str, spec: Mapping, path: str) -> str:
        image = spec.get("image")
        component = self.names[service]
        if image is None:
            assumed = "%s/%s:%s" % (self.name, component, self.version.replace("+", "_"))
            if "build" in spec:
                self.note(path + ".build", "the service has only build:, and a bundle needs an image; assumed image "
                          "%s — build it with `docker build -t %s <context>` (or set image:) before "
                          "bundle-builder build" % (assumed, assumed))
            else:
                self.note(path, "no image: and no build:; assumed image %s — set the right image in the model"
                          % assumed)
            return assumed
        image = str(image)
        if "build" in spec:
            self.note(path + ".build", "ignored; the bundle carries image %s as it is when the bundle is built" % image)
        last = image.split("@", 1)[0].rsplit("/", 1)[-1]
        if "@" not in image and ":" not in last:
            self.note(path + ".image", "%r has no tag; assumed %s:latest — pin a version for a reproducible bundle"
                      % (image, image))
            image += ":latest"
        return image

    def convert_argv(self, value: object, path: str) -> Optional[List[str]]:
        if isinstance(value, str):
            try:
                return shlex.split(value)
            except ValueError as exc:
                self.note(path, "cannot split %r like a shell would (%s); not converted" % (value, exc))
                return None
        if isinstance(value, list):
            return [str(v) for v in value]
        self.note(path, "expected a string or a list, got %s; not converted" % type(value).__name__)
        return None

    # ------------------------------------------------------------------------------------ environment

    def convert_environment(self, spec: Mapping, path: str) -> Dict[str, str]:
        env: Dict[str, str] = {}
        files = spec.get("env_file")
        if files is not None:
            for index, item in enumerate(files if isinstance(files, list) else [files]):
                env.update(self.read_env_file(item, "%s.env_file[%d]" % (path, index)))
        env.update(self.environment_entries(spec.get("environment"), path + ".environment"))
        return {key: _escape_refs(value) for key, value in env.items()}

    def environment_entries(self, value: object, path: str) -> Dict[str, str]:
        entries: Dict[str, Optional[object]] = {}
        if value is None:
            return {}
        if isinstance(value, dict):
            entries = dict(value)
        elif isinstance(value, list):
            for item in value:
                text = str(item)
                key, sep, val = text.partition("=")
                entries[key] = val if sep else None
        else:
            self.note(path, "expected a mapping or a list of KEY=VALUE, got %s; not converted" % type(value).__name__)
            return {}
        env: Dict[str, str] = {}
        for key, val in entries.items():
            key = str(key)
            if val is None:
                self.note("%s.%s" % (path, key), "no value (compose takes it from the shell at run time); not "
                          "converted — set a default in the model or a site override")
                continue
            text = _env_text(val)
            if self.env_entry_ok(key, text, "%s.%s" % (path, key)):
                env[key] = text
        return env

    def env_entry_ok(self, key: str, value: str, path: str) -> bool:
        if not app_model.ENV_KEY_RE.match(key):
            self.note(path, "invalid variable name %r; not converted" % key)
            return False
        if any(c in value for c in "\n\r\x00"):
            self.note(path, "value contains a newline or NUL, which the model refuses in env; not converted — "
                      "put it in a config file")
            return False
        return True

    def read_env_file(self, item: object, path: str) -> Dict[str, str]:
        required = True
        if isinstance(item, dict):
            required = bool(item.get("required", True))
            item = item.get("path")
        if not isinstance(item, str):
            self.note(path, "expected a file path; not converted")
            return {}
        file_path = self.base_dir / item
        if not file_path.is_file():
            self.note(path, "%s not found under %s; %s" % (item, self.base_dir, "not converted" if required
                                                           else "optional, skipped"))
            return {}
        env = self.parse_env_file(file_path, path)
        return {k: v for k, v in env.items() if self.env_entry_ok(k, v, "%s:%s" % (path, k))}

    def parse_env_file(self, file_path: pathlib.Path, path: str) -> Dict[str, str]:
        """KEY=VALUE lines; blank lines and # comments skipped; optional 'export '; quotes removed."""
        env: Dict[str, str] = {}
        for number, raw in enumerate(file_path.read_text(encoding="utf-8").splitlines(), start=1):
            line = raw.strip()
            if not line or line.startswith("#"):
                continue
            if line.startswith("export "):
                line = line[len("export "):].lstrip()
            key, sep, value = line.partition("=")
            key = key.strip()
            if not sep:
                self.note("%s:%d" % (path, number), "%r has no '=' (a variable taken from the shell); not converted"
                          % key)
                continue
            env[key] = _unquote_env_value(value.strip())
        return env

    # ------------------------------------------------------------------------------------ ports

    def convert_ports(self, spec: Mapping, path: str) -> List[dict]:
        ports: Dict[Tuple[int, str], dict] = {}
        for index, item in enumerate(spec.get("ports") or []):
            item_path = "%s.ports[%d]" % (path, index)
            port = self.parse_long_port(item, item_path) if isinstance(item, dict) else \
                self.parse_short_port(item, item_path)
            if port is not None:
                self.add_port(ports, port, item_path)
        for index, item in enumerate(spec.get("expose") or []):
            item_path = "%s.expose[%d]" % (path, index)
            target, _sep, protocol = str(item).partition("/")
            number = _port_int(target)
            if number is None:
                self.note(item_path, "%r is not a single port (ranges are not supported); not converted" % item)
                continue
            self.add_port(ports, {"port": number, "protocol": protocol or "tcp"}, item_path)
        return [_compact_port(p) for p in ports.values()]

    def add_port(self, ports: Dict[Tuple[int, str], dict], port: dict, path: str) -> None:
        key = (port["port"], port["protocol"])
        if key not in ports:
            ports[key] = port
        elif port.get("publish") and not ports[key].get("publish"):
            ports[key]["publish"] = port["publish"]
        elif port.get("publish") and port.get("publish") != ports[key].get("publish"):
            self.note(path, "container port %d/%s is already published on host port %s; a second host port is "
                      "not supported, not converted" % (key[0], key[1], ports[key]["publish"]))

    def parse_short_port(self, item: object, path: str) -> Optional[dict]:
        text = str(item)
        spec, _sep, protocol = text.partition("/")
        protocol = protocol or "tcp"
        parts = spec.rsplit(":", 2)
        host_ip = parts[0] if len(parts) == 3 else ""
        published = parts[-2] if len(parts) >= 2 else ""
        target = parts[-1]
        return self.make_port(target, published, host_ip, protocol, path, text)

    def parse_long_port(self, item: Mapping, path: str) -> Optional[dict]:
        extra = sorted(str(k) for k in item if k not in ("target", "published", "protocol", "host_ip", "mode", "name"))
        if extra:
            self.note(path, "%s not converted (unsupported by the model)" % ", ".join(extra))
        if item.get("mode") not in (None, "ingress", "host"):
            self.note(path + ".mode", "%r not converted" % item["mode"])
        port = self.make_port(str(item.get("target", "")), str(item.get("published") or ""),
                              str(item.get("host_ip") or ""), str(item.get("protocol") or "tcp"), path, item)
        name = item.get("name")
        if port is not None and name is not None:
            if app_model.PORT_NAME_RE.match(str(name)) and len(str(name)) <= app_model.PORT_NAME_MAX:
                port["name"] = str(name)
            else:
                self.note(path + ".name", "%r is not a valid port name (lowercase, at most 15 characters); a "
                          "name was derived from the port number" % name)
        return port

    def make_port(self, target: str, published: str, host_ip: str, protocol: str, path: str,
                  original: object) -> Optional[dict]:
        number = _port_int(target)
        if number is None:
            self.note(path, "%r: container port %r is not a single port (ranges are not supported); not converted"
                      % (original, target))
            return None
        if protocol not in app_model.PROTOCOLS:
            self.note(path, "%r: protocol %r is not supported (tcp, udp); not converted" % (original, protocol))
            return None
        port: Dict[str, Any] = {"port": number, "protocol": protocol}
        if host_ip:
            self.note(path, "%r: binding to host address %s is not supported; published on all addresses"
                      % (original, host_ip))
        if published:
            host_port = _port_int(published)
            if host_port is None:
                self.note(path, "%r: host port %r is not a single port (ranges are not supported); the container "
                          "port is declared but not published" % (original, published))
            else:
                port["publish"] = host_port
        else:
            self.note(path, "%r: compose publishes it on a random host port; converted as an unpublished port "
                      "(add publish: N to expose it on the host)" % (original,))
        return port

    # ------------------------------------------------------------------------------------ volumes

    def convert_volumes(self, service: str, items: object, path: str) -> Tuple[List[dict], List[dict]]:
        config_files: List[dict] = []
        volumes: List[dict] = []
        for index, item in enumerate(items or []):
            item_path = "%s.volumes[%d]" % (path, index)
            mount = _parse_volume(item)
            if mount is None:
                self.note(item_path, "cannot read volume entry %r; not converted" % (item,))
                continue
            kind, source, target, read_only, extra = mount
            if extra:
                self.note(item_path, "%s not converted (unsupported by the model)" % ", ".join(extra))
            if not target.startswith("/"):
                self.note(item_path, "target %r is not an absolute path; not converted" % target)
                continue
            if kind == "tmpfs":
                self.note(item_path, "tmpfs at %s not converted (unsupported by the model)" % target)
            elif kind == "bind":
                converted = self.convert_bind(service, source, target, item_path)
                (config_files if "content" in converted else volumes).append(converted)
            else:
                if read_only:
                    self.note(item_path, "read-only mount of volume at %s is mounted read-write (the model has no "
                              "read-only volumes)" % target)
                volumes.append(self.named_volume(service, source, target, item_path))
        return config_files, volumes

    def named_volume(self, service: str, source: str, target: str, path: str) -> dict:
        component = self.names[service]
        if not source:
            wanted = _sanitize_name("%s-%s" % (component, target.strip("/").replace("/", "-")))
            name = self.unique_volume(wanted, component)
            self.note(path, "anonymous volume at %s converted to persistent volume %r (kept across upgrades)"
                      % (target, name))
            return {"name": name, "path": target}
        wanted = _sanitize_name(source) or _sanitize_name(component + "-data")
        owner = self.volume_owner.get(wanted)
        name = self.unique_volume(wanted, component)
        if owner is not None:
            self.note(path, "volume %r is already used by component %s and a model volume belongs to one "
                      "component: converted to a separate volume %r (the data is NOT shared)" % (source, owner, name))
        elif name != source:
            self.note(path, "volume %r renamed to %r (lowercase letters, digits, '-')" % (source, name))
        top_volumes = self.top.get("volumes") or {}
        if source not in top_volumes:
            self.note(path, "named volume %r is not declared under top-level volumes:" % source)
        return {"name": name, "path": target}

    def unique_volume(self, wanted: str, component: str) -> str:
        name = wanted
        counter = 2
        while name in self.volume_owner:
            name = _sanitize_name("%s-%s" % (wanted, component)) if counter == 2 else \
                _sanitize_name("%s-%d" % (wanted, counter))
            counter += 1
        self.volume_owner[name] = component
        return name

    def convert_bind(self, service: str, source: str, target: str, path: str) -> dict:
        """A single text file under base_dir becomes a config file; anything else a volume (noted)."""
        host_path = (self.base_dir / source).resolve()
        base = self.base_dir.resolve()
        inside = not source.startswith("~") and (host_path == base or base in host_path.parents)
        if inside and host_path.is_file():
            config = self.file_as_config(host_path, target, path)
            if config is not None:
                self.note(path, "bind mount of file %s converted to a config file at %s (content read now, "
                          "carried in the model)" % (source, target))
                return config
        component = self.names[service]
        name = self.unique_volume(_sanitize_name("%s-%s" % (component, pathlib.PurePosixPath(target).name or "data")),
                                  component)
        where = "outside the compose directory" if not inside else (
            "a directory" if host_path.is_dir() else "missing" if not host_path.exists() else "not a text file")
        self.note(path, "bind mount of %s (%s) converted to an empty persistent volume %r at %s: the host "
                  "content is not carried — put it in the image or in config files" % (source, where, name, target))
        return {"name": name, "path": target}

    def file_as_config(self, host_path: pathlib.Path, target: str, path: str) -> Optional[dict]:
        size = host_path.stat().st_size
        if size > MAX_CONFIG_FILE_BYTES:
            self.note(path, "%s is %d bytes, more than a config file may carry (%d)"
                      % (host_path, size, MAX_CONFIG_FILE_BYTES))
            return None
        try:
            content = host_path.read_bytes().decode("utf-8")
        except UnicodeDecodeError:
            return None
        if "\x00" in content:
            return None
        mode = "0%o" % (host_path.stat().st_mode & 0o777)
        if "${" in content:
            self.note(path, "literal '${' in %s escaped as '$${' (the model interprets ${...})" % host_path.name)
        return {"path": target, "content": _escape_refs(content), "mode": mode if len(mode) == 4 else "0644"}

    # ------------------------------------------------------------------------------------ configs and secrets

    def convert_configs(self, items: object, path: str) -> List[dict]:
        files: List[dict] = []
        definitions = self.top.get("configs") or {}
        for index, item in enumerate(items or []):
            item_path = "%s.configs[%d]" % (path, index)
            source, target, mode, extra = _config_use(item)
            if extra:
                self.note(item_path, "%s not converted (unsupported by the model)" % ", ".join(extra))
            definition = definitions.get(source)
            if not isinstance(definition, dict):
                self.note(item_path, "config %r is not defined under top-level configs:; not converted" % source)
                continue
            content = self.config_content(source, definition, "configs.%s" % source)
            if content is None:
                continue
            files.append({"path": target or "/" + source, "content": _escape_refs(content),
                          "mode": mode or "0444"})
        return files

    def config_content(self, source: str, definition: Mapping, path: str) -> Optional[str]:
        if definition.get("external"):
            self.note(path, "external config is not known when converting; not converted — add its content as a "
                      "config file in the model")
            return None
        if "content" in definition:
            return str(definition["content"])
        if "file" in definition:
            file_path = (self.base_dir / str(definition["file"])).resolve()
            if not file_path.is_file():
                self.note(path, "file %s not found; not converted" % definition["file"])
                return None
            try:
                return file_path.read_text(encoding="utf-8")
            except UnicodeDecodeError:
                self.note(path, "file %s is not UTF-8 text; not converted" % definition["file"])
                return None
        self.note(path, "only file: and content: configs are converted (got %s)" % ", ".join(map(str, definition)))
        return None

    def convert_secrets(self, definitions: object) -> Dict[str, dict]:
        secrets: Dict[str, dict] = {}
        for source, definition in (definitions or {}).items():
            name = _sanitize_secret(str(source))
            self.secret_names[str(source)] = name
            secrets[name] = {"length": 32, "charset": "alphanumeric"}
            origin = ", ".join(sorted(map(str, definition))) if isinstance(definition, dict) else "no definition"
            self.note("secrets.%s" % source, "converted to secret %r generated on site (32 alphanumeric "
                      "characters); the compose value (%s) is not carried" % (name, origin))
        return secrets

    def convert_service_secrets(self, items: object, path: str) -> List[dict]:
        files: List[dict] = []
        for index, item in enumerate(items or []):
            item_path = "%s.secrets[%d]" % (path, index)
            source, target, mode, extra = _config_use(item)
            if extra:
                self.note(item_path, "%s not converted (unsupported by the model)" % ", ".join(extra))
            if source not in self.secret_names:
                self.note(item_path, "secret %r is not defined under top-level secrets:; not converted" % source)
                continue
            target = target if target and target.startswith("/") else "/run/secrets/" + (target or source)
            files.append({"path": target, "content": "${secrets.%s}" % self.secret_names[source],
                          "mode": mode or "0400"})
            self.note(item_path, "mounted as config file %s holding ${secrets.%s}" % (target, self.secret_names[source]))
        return files

    # ------------------------------------------------------------------------------------ health, deploy, deps

    def convert_healthcheck(self, value: object, path: str) -> Optional[dict]:
        if value is None:
            return None
        path += ".healthcheck"
        if not isinstance(value, dict):
            self.note(path, "expected a mapping; not converted")
            return None
        test = value.get("test")
        if value.get("disable") or test == ["NONE"] or test == "NONE":
            self.note(path, "healthcheck disabled in compose; the component has no health check")
            return None
        if test is None:
            self.note(path, "no test: compose runs the image's own HEALTHCHECK, which the model cannot see; not "
                      "converted — write the probe in the model")
            return None
        argv = _health_argv(test)
        if argv is None:
            self.note(path + ".test", "cannot read test %r (expected CMD, CMD-SHELL, NONE or a string); not "
                      "converted" % (test,))
            return None
        health: Dict[str, Any] = {"exec": argv}
        for key, default in DOCKER_HEALTH_DEFAULTS.items():
            raw = value.get(key)
            if raw is None:
                health[key] = default
            elif key == "retries":
                retries = _positive_int(raw)
                if retries is None:
                    self.note("%s.%s" % (path, key), "%r is not a positive integer; used %d" % (raw, default))
                health[key] = retries or default
            else:
                health[key] = self.duration(raw, "%s.%s" % (path, key), minimum=0 if key == "start_period" else 1)
        if health["timeout"] > health["interval"]:
            self.note(path + ".timeout", "timeout %ds is longer than interval %ds; shortened to %ds"
                      % (health["timeout"], health["interval"], health["interval"]))
            health["timeout"] = health["interval"]
        for key in value:
            if key not in ("test", "interval", "timeout", "retries", "start_period", "disable"):
                self.note("%s.%s" % (path, key), "not converted (unsupported by the model)")
        return health

    def duration(self, raw: object, path: str, minimum: int) -> int:
        seconds = _go_duration(raw)
        if seconds is None:
            self.note(path, "cannot read duration %r; used %ds" % (raw, max(minimum, 1)))
            return max(minimum, 1)
        whole = max(minimum, int(-(-seconds // 1)))
        if whole != seconds:
            self.note(path, "%r rounded to %ds (the model counts whole seconds)" % (raw, whole))
        return whole

    def convert_deploy(self, spec: Mapping, path: str, component: dict) -> None:
        deploy = spec.get("deploy") or {}
        replicas = deploy.get("replicas", spec.get("scale"))
        if replicas is not None:
            if _positive_int(replicas) is not None:
                component["replicas"] = _positive_int(replicas)
            else:
                self.note(path + ".deploy.replicas", "%r replicas not converted (the model needs at least 1)" % replicas)
        for key in deploy:
            if key not in ("replicas", "resources"):
                self.note("%s.deploy.%s" % (path, key), "not converted (unsupported by the model)")
        resources_spec = deploy.get("resources") or {}
        for key in resources_spec:
            if key != "limits":
                self.note("%s.deploy.resources.%s" % (path, key), "not converted (the model has limits only)")
        limits = dict(resources_spec.get("limits") or {})
        if spec.get("cpus") is not None:
            limits.setdefault("cpus", spec["cpus"])
        if spec.get("mem_limit") is not None:
            limits.setdefault("memory", spec["mem_limit"])
        resources: Dict[str, str] = {}
        for key, raw in limits.items():
            key_path = "%s.deploy.resources.limits.%s" % (path, key)
            if key == "cpus":
                cpus = str(raw)
                if app_model.CPUS_RE.match(cpus) and float(cpus) > 0:
                    resources["cpus"] = cpus
                else:
                    self.note(key_path, "%r is not a positive CPU count; not converted" % raw)
            elif key == "memory":
                memory = _compose_memory(raw)
                if memory is None:
                    self.note(key_path, "%r is not a memory size; not converted" % raw)
                else:
                    resources["memory"] = memory
                    if memory != str(raw):
                        self.note(key_path, "%r converted to %s (compose sizes are binary units)" % (raw, memory))
            else:
                self.note(key_path, "not converted (the model limits cpus and memory only)")
        if resources:
            component["resources"] = resources

    def convert_depends_on(self, service: str, spec: Mapping, path: str) -> Dict[str, dict]:
        result: Dict[str, dict] = {}
        value = spec.get("depends_on") or {}
        entries = {str(v): {} for v in value} if isinstance(value, list) else dict(value)
        for target, options in entries.items():
            dep_path = "%s.depends_on.%s" % (path, target)
            options = options or {}
            if target not in self.names:
                self.note(dep_path, "no service %r in the file; dependency not converted" % target)
                continue
            condition = options.get("condition", "service_started")
            self.dep_conditions[(self.names[service], self.names[target])] = str(condition)
            if condition == "service_healthy":
                result[self.names[target]] = {"condition": "healthy"}
            elif condition == COMPLETED:
                # completed if the dependency becomes a job; resolve_jobs decides once every service is read
                result[self.names[target]] = {"condition": "completed"}
            else:
                if condition != "service_started":
                    self.note(dep_path, "condition %s converted to started (the model waits for started, "
                              "healthy or completed only)" % condition)
                result[self.names[target]] = {"condition": "started"}
            for key in options:
                if key != "condition":
                    self.note("%s.%s" % (dep_path, key), "not converted (unsupported by the model)")
        for index, link in enumerate(spec.get("links") or []):
            target = str(link).split(":", 1)[0]
            link_path = "%s.links[%d]" % (path, index)
            if target in self.names:
                result.setdefault(self.names[target], {"condition": "started"})
                self.note(link_path, "link to %s converted to depends_on (started); aliases are not supported, use "
                          "exports for connection info" % target)
            else:
                self.note(link_path, "no service %r in the file; not converted" % target)
        return {name: result[name] for name in sorted(result)}

    # ------------------------------------------------------------------------------------ jobs

    def resolve_jobs(self, services: Mapping, components: Dict[str, dict]) -> None:
        """One-shot services become jobs (``kind: job``) when dependents wait for them to complete.

        compose says "run once" with ``restart: "no"`` (its default) or ``on-failure``, and "wait until it
        exited 0" with ``condition: service_completed_successfully``. A service waited for that way becomes a
        job and every dependency on it waits for completion; what a job cannot have (ports, health check,
        replicas) is dropped with a note. A service with volumes cannot be a job: its dependents then wait
        for it to start, and the report says so. ``restart: always`` or ``unless-stopped`` on a service its
        dependents wait for is a contradiction compose itself would hang on: it becomes a job, noted.
        """
        waited: Dict[str, List[str]] = {}
        for (dependent, dependency), condition in sorted(self.dep_conditions.items()):
            if condition == COMPLETED:
                waited.setdefault(dependency, []).append(dependent)
        for component, spec in ((c, services[s]) for s, c in self.names.items() if c in components):
            path = "services.%s" % _service_of(self.names, component)
            comp = components[component]
            restart = spec.get("restart")
            one_shot = restart is None or str(restart).split(":", 1)[0] in _ONE_SHOT_RESTARTS
            if component not in waited:
                if restart is not None:
                    hint = (" — if it runs to completion, its dependents can wait for it with condition: %s and it "
                            "becomes a job (kind: job)" % COMPLETED) if one_shot else self.hint("restart")
                    self.note(path + ".restart", "not converted (unsupported by the model)%s" % hint)
                continue
            names = waited[component]
            dependents = (", ".join(names[:-1]) + " and " + names[-1] + " wait") if len(names) > 1 else \
                names[0] + " waits"
            if comp.get("volumes"):
                self.note(path, "%s for it to complete (%s), but it keeps volumes, which a job cannot have: "
                          "kept as a service, and they wait for it to start — move the data to a service, or "
                          "drop the volumes and make it kind: job" % (dependents, COMPLETED))
                for dependent in waited[component]:
                    components[dependent]["depends_on"][component] = {"condition": "started"}
                    self.note("services.%s.depends_on.%s" % (_service_of(self.names, dependent), component),
                              "%s converted to started: %s stays a service (it has volumes)" % (COMPLETED, component))
                continue
            # kind first, as an author would write it
            components[component] = comp = {"kind": "job", **comp}
            if restart is None:
                why = "no restart: (compose's default, \"no\")"
            elif one_shot:
                why = "restart: %s" % restart
            else:
                why = "restart: %s, which disagrees: a job runs once to completion" % restart
            self.note(path, "converted to a job (kind: job): %s for it to complete (%s) and it has %s; it "
                      "runs again only when it changes or its last run failed, and a failed run fails the deploy"
                      % (dependents, COMPLETED, why))
            if restart is not None and not one_shot:
                self.note(path + ".restart", "%r disagrees with dependents waiting for completion: converted to a "
                          "job anyway (under compose they would wait for its first exit); if it is a long-running "
                          "service, make them wait with service_started or service_healthy instead" % restart)
            elif str(restart).startswith("on-failure"):
                self.note(path + ".restart", "%r: a failed job is not retried; it fails the deploy, which is "
                          "rolled back" % restart)
            for key, why_not in _JOB_DROPS.items():
                if key in comp:
                    del comp[key]
                    self.note("%s.%s" % (path, _COMPOSE_KEY.get(key, key)),
                              "dropped: %s (kind: job)" % why_not)
        for dependent, comp in components.items():
            for dependency, spec in comp.get("depends_on", {}).items():
                condition = self.dep_conditions.get((dependent, dependency), "service_started")
                is_job = components.get(dependency, {}).get("kind") == "job"
                if is_job and condition != COMPLETED:
                    spec["condition"] = "completed"
                    self.note("services.%s.depends_on.%s" % (_service_of(self.names, dependent), dependency),
                              "%s converted to completed: %s is a job, so its dependents wait for it to exit 0"
                              % (condition, dependency))

    # ------------------------------------------------------------------------------------ connection info

    def export_host_references(self, components: Dict[str, dict]) -> None:
        """``DB_HOST: db`` in a dependent of db becomes an export of db, ``DB_HOST: ${host}``.

        compose services reach each other by service name, which resolves only under compose; the model's
        exports say how dependents reach a component on each target (the service name on compose, the host's
        address on systemd, the Service name on k8s). Converted when the value is exactly a service name, the
        key looks like a host (``*HOST*``, ``*ADDR*``, ...), and the service depends on that one (exports are
        injected into direct dependents only); the dependent's own entry is removed so the injected value
        applies. Two dependencies exporting one key to one component would clash: those stay as they are.
        """
        wanted: Dict[str, Dict[str, List[str]]] = {}   # exporter -> key -> dependents
        for dependent, comp in components.items():
            for key, value in comp.get("env", {}).items():
                exporter = self.names.get(value)   # compose service name -> component
                if (exporter is None or exporter == dependent or exporter not in components
                        or not _HOST_KEY.search(key)
                        or exporter not in comp.get("depends_on", {})
                        or components.get(exporter, {}).get("kind") == "job"):
                    continue
                wanted.setdefault(exporter, {}).setdefault(key, []).append(dependent)
        clashes = set()
        for dependent, comp in components.items():
            seen: Dict[str, str] = {}
            for dependency in comp.get("depends_on", {}):
                for key in wanted.get(dependency, {}):
                    if key in seen:
                        clashes.add(key)
                    seen[key] = dependency
                for key in components.get(dependency, {}).get("exports", {}):
                    if key in seen and seen[key] != dependency:
                        clashes.add(key)
        for exporter, keys in sorted(wanted.items()):
            for key, dependents in sorted(keys.items()):
                if key in clashes:
                    continue
                components[exporter].setdefault("exports", {})[key] = "${host}"
                for dependent in dependents:
                    del components[dependent]["env"][key]
                    if not components[dependent]["env"]:
                        del components[dependent]["env"]
                    self.note("services.%s.environment.%s" % (_service_of(self.names, dependent), key),
                              "service host name %r converted to an export of %s (%s: ${host}: the service name "
                              "on compose, the host's address on systemd, the Service on k8s), injected into its "
                              "dependents" % (_service_of(self.names, exporter), exporter, key))

    def note_host_name_references(self, components: Mapping[str, dict]) -> None:
        """Compose services find each other by service name; point out values that rely on it."""
        for service, component in self.names.items():
            in_url = re.compile(r"(//|@)%s(?=$|[:/?#])|(^|[\s,=(])%s:\d" % (re.escape(service), re.escape(service)))
            for other, comp in components.items():
                if other == component:
                    continue
                where = "services.%s" % _service_of(self.names, other)
                for key, value in comp.get("env", {}).items():
                    if in_url.search(value) or (value == service and _HOST_KEY.search(key)):
                        self.note("%s.environment.%s" % (where, key), self.host_hint(service, component))
                for cfg in comp.get("config_files", []):
                    if in_url.search(cfg["content"]):
                        self.note("%s: config file %s" % (where, cfg["path"]), self.host_hint(service, component))
                for key in ("entrypoint", "command"):  # `--db db`, `--db=db`, `redis://redis:6379` in argv
                    argv = [str(a) for a in comp.get(key) or []]
                    for i, arg in enumerate(argv):
                        option_value = arg.split("=", 1)[1] if arg.startswith("-") and "=" in arg else None
                        after_option = i > 0 and argv[i - 1].startswith("-") and arg == service
                        if in_url.search(arg) or option_value == service or after_option:
                            self.note("%s.%s[%d]" % (where, key, i), self.host_hint(service, component))

    @staticmethod
    def host_hint(service: str, component: str) -> str:
        return ("refers to service host name %r, which only resolves under compose; export the connection info "
                "from %s (e.g. HOST: ${host}) and use the injected variable (${env.HOST} in config files)"
                % (service, component))


# ---------------------------------------------------------------------------------------- helpers

# model field -> the compose key it came from, for report lines
_COMPOSE_KEY = {"health": "healthcheck", "replicas": "deploy.replicas"}


def _service_of(names: Mapping[str, str], component: str) -> str:
    return next((s for s, c in names.items() if c == component), component)


def _sanitize_name(text: str) -> str:
    name = re.sub(r"[^a-z0-9-]+", "-", text.lower()).strip("-")
    name = re.sub(r"-{2,}", "-", name)[:names.NAME_MAX].strip("-")
    return name


def _sanitize_secret(text: str) -> str:
    name = re.sub(r"[^A-Za-z0-9_]", "_", text)
    return name if name and not name[0].isdigit() else "_" + name


def _escape_refs(text: str) -> str:
    """Model values interpret ${...}: a literal ${ from compose becomes $${."""
    return text.replace("${", "$${")


def _env_text(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def _unquote_env_value(value: str) -> str:
    if len(value) >= 2 and value[0] == value[-1] == "'":
        return value[1:-1]
    if len(value) >= 2 and value[0] == value[-1] == '"':
        inner = value[1:-1]
        return re.sub(r"\\([\\\"nt$])", lambda m: {"n": "\n", "t": "\t"}.get(m.group(1), m.group(1)), inner)
    # An unquoted value ends at " #" (an inline comment).
    return re.split(r"\s+#", value, maxsplit=1)[0].rstrip()


def _positive_int(value: object) -> Optional[int]:
    if isinstance(value, bool):
        return None
    try:
        number = int(str(value))
    except ValueError:
        return None
    return number if number >= 1 else None


def _port_int(text: str) -> Optional[int]:
    text = str(text).strip()
    if not text.isdigit():
        return None
    number = int(text)
    return number if 1 <= number <= 65535 else None


def _compact_port(port: dict) -> object:
    """Ports as an author would write them: a bare number when nothing else is set."""
    if port["protocol"] == "tcp" and set(port) <= {"port", "protocol"}:
        return port["port"]
    result = {k: port[k] for k in ("name", "port", "protocol", "publish") if k in port}
    if result.get("protocol") == "tcp":
        del result["protocol"]
    return result


def _parse_volume(item: object) -> Optional[Tuple[str, str, str, bool, List[str]]]:
    """(type, source, target, read_only, unconverted options) for a short or long volume entry."""
    if isinstance(item, dict):
        kind = str(item.get("type", "volume"))
        extra = sorted(str(k) for k in item if k not in ("type", "source", "target", "read_only"))
        return kind, str(item.get("source") or ""), str(item.get("target") or ""), bool(item.get("read_only")), extra
    if not isinstance(item, str):
        return None
    parts = item.split(":")
    if len(parts) == 1:
        return "volume", "", parts[0], False, []
    source, target = parts[0], parts[1]
    options = parts[2].split(",") if len(parts) > 2 else []
    read_only = "ro" in options
    extra = ["mode " + o for o in options if o not in ("ro", "rw")]
    kind = "bind" if source.startswith((".", "/", "~")) else "volume"
    return kind, source, target, read_only, extra


def _config_use(item: object) -> Tuple[str, Optional[str], Optional[str], List[str]]:
    """(source, target, mode, unconverted options) for a service's configs:/secrets: entry."""
    if not isinstance(item, dict):
        return str(item), None, None, []
    mode = item.get("mode")
    if isinstance(mode, int):
        mode = "0%o" % mode if mode <= 0o777 else None
    elif isinstance(mode, str):
        mode = mode if app_model.MODE_RE.match(mode) else None
        mode = ("0" + mode) if mode and len(mode) == 3 else mode
    extra = sorted(str(k) for k in item if k not in ("source", "target", "mode"))
    return str(item.get("source")), item.get("target"), mode, extra


def _health_argv(test: object) -> Optional[List[str]]:
    if isinstance(test, str):
        return ["/bin/sh", "-c", test]
    if not isinstance(test, list) or not test:
        return None
    head, rest = test[0], [str(t) for t in test[1:]]
    if head == "CMD" and rest:
        return rest
    if head == "CMD-SHELL" and rest:
        return ["/bin/sh", "-c", " ".join(rest)]
    return None


def _go_duration(raw: object) -> Optional[float]:
    if isinstance(raw, (int, float)) and not isinstance(raw, bool):
        return float(raw)
    text = str(raw).strip()
    if not text or _GO_DURATION_PART.sub("", text):
        return None
    return sum(float(n) * _GO_UNITS[u] for n, u in _GO_DURATION_PART.findall(text))


def _compose_memory(raw: object) -> Optional[str]:
    if isinstance(raw, int) and not isinstance(raw, bool):
        return str(raw) if raw > 0 else None
    match = _COMPOSE_MEMORY.match(str(raw).strip())
    if not match or int(match.group(1)) <= 0:
        return None
    return match.group(1) + _COMPOSE_MEMORY_UNITS[(match.group(2) or "").lower()]
