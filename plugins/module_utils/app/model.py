# Copyright: offline.delivery contributors
# SPDX-License-Identifier: GPL-3.0-or-later
"""The application model (``app.yml``): validate, normalise, interpolate, diff.

Standard library only: this file ships inside Ansible modules (AnsiballZ) and is imported by the builder
as ``offline_delivery_core.app_model``. The YAML is parsed by the caller; this module works on plain
Python data (dicts, lists, strings, numbers). The format is documented in docs/app-model.md.
"""

from __future__ import annotations

import copy
import posixpath
import re
import secrets as _secrets_module
import string
from typing import Any, Dict, Iterable, List, Mapping, Optional, Tuple

from ..common.names import CONTROL_RE, SEMVER_RE, name_problem
from ..common.oci import reference_problem

API_VERSION = "offline.delivery/v1"
KIND = "Application"

ENV_KEY_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*\Z")
SECRET_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*\Z")
# Ansible inventory group names: dashes draw a warning in Ansible, so they are refused here.
GROUP_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*\Z")
# Port names become Kubernetes port names (IANA_SVC_NAME): lowercase, max 15, at least one letter.
PORT_NAME_RE = re.compile(r"^(?=.*[a-z])[a-z0-9]([a-z0-9-]*[a-z0-9])?\Z")
PORT_NAME_MAX = 15
USER_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*(:[A-Za-z0-9_][A-Za-z0-9_.-]*)?\Z")
MODE_RE = re.compile(r"^0?[0-7]{3}\Z")
# Container paths go into separator-based formats (compose "src:dst:mode", systemd BindPaths=, "%" specifiers,
# "$" interpolation): each path segment is limited to characters none of them give a meaning to.
PATH_SEGMENT_RE = re.compile(r"^[A-Za-z0-9._@+-]+\Z")
# Control characters (C0, DEL, C1) end or split a unit-file line, a YAML scalar or a terminal line.
CPUS_RE = re.compile(r"^\d+(\.\d{1,3})?\Z")
MEMORY_RE = re.compile(r"^(\d+)(Ki|Mi|Gi|Ti|K|M|G|T)?\Z")
MEMORY_UNITS = {
    None: 1, "K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12,
    "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40,
}
DURATION_RE = re.compile(r"^(?:(\d+)h)?(?:(\d+)m)?(?:(\d+)s)?\Z")


SECRET_CHARSETS = {
    "alphanumeric": string.ascii_letters + string.digits,
    "hex": "0123456789abcdef",
    "base64url": string.ascii_letters + string.digits + "-_",
}
SECRET_LENGTH_MIN = 8
SECRET_LENGTH_MAX = 256
SECRET_DEFAULTS = {"length": 32, "charset": "alphanumeric"}

HEALTH_DEFAULTS = {"interval": 10, "timeout": 5, "retries": 3, "start_period": 0}
HEALTH_KINDS = ("http", "tcp", "exec")
CONDITIONS = ("started", "healthy", "completed")
# A service runs until stopped; a job runs to completion (exit 0) and its dependents wait for that.
COMPONENT_KINDS = ("service", "job")
# What a job cannot have: nobody connects to it, nothing probes it, it owns no data and runs once.
JOB_REFUSES = {
    "ports": "a job listens on nothing",
    "health": "a job is healthy when it exits 0; no probe runs",
    "exports": "a job is not reachable, so it has no connection info",
    "volumes": "a volume belongs to one long-running component; let the service that owns the data run the job's "
               "work, or reach it over the network",
}
PROTOCOLS = ("tcp", "udp")

TOP_FIELDS = ("apiVersion", "kind", "name", "version", "description", "secrets", "modules", "components")
MODULE_FIELDS = ("description", "components", "default")
SECRET_FIELDS = ("length", "charset")
COMPONENT_FIELDS = (
    "image", "description", "entrypoint", "command", "user", "ports", "env", "config_files", "volumes",
    "health", "replicas", "resources", "placement", "depends_on", "exports", "security", "kind",
)
SECURITY_FIELDS = ("capabilities", "privilege_escalation")
# Every target runs a component with these Linux capabilities only (capabilities(7), without CAP_): what an
# entrypoint needs to set up its files and drop to its own user (chown, setuid/setgid) and to bind a low port.
# A component adds what its image truly needs in security.capabilities; the same set on compose (cap_drop ALL +
# cap_add), systemd (CapabilityBoundingSet=) and Kubernetes (capabilities drop ALL + add).
DEFAULT_CAPABILITIES = ("CHOWN", "DAC_OVERRIDE", "FOWNER", "FSETID", "KILL", "NET_BIND_SERVICE", "SETGID", "SETUID")
CAPABILITIES = DEFAULT_CAPABILITIES + (
    "AUDIT_CONTROL", "AUDIT_READ", "AUDIT_WRITE", "BLOCK_SUSPEND", "BPF", "CHECKPOINT_RESTORE", "DAC_READ_SEARCH",
    "IPC_LOCK", "IPC_OWNER", "LEASE", "LINUX_IMMUTABLE", "MAC_ADMIN", "MAC_OVERRIDE", "MKNOD", "NET_ADMIN",
    "NET_BROADCAST", "NET_RAW", "PERFMON", "SETFCAP", "SETPCAP", "SYS_ADMIN", "SYS_BOOT", "SYS_CHROOT",
    "SYS_MODULE", "SYS_NICE", "SYS_PACCT", "SYS_PTRACE", "SYS_RAWIO", "SYS_RESOURCE", "SYS_TIME",
    "SYS_TTY_CONFIG", "SYSLOG", "WAKE_ALARM")
PORT_FIELDS = ("name", "port", "protocol", "publish")
CONFIG_FILE_FIELDS = ("path", "content", "mode")
VOLUME_FIELDS = ("name", "path")
HEALTH_FIELDS = HEALTH_KINDS + ("interval", "timeout", "retries", "start_period")
RESOURCE_FIELDS = ("cpus", "memory")
PLACEMENT_FIELDS = ("group",)
DEPENDENCY_FIELDS = ("condition",)

# Characters that would let a value break out of a compose file line or a systemd EnvironmentFile line.
_FORBIDDEN_IN_ENV = {"\n": "a newline", "\r": "a carriage return", "\x00": "a NUL byte"}

# Where each kind of reference may appear.
REFS_ENV = frozenset({"secrets"})
REFS_EXPORTS = frozenset({"secrets", "host"})
REFS_CONFIG = frozenset({"secrets", "env"})
_REF_PLACES = {"host": "exports", "env": "config file content", "secrets": "env, exports and config files"}


class ModelError(ValueError):
    """Every problem found in a model, as (field path, message) pairs."""

    def __init__(self, errors: List[Tuple[str, str]], source: str = "") -> None:
        self.errors = list(errors)
        self.source = source
        super().__init__(self.__str__())

    def __str__(self) -> str:
        prefix = self.source + ": " if self.source else ""
        lines = []
        for path, message in self.errors:
            lines.append(prefix + (path + ": " if path else "") + message)
        return "\n".join(lines)


class _Errors:
    """Collects errors so that one run reports every problem at once."""

    def __init__(self) -> None:
        self.items: List[Tuple[str, str]] = []

    def add(self, path: str, message: str) -> None:
        self.items.append((path, message))


def _join(path: str, key: str) -> str:
    return key if not path else path + "." + key


def _type_name(value: object) -> str:
    if value is None:
        return "null"
    return {bool: "boolean", int: "integer", float: "number", str: "string", list: "list",
            dict: "mapping"}.get(type(value), type(value).__name__)


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_fields(data: Mapping, allowed: Tuple[str, ...], path: str, errors: _Errors) -> None:
    for key in data:
        if key not in allowed:
            errors.add(_join(path, str(key)), "unknown field %r; allowed fields here: %s"
                       % (key, ", ".join(allowed)))


def _mapping(value: object, path: str, errors: _Errors, what: str = "a mapping") -> Optional[dict]:
    if isinstance(value, dict):
        return value
    errors.add(path, "expected %s, got %s" % (what, _type_name(value)))
    return None


def _string(value: object, path: str, errors: _Errors) -> Optional[str]:
    if isinstance(value, str):
        return value
    hint = " (quote it in YAML)" if isinstance(value, (int, float, bool)) else ""
    errors.add(path, "expected a string, got %s%s" % (_type_name(value), hint))
    return None


def _check_name(value: object, path: str, errors: _Errors, what: str) -> Optional[str]:
    name = _string(value, path, errors)
    if name is None:
        return None
    problem = name_problem(name, what)
    if problem:
        errors.add(path, problem)
        return None
    return name


# ---------------------------------------------------------------------------------------------------
# References: ${secrets.NAME}, ${host}, ${env.NAME}; $${ is a literal ${
# ---------------------------------------------------------------------------------------------------

def _parse_refs(text: str) -> Tuple[List[object], List[str]]:
    """Split text into literal strings and (kind, name) references; also return problems found."""
    parts: List[object] = []
    problems: List[str] = []
    literal: List[str] = []
    i = 0
    while i < len(text):
        if text.startswith("$${", i):
            literal.append("${")
            i += 3
            continue
        if not text.startswith("${", i):
            literal.append(text[i])
            i += 1
            continue
        end = text.find("}", i + 2)
        if end < 0:
            problems.append("unterminated reference %r: close it with '}' or write '$${' for a literal '${'"
                            % _excerpt(text[i:]))
            literal.append(text[i:])
            break
        inner = text[i + 2:end]
        ref = _classify_ref(inner)
        if isinstance(ref, str):
            problems.append(ref)
        else:
            if literal:
                parts.append("".join(literal))
                literal = []
            parts.append(ref)
        i = end + 1
    if literal:
        parts.append("".join(literal))
    return parts, problems


def _excerpt(text: str) -> str:
    return text if len(text) <= 40 else text[:37] + "..."


def _classify_ref(inner: str) -> object:
    """(kind, name) for a valid reference body, else a message saying what is wrong."""
    if inner == "host":
        return ("host", "")
    for kind, pattern in (("secrets", SECRET_NAME_RE), ("env", ENV_KEY_RE)):
        if inner.startswith(kind + "."):
            name = inner[len(kind) + 1:]
            if pattern.match(name):
                return (kind, name)
            return "invalid name %r in reference '${%s}'" % (name, inner)
    return ("unknown reference '${%s}': only ${secrets.NAME}, ${host} (exports) and ${env.NAME} "
            "(config files) are interpreted; write '$${' for a literal '${'" % _excerpt(inner))


def references(text: str) -> List[Tuple[str, str]]:
    """The valid (kind, name) references in text, in order (invalid ones are left out)."""
    parts = _parse_refs(text)[0]
    return [p for p in parts if isinstance(p, tuple)]


def interpolate(text: str, *, secrets: Optional[Mapping[str, str]], host: Optional[str] = None,
                env: Optional[Mapping[str, str]] = None, field: str = "") -> str:
    """Resolve the references in text in one pass (resolved values are never re-read).

    ``host`` is given only for exports and ``env`` only for config files: a reference whose value was not
    given is an error, as is any malformed or unknown ``${...}``. Raises ModelError naming ``field``.
    """
    parts, problems = _parse_refs(text)
    errors = _Errors()
    for problem in problems:
        errors.add(field, problem)
    out: List[str] = []
    for part in parts:
        if isinstance(part, str):
            out.append(part)
            continue
        kind, name = part
        value = _ref_value(kind, name, secrets, host, env, field, errors)
        if value is not None:
            out.append(value)
    if errors.items:
        raise ModelError(errors.items)
    return "".join(out)


def _ref_value(kind: str, name: str, secrets: Optional[Mapping[str, str]], host: Optional[str],
               env: Optional[Mapping[str, str]], field: str, errors: _Errors) -> Optional[str]:
    if kind == "host":
        if host is None:
            errors.add(field, "${host} is only allowed in exports (it means the host of the exporting component)")
        return host
    if kind == "env":
        if env is None:
            errors.add(field, "${env.%s} is only allowed in config file content" % name)
            return None
        if name not in env:
            errors.add(field, "${env.%s}: the component has no env variable %s (it has: %s)"
                       % (name, name, ", ".join(sorted(env)) or "none"))
            return None
        return str(env[name])
    if secrets is None or name not in secrets:
        errors.add(field, "${secrets.%s}: no value for secret %r (secrets are generated on site before "
                   "rendering)" % (name, name))
        return None
    return str(secrets[name])


def _check_text_refs(text: str, path: str, allowed: frozenset, secret_names: Mapping[str, object],
                     env_names: Optional[set], errors: _Errors) -> None:
    """Validation-time check of references in a model value (no values resolved)."""
    parts, problems = _parse_refs(text)
    for problem in problems:
        errors.add(path, problem)
    for part in parts:
        if not isinstance(part, tuple):
            continue
        kind, name = part
        label = "${%s}" % (kind if kind == "host" else kind + "." + name)
        if kind not in allowed:
            errors.add(path, "%s is not allowed here; it may only appear in %s" % (label, _REF_PLACES[kind]))
        elif kind == "secrets" and name not in secret_names:
            errors.add(path, "%s names an undeclared secret; declared secrets: %s"
                       % (label, ", ".join(sorted(secret_names)) or "none (add it under 'secrets:')"))
        elif kind == "env" and env_names is not None and name not in env_names:
            errors.add(path, "%s names no env variable of this component (own env and injected exports: %s)"
                       % (label, ", ".join(sorted(env_names)) or "none"))


# ---------------------------------------------------------------------------------------------------
# Field checks
# ---------------------------------------------------------------------------------------------------

def parse_duration(value: object) -> Optional[int]:
    """Seconds for an int or a '1h2m3s'-style string; None when it is neither."""
    if _is_int(value):
        return value if value >= 0 else None
    if not isinstance(value, str) or not value:
        return None
    match = DURATION_RE.match(value)
    if not match or not any(match.groups()):
        return None
    hours, minutes, seconds = (int(g) if g else 0 for g in match.groups())
    return hours * 3600 + minutes * 60 + seconds


def parse_memory(value: str) -> int:
    """Bytes for a memory quantity such as '256Mi', '1Gi', '512M' or '1048576'."""
    match = MEMORY_RE.match(value)
    if not match:
        raise ValueError("invalid memory quantity %r: expected digits with an optional unit "
                         "(Ki, Mi, Gi, Ti, K, M, G, T), e.g. 256Mi" % value)
    return int(match.group(1)) * MEMORY_UNITS[match.group(2)]


def _env_scalar(value: object, path: str, errors: _Errors) -> Optional[str]:
    """Env values are strings; numbers and booleans are accepted and written the way YAML spells them."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return value
    errors.add(path, "expected a string, number or boolean, got %s" % _type_name(value))
    return None


def _check_no_injection(text: str, path: str, errors: _Errors, what: str) -> bool:
    for char, label in _FORBIDDEN_IN_ENV.items():
        if char in text:
            errors.add(path, "%s contains %s, which would break the generated compose file / systemd "
                       "EnvironmentFile; remove it (use a config file for multi-line content)" % (what, label))
            return False
    return True


def _load_env_map(data: object, path: str, errors: _Errors) -> Dict[str, str]:
    """A KEY: value mapping for env or exports (references are checked later)."""
    result: Dict[str, str] = {}
    if data is None:
        return result
    mapping = _mapping(data, path, errors, "a mapping of NAME: value")
    if mapping is None:
        return result
    for key, raw in mapping.items():
        key_path = _join(path, str(key))
        if not isinstance(key, str) or not ENV_KEY_RE.match(key):
            errors.add(key_path, "invalid variable name %r: expected [A-Za-z_][A-Za-z0-9_]*" % (key,))
            continue
        value = _env_scalar(raw, key_path, errors)
        if value is None:
            continue
        if _check_no_injection(value, key_path, errors, "value"):
            result[key] = value
    return result


def _load_argv(data: object, path: str, errors: _Errors, allow_empty: bool = True) -> Optional[List[str]]:
    if data is None:
        return None
    if not isinstance(data, list):
        errors.add(path, "expected a list of strings (argv), got %s" % _type_name(data))
        return None
    if not data and not allow_empty:
        errors.add(path, "expected a non-empty list of strings (argv)")
        return None
    argv: List[str] = []
    for index, item in enumerate(data):
        item_path = "%s[%d]" % (path, index)
        if isinstance(item, (int, float)) and not isinstance(item, bool):
            item = repr(item)
        if not isinstance(item, str):
            errors.add(item_path, "expected a string, got %s" % _type_name(item))
            continue
        if "\x00" in item:
            errors.add(item_path, "argument contains a NUL byte")
            continue
        if _has_control(item, item_path, errors, "argument"):
            continue
        argv.append(item)
    return argv


def _has_control(text: str, path: str, errors: _Errors, what: str) -> bool:
    """True (and an error naming the field) when ``text`` holds a control character: a newline in an argv
    item or a description would start a new line in a systemd unit (ExecStart=, Description=)."""
    found = CONTROL_RE.search(text)
    if found is None:
        return False
    errors.add(path, "%s contains the control character %r at offset %d, which would break a generated unit "
               "or compose file; write it on one line without control characters (a multi-line script belongs "
               "in a config file run by the command)" % (what, found.group(), found.start()))
    return True


def _load_description(data: Mapping, path: str, errors: _Errors) -> str:
    description = data.get("description", "")
    if _string(description, path, errors) is None or _has_control(description, path, errors, "description"):
        return ""
    return description


def _load_port(data: object, path: str, errors: _Errors) -> Optional[dict]:
    if _is_int(data):
        data = {"port": data}
    mapping = _mapping(data, path, errors, "a mapping {name, port, protocol, publish} or a port number")
    if mapping is None:
        return None
    _check_fields(mapping, PORT_FIELDS, path, errors)
    port = _port_number(mapping.get("port"), _join(path, "port"), errors, required=True)
    protocol = mapping.get("protocol", "tcp")
    if protocol not in PROTOCOLS:
        errors.add(_join(path, "protocol"), "expected one of %s, got %r" % (", ".join(PROTOCOLS), protocol))
        protocol = None
    publish = _port_number(mapping.get("publish"), _join(path, "publish"), errors, required=False)
    name = mapping.get("name")
    if name is None and port is not None:
        name = "port-%d" % port if protocol != "udp" else "port-%d-udp" % port
    elif name is not None:
        name = _string(name, _join(path, "name"), errors)
        if name is not None and (len(name) > PORT_NAME_MAX or not PORT_NAME_RE.match(name)):
            errors.add(_join(path, "name"), "invalid port name %r: lowercase letters, digits and '-', at least one "
                       "letter, at most %d characters (a Kubernetes port name)" % (name, PORT_NAME_MAX))
            name = None
    if port is None or protocol is None or name is None:
        return None
    return {"name": name, "port": port, "protocol": protocol, "publish": publish}


def _port_number(value: object, path: str, errors: _Errors, required: bool) -> Optional[int]:
    if value is None:
        if required:
            errors.add(path, "required: a port number 1-65535")
        return None
    if not _is_int(value) or not 1 <= value <= 65535:
        errors.add(path, "expected a port number 1-65535, got %r" % (value,))
        return None
    return value


def _load_ports(data: object, path: str, errors: _Errors) -> List[dict]:
    if data is None:
        return []
    if not isinstance(data, list):
        errors.add(path, "expected a list of ports, got %s" % _type_name(data))
        return []
    ports: List[dict] = []
    seen_numbers: Dict[Tuple[int, str], int] = {}
    seen_names: Dict[str, int] = {}
    for index, item in enumerate(data):
        item_path = "%s[%d]" % (path, index)
        port = _load_port(item, item_path, errors)
        if port is None:
            continue
        key = (port["port"], port["protocol"])
        if key in seen_numbers:
            errors.add(_join(item_path, "port"), "port %d/%s is already declared at %s[%d]; ports must be unique "
                       "per component" % (key[0], key[1], path, seen_numbers[key]))
            continue
        if port["name"] in seen_names:
            errors.add(_join(item_path, "name"), "port name %r is already used at %s[%d]"
                       % (port["name"], path, seen_names[port["name"]]))
            continue
        seen_numbers[key] = index
        seen_names[port["name"]] = index
        ports.append(port)
    return ports


def _load_config_files(data: object, path: str, errors: _Errors) -> List[dict]:
    if data is None:
        return []
    if not isinstance(data, list):
        errors.add(path, "expected a list of {path, content, mode}, got %s" % _type_name(data))
        return []
    files: List[dict] = []
    seen: Dict[str, int] = {}
    for index, item in enumerate(data):
        item_path = "%s[%d]" % (path, index)
        mapping = _mapping(item, item_path, errors, "a mapping {path, content, mode}")
        if mapping is None:
            continue
        _check_fields(mapping, CONFIG_FILE_FIELDS, item_path, errors)
        file_path = _absolute_path(mapping.get("path"), _join(item_path, "path"), errors)
        content = mapping.get("content")
        if content is None:
            errors.add(_join(item_path, "content"), "required: the file's text (may be empty)")
        else:
            content = _string(content, _join(item_path, "content"), errors)
            if content is not None and "\x00" in content:
                errors.add(_join(item_path, "content"), "content contains a NUL byte; config files are text")
                content = None
        mode = _file_mode(mapping.get("mode", "0644"), _join(item_path, "mode"), errors)
        if file_path is not None:
            if file_path in seen:
                errors.add(_join(item_path, "path"), "%s is already declared at %s[%d]"
                           % (file_path, path, seen[file_path]))
                continue
            seen[file_path] = index
        if file_path is None or content is None or mode is None:
            continue
        files.append({"path": file_path, "content": content, "mode": mode})
    return files


def _file_mode(value: object, path: str, errors: _Errors) -> Optional[str]:
    # YAML reads an unquoted 0644 as the integer 420 and 644 as decimal; refuse integers outright.
    if not isinstance(value, str) or not MODE_RE.match(value):
        errors.add(path, "expected an octal mode as a quoted string such as '0644' or '0600', got %r" % (value,))
        return None
    return value if len(value) == 4 else "0" + value


def _absolute_path(value: object, path: str, errors: _Errors) -> Optional[str]:
    if value is None:
        errors.add(path, "required: an absolute path")
        return None
    text = _string(value, path, errors)
    if text is None:
        return None
    if not text.startswith("/"):
        errors.add(path, "%r is not absolute: paths inside the container start with '/'" % text)
        return None
    if "\x00" in text or "\n" in text:
        errors.add(path, "path contains a NUL byte or a newline")
        return None
    if ".." in text.split("/"):
        errors.add(path, "%r contains '..': write the normalised path" % text)
        return None
    bad = [seg for seg in text.split("/") if seg and not PATH_SEGMENT_RE.match(seg)]
    if bad:
        errors.add(path, "%r: the part %r has a character outside [A-Za-z0-9._@+-] (':', spaces, '%%' and '$' "
                   "would be read as separators, specifiers or variables by compose or systemd); rename the "
                   "path inside the image" % (text, bad[0]))
        return None
    normal = posixpath.normpath(text)
    if normal.startswith("//"):
        normal = "/" + normal.lstrip("/")
    if normal != text:
        errors.add(path, "%r is not normalised: write %r" % (text, normal))
        return None
    if normal == "/":
        errors.add(path, "'/' is not allowed here: name a file or directory below it")
        return None
    return normal


def _load_volumes(data: object, path: str, errors: _Errors) -> List[dict]:
    if data is None:
        return []
    if not isinstance(data, list):
        errors.add(path, "expected a list of {name, path}, got %s" % _type_name(data))
        return []
    volumes: List[dict] = []
    seen_paths: Dict[str, int] = {}
    for index, item in enumerate(data):
        item_path = "%s[%d]" % (path, index)
        mapping = _mapping(item, item_path, errors, "a mapping {name, path}")
        if mapping is None:
            continue
        _check_fields(mapping, VOLUME_FIELDS, item_path, errors)
        name = _check_name(mapping.get("name"), _join(item_path, "name"), errors, "volume name")
        mount = _absolute_path(mapping.get("path"), _join(item_path, "path"), errors)
        if mount is not None:
            if mount in seen_paths:
                errors.add(_join(item_path, "path"), "%s is already mounted at %s[%d]"
                           % (mount, path, seen_paths[mount]))
                continue
            seen_paths[mount] = index
        if name is None or mount is None:
            continue
        volumes.append({"name": name, "path": mount})
    return volumes


def _load_health(data: object, path: str, errors: _Errors) -> Optional[dict]:
    if data is None:
        return None
    mapping = _mapping(data, path, errors, "a mapping with one of http, tcp, exec")
    if mapping is None:
        return None
    _check_fields(mapping, HEALTH_FIELDS, path, errors)
    kinds = [k for k in HEALTH_KINDS if k in mapping]
    if len(kinds) != 1:
        errors.add(path, "exactly one of http, tcp, exec is required, got %s" % (", ".join(kinds) or "none"))
        return None
    kind = kinds[0]
    probe = _load_probe(kind, mapping[kind], _join(path, kind), errors)
    health: Dict[str, Any] = {kind: probe}
    for key, default in HEALTH_DEFAULTS.items():
        value = mapping.get(key, default)
        key_path = _join(path, key)
        if key == "retries":
            if not _is_int(value) or value < 1:
                errors.add(key_path, "expected an integer >= 1, got %r" % (value,))
                value = None
        else:
            seconds = parse_duration(value)
            if seconds is None:
                errors.add(key_path, "expected a duration such as 5s, 1m30s or 2h, or whole seconds, got %r" % (value,))
            elif key in ("interval", "timeout") and seconds < 1:
                errors.add(key_path, "must be at least 1s")
                seconds = None
            value = seconds
        health[key] = value
    if probe is None or any(health[k] is None for k in HEALTH_DEFAULTS):
        return None
    if health["timeout"] > health["interval"]:
        errors.add(_join(path, "timeout"), "timeout (%ds) is longer than interval (%ds)"
                   % (health["timeout"], health["interval"]))
        return None
    return health


def _load_probe(kind: str, data: object, path: str, errors: _Errors) -> object:
    if kind == "exec":
        if data is None:
            errors.add(path, "expected a non-empty list of strings (argv)")
            return None
        return _load_argv(data, path, errors, allow_empty=False)
    fields = ("port", "path") if kind == "http" else ("port",)
    mapping = _mapping(data, path, errors, "a mapping {%s}" % ", ".join(fields))
    if mapping is None:
        return None
    _check_fields(mapping, fields, path, errors)
    port = _port_number(mapping.get("port"), _join(path, "port"), errors, required=True)
    if kind == "tcp":
        return {"port": port} if port is not None else None
    url_path = mapping.get("path", "/")
    if not isinstance(url_path, str) or not url_path.startswith("/") or any(c in url_path for c in " \r\n\x00"):
        errors.add(_join(path, "path"), "expected a URL path starting with '/' without spaces, got %r" % (url_path,))
        return None
    return {"port": port, "path": url_path} if port is not None else None


def _load_resources(data: object, path: str, errors: _Errors) -> dict:
    result: Dict[str, Optional[str]] = {"cpus": None, "memory": None}
    if data is None:
        return result
    mapping = _mapping(data, path, errors, "a mapping {cpus, memory}")
    if mapping is None:
        return result
    _check_fields(mapping, RESOURCE_FIELDS, path, errors)
    cpus = mapping.get("cpus")
    if cpus is not None:
        text = repr(cpus) if isinstance(cpus, (int, float)) and not isinstance(cpus, bool) else cpus
        if not isinstance(text, str) or not CPUS_RE.match(text) or float(text) <= 0:
            errors.add(_join(path, "cpus"), "expected a positive number of CPUs such as \"0.5\" or \"2\" "
                       "(at most 3 decimals), got %r" % (cpus,))
        else:
            result["cpus"] = text
    memory = mapping.get("memory")
    if memory is not None:
        if not isinstance(memory, str) or not MEMORY_RE.match(memory) or parse_memory(memory) <= 0:
            errors.add(_join(path, "memory"), "expected a memory quantity such as 256Mi, 1Gi or 512M "
                       "(units Ki, Mi, Gi, Ti, K, M, G, T), got %r" % (memory,))
        else:
            result["memory"] = memory
    return result


def _load_security(data: object, path: str, errors: _Errors) -> dict:
    """``{capabilities: [added to DEFAULT_CAPABILITIES], privilege_escalation: false}``: what a component may do
    beyond the contained default every target applies (docs/app-model.md, "security")."""
    result: Dict[str, Any] = {"capabilities": [], "privilege_escalation": False}
    if data is None:
        return result
    mapping = _mapping(data, path, errors, "a mapping {capabilities, privilege_escalation}")
    if mapping is None:
        return result
    _check_fields(mapping, SECURITY_FIELDS, path, errors)
    caps = mapping.get("capabilities", [])
    if not isinstance(caps, list):
        errors.add(_join(path, "capabilities"), "expected a list of capability names such as [NET_ADMIN]")
        caps = []
    for i, cap in enumerate(caps):
        name = cap.upper()[4:] if isinstance(cap, str) and cap.upper().startswith("CAP_") else cap
        if not isinstance(name, str) or name.upper() not in CAPABILITIES:
            errors.add("%s[%d]" % (_join(path, "capabilities"), i), "unknown capability %r (capabilities(7) names "
                       "such as NET_ADMIN or SYS_PTRACE)" % (cap,))
        else:
            result["capabilities"].append(name.upper())
    result["capabilities"] = sorted(set(result["capabilities"]) - set(DEFAULT_CAPABILITIES))
    escalation = mapping.get("privilege_escalation", False)
    if not isinstance(escalation, bool):
        errors.add(_join(path, "privilege_escalation"), "expected true or false, got %r" % (escalation,))
    else:
        result["privilege_escalation"] = escalation
    return result


def capabilities_of(security: Mapping[str, Any]) -> List[str]:
    """The capabilities a component runs with on every target: the default set plus what it adds."""
    return sorted(set(DEFAULT_CAPABILITIES) | set(security.get("capabilities") or ()))


def _load_placement(data: object, path: str, errors: _Errors) -> dict:
    result: Dict[str, Optional[str]] = {"group": None}
    if data is None:
        return result
    mapping = _mapping(data, path, errors, "a mapping {group}")
    if mapping is None:
        return result
    _check_fields(mapping, PLACEMENT_FIELDS, path, errors)
    group = mapping.get("group")
    if group is not None:
        if not isinstance(group, str) or not GROUP_RE.match(group):
            errors.add(_join(path, "group"), "invalid inventory group name %r: expected [A-Za-z_][A-Za-z0-9_]*"
                       % (group,))
        else:
            result["group"] = group
    return result


def _load_depends_on(data: object, path: str, errors: _Errors) -> Dict[str, dict]:
    result: Dict[str, dict] = {}
    if data is None:
        return result
    if isinstance(data, list):
        for index, item in enumerate(data):
            name = _string(item, "%s[%d]" % (path, index), errors)
            if name is not None:
                if name in result:
                    errors.add("%s[%d]" % (path, index), "%r is listed twice" % name)
                result[name] = {"condition": None}   # the natural one, set once kinds are known
        return result
    mapping = _mapping(data, path, errors, "a list of component names or a mapping name: {condition}")
    if mapping is None:
        return result
    for name, spec in mapping.items():
        dep_path = _join(path, str(name))
        if spec is None:
            spec = {}
        spec = _mapping(spec, dep_path, errors, "a mapping {condition}")
        if spec is None:
            continue
        _check_fields(spec, DEPENDENCY_FIELDS, dep_path, errors)
        condition = spec.get("condition")
        if condition is not None and condition not in CONDITIONS:
            errors.add(_join(dep_path, "condition"), "expected one of %s, got %r" % (", ".join(CONDITIONS), condition))
            continue
        result[str(name)] = {"condition": condition}
    return result


def _load_replicas(data: object, path: str, errors: _Errors) -> Optional[int]:
    if data is None:
        return 1
    if not _is_int(data) or data < 1:
        errors.add(path, "expected an integer >= 1, got %r" % (data,))
        return None
    return data


def _load_user(data: object, path: str, errors: _Errors) -> Optional[str]:
    if data is None:
        return None
    if _is_int(data):
        data = str(data)
    if not isinstance(data, str) or not USER_RE.match(data):
        errors.add(path, "expected a user as 'name', 'uid' or 'uid:gid', got %r" % (data,))
        return None
    return data


def _load_component(data: object, path: str, errors: _Errors) -> Optional[dict]:
    mapping = _mapping(data, path, errors)
    if mapping is None:
        return None
    _check_fields(mapping, COMPONENT_FIELDS, path, errors)
    image = mapping.get("image")
    if image is None:
        errors.add(_join(path, "image"), "required: an image reference with a tag or digest, e.g. shop/api:1.0.0")
    else:
        image = _string(image, _join(path, "image"), errors)
        problem = reference_problem(image) if image is not None else None
        if problem:
            errors.add(_join(path, "image"), problem)
    description = _load_description(mapping, _join(path, "description"), errors)
    kind = mapping.get("kind", "service")
    if kind not in COMPONENT_KINDS:
        errors.add(_join(path, "kind"), "expected one of %s, got %r" % (", ".join(COMPONENT_KINDS), kind))
        kind = "service"
    return {
        "kind": kind,
        "image": image,
        "description": description,
        "entrypoint": _load_argv(mapping.get("entrypoint"), _join(path, "entrypoint"), errors),
        "command": _load_argv(mapping.get("command"), _join(path, "command"), errors),
        "user": _load_user(mapping.get("user"), _join(path, "user"), errors),
        "ports": _load_ports(mapping.get("ports"), _join(path, "ports"), errors),
        "env": _load_env_map(mapping.get("env"), _join(path, "env"), errors),
        "config_files": _load_config_files(mapping.get("config_files"), _join(path, "config_files"), errors),
        "volumes": _load_volumes(mapping.get("volumes"), _join(path, "volumes"), errors),
        "health": _load_health(mapping.get("health"), _join(path, "health"), errors),
        "replicas": _load_replicas(mapping.get("replicas"), _join(path, "replicas"), errors),
        "resources": _load_resources(mapping.get("resources"), _join(path, "resources"), errors),
        "placement": _load_placement(mapping.get("placement"), _join(path, "placement"), errors),
        "depends_on": _load_depends_on(mapping.get("depends_on"), _join(path, "depends_on"), errors),
        "exports": _load_env_map(mapping.get("exports"), _join(path, "exports"), errors),
        "security": _load_security(mapping.get("security"), _join(path, "security"), errors),
    }


def _load_secrets(data: object, errors: _Errors) -> Dict[str, dict]:
    result: Dict[str, dict] = {}
    if data is None:
        return result
    mapping = _mapping(data, "secrets", errors, "a mapping of secret name: {length, charset}")
    if mapping is None:
        return result
    for name, spec in mapping.items():
        path = _join("secrets", str(name))
        if not isinstance(name, str) or not SECRET_NAME_RE.match(name):
            errors.add(path, "invalid secret name %r: expected [A-Za-z_][A-Za-z0-9_]*" % (name,))
            continue
        spec = _check_secret_spec(spec, path, errors)
        if spec is not None:
            result[name] = spec
    return result


def _check_secret_spec(spec: object, path: str, errors: _Errors) -> Optional[dict]:
    if spec is None:
        spec = {}
    mapping = _mapping(spec, path, errors, "a mapping {length, charset}")
    if mapping is None:
        return None
    _check_fields(mapping, SECRET_FIELDS, path, errors)
    length = mapping.get("length", SECRET_DEFAULTS["length"])
    charset = mapping.get("charset", SECRET_DEFAULTS["charset"])
    ok = True
    if not _is_int(length) or not SECRET_LENGTH_MIN <= length <= SECRET_LENGTH_MAX:
        errors.add(_join(path, "length"), "expected an integer %d-%d, got %r"
                   % (SECRET_LENGTH_MIN, SECRET_LENGTH_MAX, length))
        ok = False
    if charset not in SECRET_CHARSETS:
        errors.add(_join(path, "charset"), "expected one of %s, got %r" % (", ".join(SECRET_CHARSETS), charset))
        ok = False
    return {"length": length, "charset": charset} if ok else None


# ---------------------------------------------------------------------------------------------------
# Cross-component checks
# ---------------------------------------------------------------------------------------------------

def component_kind(comp: Mapping[str, Any]) -> str:
    """``service`` or ``job``; models normalised before jobs existed carry no kind: services."""
    return comp.get("kind") or "service"


def _check_job(name: str, comp: dict, errors: _Errors) -> None:
    if comp["kind"] != "job":
        return
    for key, why in sorted(JOB_REFUSES.items()):
        if comp[key]:
            errors.add("components.%s.%s" % (name, key), "a job cannot have %s: %s" % (key, why))
    if comp["replicas"] not in (None, 1):
        errors.add("components.%s.replicas" % name, "a job runs once (replicas 1), got %r" % comp["replicas"])


def _resolve_conditions(components: Dict[str, dict], errors: _Errors) -> None:
    """A dependency on a job waits for it to complete, on a service for it to start (or be healthy): a
    condition left out takes the natural one; one that does not fit the dependency's kind is refused."""
    for name, comp in components.items():
        for dep, spec in comp["depends_on"].items():
            if dep not in components:
                continue
            is_job = components[dep]["kind"] == "job"
            condition = spec["condition"]
            if condition is None:
                spec["condition"] = "completed" if is_job else "started"
            elif is_job and condition != "completed":
                errors.add("components.%s.depends_on.%s.condition" % (name, dep),
                           "%s is a job: its dependents wait for it to complete (condition: completed), got %r"
                           % (dep, condition))
            elif not is_job and condition == "completed":
                errors.add("components.%s.depends_on.%s.condition" % (name, dep),
                           "%s is a service, which never completes: use started or healthy, or make it a job "
                           "(kind: job)" % dep)


def _check_graph(components: Dict[str, dict], errors: _Errors) -> None:
    """Dependencies exist and form no cycle."""
    ok = True
    for name, comp in components.items():
        for dep in comp["depends_on"]:
            path = "components.%s.depends_on.%s" % (name, dep)
            if dep == name:
                errors.add(path, "a component cannot depend on itself")
                ok = False
            elif dep not in components:
                errors.add(path, "depends on %r, which is not a component; components: %s"
                           % (dep, ", ".join(sorted(components))))
                ok = False
    if not ok:
        return
    cycle = _find_cycle(components)
    if cycle:
        errors.add("components.%s.depends_on" % cycle[0], "dependency cycle: %s" % " -> ".join(cycle))


def _find_cycle(components: Dict[str, dict]) -> Optional[List[str]]:
    """The first cycle found by a deterministic depth-first search, as a closed path (a -> b -> a)."""
    state: Dict[str, int] = {}  # 1 = on the current path, 2 = done
    stack: List[str] = []

    def visit(node: str) -> Optional[List[str]]:
        state[node] = 1
        stack.append(node)
        for dep in sorted(components[node]["depends_on"]):
            if state.get(dep) == 1:
                return stack[stack.index(dep):] + [dep]
            if dep not in state:
                found = visit(dep)
                if found:
                    return found
        stack.pop()
        state[node] = 2
        return None

    for name in sorted(components):
        if name not in state:
            found = visit(name)
            if found:
                return found
    return None


def _check_component_refs(name: str, comp: dict, components: Dict[str, dict], secret_names: Mapping[str, object],
                          errors: _Errors) -> None:
    path = "components." + name
    for key, value in comp["env"].items():
        _check_text_refs(value, "%s.env.%s" % (path, key), REFS_ENV, secret_names, None, errors)
    for key, value in comp["exports"].items():
        _check_text_refs(value, "%s.exports.%s" % (path, key), REFS_EXPORTS, secret_names, None, errors)
    env_names = set(comp["env"]) | set(_injected_sources(components, name))
    for index, cfg in enumerate(comp["config_files"]):
        _check_text_refs(cfg["content"], "%s.config_files[%d].content" % (path, index), REFS_CONFIG,
                         secret_names, env_names, errors)


def _injected_sources(components: Mapping[str, dict], name: str) -> Dict[str, List[str]]:
    """Export key -> the dependencies of ``name`` that export it (sorted)."""
    sources: Dict[str, List[str]] = {}
    for dep in sorted(components[name]["depends_on"]):
        if dep in components:
            for key in components[dep]["exports"]:
                sources.setdefault(key, []).append(dep)
    return sources


def _check_export_clashes(name: str, components: Dict[str, dict], errors: _Errors) -> None:
    for key, deps in sorted(_injected_sources(components, name).items()):
        if len(deps) > 1:
            errors.add("components.%s.depends_on" % name, "export %s is injected by both %s: rename it in one "
                       "of their exports" % (key, " and ".join(deps)))


def _check_health_port(name: str, comp: dict, errors: _Errors) -> None:
    health = comp["health"]
    if not health:
        return
    for kind in ("http", "tcp"):
        probe = health.get(kind)
        if probe and probe["port"] is not None:
            declared = [p["port"] for p in comp["ports"] if p["protocol"] == "tcp"]
            if probe["port"] not in declared:
                errors.add("components.%s.health.%s.port" % (name, kind), "port %d is not one of the component's "
                           "tcp ports (%s); declare it under ports" % (probe["port"], ", ".join(map(str, declared)) or "none"))


def _check_volume_names(components: Dict[str, dict], errors: _Errors) -> None:
    owner: Dict[str, str] = {}
    for name in components:
        for index, volume in enumerate(components[name]["volumes"]):
            other = owner.get(volume["name"])
            if other is not None:
                errors.add("components.%s.volumes[%d].name" % (name, index),
                           "volume %r is already used by component %s; volume names are unique in the "
                           "application (a volume belongs to one component)" % (volume["name"], other))
            else:
                owner[volume["name"]] = name


def _check_published_ports(components: Dict[str, dict], errors: _Errors) -> None:
    owner: Dict[Tuple[int, str], str] = {}
    for name in components:
        for index, port in enumerate(components[name]["ports"]):
            if port["publish"] is None:
                continue
            key = (port["publish"], port["protocol"])
            if key in owner:
                errors.add("components.%s.ports[%d].publish" % (name, index), "host port %d/%s is already "
                           "published by %s" % (key[0], key[1], owner[key]))
            else:
                owner[key] = "%s.ports[%d]" % (name, index)


# ---------------------------------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------------------------------

def load_model(data: object, source: str = "app.yml") -> dict:
    """Validate and normalise a parsed app.yml; raise one ModelError listing every problem."""
    errors = _Errors()
    top = _mapping(data, "", errors, "a mapping (the application model)")
    if top is None:
        raise ModelError(errors.items, source)
    _check_fields(top, TOP_FIELDS, "", errors)
    if top.get("apiVersion") != API_VERSION:
        errors.add("apiVersion", "expected %r, got %r" % (API_VERSION, top.get("apiVersion")))
    if top.get("kind") != KIND:
        errors.add("kind", "expected %r, got %r" % (KIND, top.get("kind")))
    if "name" not in top:
        errors.add("name", "required: the application name, e.g. shop")
    name = _check_name(top.get("name"), "name", errors, "application name") if "name" in top else None
    version = _load_version(top, errors)
    description = _load_description(top, "description", errors)
    secret_specs = _load_secrets(top.get("secrets"), errors)
    components = _load_components(top.get("components"), errors)
    modules = _load_modules(top.get("modules"), components, errors)
    secret_names = _declared_names(top.get("secrets"))
    _check_graph(components, errors)
    _resolve_conditions(components, errors)
    for comp_name, comp in components.items():
        _check_job(comp_name, comp, errors)
        _check_component_refs(comp_name, comp, components, secret_names, errors)
        _check_export_clashes(comp_name, components, errors)
        _check_health_port(comp_name, comp, errors)
    _check_volume_names(components, errors)
    _check_published_ports(components, errors)
    if errors.items:
        raise ModelError(errors.items, source)
    return {
        "apiVersion": API_VERSION,
        "kind": KIND,
        "name": name,
        "version": version,
        "description": description,
        "secrets": secret_specs,
        "modules": modules,
        "components": components,
    }


def _load_modules(data: object, components: Mapping[str, dict], errors: _Errors) -> Dict[str, dict]:
    """Optional modules: named groups of components a site turns on or off (``default``: on when the site says
    nothing). A component belongs to at most one module; components in none always run."""
    result: Dict[str, dict] = {}
    if data is None:
        return result
    mapping = _mapping(data, "modules", errors, "a mapping of module name: {components, default, description}")
    if mapping is None:
        return result
    owner: Dict[str, str] = {}
    for name, spec in mapping.items():
        path = _join("modules", str(name))
        if _check_name(name, path, errors, "module name") is None:
            continue
        spec = _mapping(spec, path, errors, "a mapping {components, default, description}")
        if spec is None:
            continue
        _check_fields(spec, MODULE_FIELDS, path, errors)
        members = spec.get("components")
        if not isinstance(members, list) or not members:
            errors.add(_join(path, "components"), "required: a list of the components the module turns on or off")
            members = []
        for index, member in enumerate(members):
            item_path = "%s[%d]" % (_join(path, "components"), index)
            if member not in components:
                errors.add(item_path, "%r is not a component; components: %s"
                           % (member, ", ".join(sorted(components))))
            elif member in owner:
                errors.add(item_path, "component %s is already in module %s (a component belongs to one module)"
                           % (member, owner[member]))
            else:
                owner[member] = str(name)
        default = spec.get("default", False)
        if not isinstance(default, bool):
            errors.add(_join(path, "default"), "expected true or false (on when the site says nothing), got %r"
                       % (default,))
        result[str(name)] = {"description": _load_description(spec, _join(path, "description"), errors),
                             "components": [str(m) for m in members], "default": default is True}
    return result


def select_modules(model: dict, choices: Mapping[str, object], *,
                   asked: Iterable[str] = ()) -> Tuple[dict, Dict[str, bool]]:
    """The model as this site runs it: the components of modules that are off left out.

    ``choices`` (module -> on/off, the site's) override each module's default; names the model does not know
    are ignored (a choice kept for a later release), except those ``asked`` for now, which are refused. A
    running component that depends on one that is off is refused, naming both. Returns (the selected model,
    module -> on)."""
    modules = model.get("modules") or {}
    errors = _Errors()
    for name in sorted(set(asked) - set(modules)):
        errors.add("modules.%s" % name, "%s %s has no module %s; modules: %s" % (
            model["name"], model["version"], name, ", ".join(sorted(modules)) or "none"))
    on: Dict[str, bool] = {}
    for name, module in sorted(modules.items()):
        value = choices.get(name, module["default"])
        if not isinstance(value, bool):
            errors.add("modules.%s" % name, "expected true or false, got %r" % (value,))
            value = module["default"]
        on[name] = value
    components = model["components"]
    owner = {c: name for name, module in modules.items() for c in module["components"]}
    running = {c for c in components if on.get(owner.get(c, ""), True)}
    for name in sorted(running):
        for dep in sorted(set(components[name]["depends_on"]) - running):
            if name in owner:
                fix = "turn %s on too, or turn %s off" % (owner[dep], owner[name])
                who = "component %s (module %s)" % (name, owner[name])
            else:
                fix = "turn %s on (%s is outside every module, so it always runs)" % (owner[dep], name)
                who = "component %s" % name
            errors.add("modules.%s" % owner[dep], "%s depends on %s of module %s, which is off: %s"
                       % (who, dep, owner[dep], fix))
    if errors.items:
        raise ModelError(errors.items)
    selected = dict(model)
    selected["components"] = {c: comp for c, comp in components.items() if c in running}
    selected["modules"] = {name: module for name, module in modules.items() if on[name]}
    return selected, on


def _declared_names(data: object) -> Dict[str, object]:
    """Secret names as written, so a bad secret spec does not also make every reference to it an error."""
    return {k: None for k in data} if isinstance(data, dict) else {}


def _load_version(top: Mapping, errors: _Errors) -> Optional[str]:
    if "version" not in top:
        errors.add("version", "required: a semantic version such as 1.0.0")
        return None
    version = _string(top["version"], "version", errors)
    if version is not None and not SEMVER_RE.match(version):
        errors.add("version", "%r is not a semantic version (MAJOR.MINOR.PATCH[-prerelease][+build], "
                   "e.g. 1.2.0 or 2.0.0-rc.1)" % version)
        return None
    return version


def _load_components(data: object, errors: _Errors) -> Dict[str, dict]:
    components: Dict[str, dict] = {}
    if data is None:
        errors.add("components", "required: a mapping of component name: component (at least one)")
        return components
    mapping = _mapping(data, "components", errors, "a mapping of component name: component")
    if mapping is None:
        return components
    if not mapping:
        errors.add("components", "at least one component is required")
    for comp_name, comp_data in mapping.items():
        path = _join("components", str(comp_name))
        if _check_name(comp_name, path, errors, "component name") is None:
            continue
        comp = _load_component(comp_data, path, errors)
        if comp is not None:
            components[comp_name] = comp
    return components


def dump_model(model: dict) -> dict:
    """The normalised model as plain data (a deep copy), ready for canonical JSON."""
    return copy.deepcopy(model)


def start_order(model: dict) -> List[List[str]]:
    """Topological levels: every component comes after all it depends on; names sorted in a level."""
    components = model["components"]
    remaining = {name: set(comp["depends_on"]) for name, comp in components.items()}
    levels: List[List[str]] = []
    done: set = set()
    while remaining:
        level = sorted(name for name, deps in remaining.items() if deps <= done)
        if not level:
            cycle = _find_cycle({n: components[n] for n in remaining})
            raise ModelError([("components", "dependency cycle: %s" % " -> ".join(cycle or sorted(remaining)))])
        levels.append(level)
        done.update(level)
        for name in level:
            del remaining[name]
    return levels


def effective_env(model: dict, component: str, *, secrets: Mapping[str, str], hosts: Mapping[str, str],
                  overrides: Optional[Mapping[str, object]] = None) -> Dict[str, str]:
    """The env a component runs with, all references resolved.

    Precedence (lowest first): exports of its dependencies (``${host}`` = ``hosts[dependency]``), its own
    env defaults, then the site's ``overrides`` (which may use ``${secrets.NAME}`` too).
    """
    components = model["components"]
    if component not in components:
        raise ModelError([("components", "no component %r; components: %s" % (component, ", ".join(sorted(components))))])
    comp = components[component]
    env: Dict[str, str] = {}
    errors = _Errors()
    for dep in sorted(comp["depends_on"]):
        if not components[dep]["exports"]:
            continue
        if dep not in hosts:
            errors.add("components.%s.depends_on.%s" % (component, dep),
                       "no host given for dependency %s (needed for its exports)" % dep)
            continue
        for key, value in components[dep]["exports"].items():
            _resolve_into(env, key, value, "components.%s.exports.%s" % (dep, key), errors,
                          secrets=secrets, host=hosts[dep])
    for key, value in comp["env"].items():
        _resolve_into(env, key, value, "components.%s.env.%s" % (component, key), errors, secrets=secrets)
    for key, value in (overrides or {}).items():
        path = "overrides.%s.%s" % (component, key)
        if not isinstance(key, str) or not ENV_KEY_RE.match(key):
            errors.add(path, "invalid variable name %r: expected [A-Za-z_][A-Za-z0-9_]*" % (key,))
            continue
        text = _env_scalar(value, path, errors)
        if text is not None:
            _resolve_into(env, key, text, path, errors, secrets=secrets)
    if errors.items:
        raise ModelError(errors.items)
    return env


def _resolve_into(env: Dict[str, str], key: str, value: str, path: str, errors: _Errors, **kwargs: Any) -> None:
    try:
        resolved = interpolate(value, field=path, **kwargs)
    except ModelError as exc:
        errors.items.extend(exc.errors)
        return
    # A secret or host value from the site could carry a newline into an EnvironmentFile: refuse it.
    if _check_no_injection(resolved, path, errors, "resolved value"):
        env[key] = resolved


def render_config(model: dict, component: str, file_index: int, *, env: Mapping[str, str],
                  secrets: Mapping[str, str]) -> str:
    """The content of one config file with ${env.NAME} and ${secrets.NAME} resolved."""
    files = model["components"][component]["config_files"]
    if not 0 <= file_index < len(files):
        raise ModelError([("components.%s.config_files" % component,
                           "no config file #%d (the component has %d)" % (file_index, len(files)))])
    return interpolate(files[file_index]["content"], secrets=secrets, env=env,
                       field="components.%s.config_files[%d].content" % (component, file_index))


def image_refs(model: dict) -> Dict[str, str]:
    """Component name -> image reference."""
    return {name: comp["image"] for name, comp in model["components"].items()}


def _field_diff(old: object, new: object, path: str, out: List[str]) -> None:
    """Dotted paths where two normalised values differ (mappings descend, lists compare whole)."""
    if isinstance(old, dict) and isinstance(new, dict):
        for key in sorted(set(old) | set(new), key=str):
            _field_diff(old.get(key, _MISSING), new.get(key, _MISSING), _join(path, str(key)), out)
    elif old != new:
        out.append(path)


_MISSING = object()


def _injected_templates(model: dict, name: str) -> Dict[str, str]:
    comps = model["components"]
    return {key: comps[deps[0]]["exports"][key] for key, deps in _injected_sources(comps, name).items()}


def diff_models(old: dict, new: dict) -> dict:
    """Compare two normalised models component by component.

    A component is changed when any normalised field other than ``description`` differs, or when the
    exports injected into it by its dependencies differ (reported as ``injected.KEY``).
    """
    old_comps, new_comps = old["components"], new["components"]
    changed: Dict[str, List[str]] = {}
    unchanged: List[str] = []
    env_defaults: Dict[str, dict] = {}
    for name in sorted(set(old_comps) & set(new_comps)):
        fields: List[str] = []
        before = {k: v for k, v in old_comps[name].items() if k != "description"}
        after = {k: v for k, v in new_comps[name].items() if k != "description"}
        before["kind"], after["kind"] = component_kind(before), component_kind(after)
        _field_diff(before, after, "", fields)
        _field_diff(_injected_templates(old, name), _injected_templates(new, name), "injected", fields)
        if fields:
            changed[name] = fields
        else:
            unchanged.append(name)
        env_change = _env_default_changes(old_comps[name]["env"], new_comps[name]["env"])
        if env_change:
            env_defaults[name] = env_change
    return {
        "added": sorted(set(new_comps) - set(old_comps)),
        "removed": sorted(set(old_comps) - set(new_comps)),
        "changed": changed,
        "unchanged": unchanged,
        "env_defaults": env_defaults,
        "secrets": {
            "added": sorted(set(new["secrets"]) - set(old["secrets"])),
            "removed": sorted(set(old["secrets"]) - set(new["secrets"])),
        },
    }


def _env_default_changes(old: Mapping[str, str], new: Mapping[str, str]) -> Dict[str, dict]:
    return {key: {"old": old.get(key), "new": new.get(key)}
            for key in sorted(set(old) | set(new)) if old.get(key) != new.get(key)}


def generate_secret(spec: Mapping[str, object]) -> str:
    """A fresh random secret for a (normalised or raw) secret spec, from the OS's CSPRNG."""
    errors = _Errors()
    checked = _check_secret_spec(dict(spec), "secret", errors)
    if checked is None:
        raise ModelError(errors.items)
    alphabet = SECRET_CHARSETS[checked["charset"]]
    return "".join(_secrets_module.choice(alphabet) for dummy in range(checked["length"]))
