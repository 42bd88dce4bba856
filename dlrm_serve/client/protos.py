"""Python stubs for TorchServe's gRPC API, generated from the installed server.

The ``.proto`` files are read from the frontend jar of the installed
``torchserve`` wheel (``ts/frontend/model-server.jar``), so the stubs always
match the server that runs; this repository holds no copy of them.

``make setup`` runs ``python -m dlrm_serve.client.protos`` once.  :func:`load`
generates the stubs on first use when they are missing or were made from
another jar or another grpcio-tools/protobuf, so a plain ``pip install -e .``
works too.

Layout of the generated folder (``dlrm_serve/client/_proto/``, git-ignored)::

    __init__.py
    inference_pb2.py  inference_pb2_grpc.py
    management_pb2.py management_pb2_grpc.py
    open_inference_grpc_pb2.py open_inference_grpc_pb2_grpc.py
                      TorchServe's Open Inference Protocol service
                      (org.pytorch.serve.grpc.openinference.GRPCInferenceService,
                      served when ts_open_inference_protocol=true)
    googleapis/google/rpc/status_pb2.py
    STAMP.json        what the stubs were made from

protoc's Python output imports other generated modules by their proto path.
The TorchServe files are compiled under the path ``dlrm_serve/client/_proto/``,
so they import each other as ``dlrm_serve.client._proto.*`` and put no top-level
``inference_pb2`` on ``sys.path``.  ``google/rpc/status.proto`` must stay
``google.rpc.status_pb2`` (``inference.proto`` imports it by that name), so
its folder is appended to ``sys.path``; an installed googleapis-common-protos
comes first and is used instead, which is the same message.

When the package folder is read-only the stubs go to a cache folder
(``$DLRM_SERVE_PROTO_DIR``, else ``~/.cache/dlrm-serve/proto``) and are
imported from there under the same module names.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib
import importlib.resources
import importlib.util
import json
import os
import shutil
import sys
import tempfile
import threading
import types
import zipfile
from importlib import metadata
from pathlib import Path

from dlrm_serve.errors import DLRMServeError, ToolchainError

__all__ = [
    "PROTO_MEMBERS",
    "PACKAGE",
    "default_dir",
    "find_jar",
    "read_protos",
    "generate",
    "is_current",
    "load",
    "main",
]

# Members of model-server.jar that make up the inference, management and OIP APIs.
PROTO_MEMBERS = {
    "inference": "proto/inference.proto",
    "management": "proto/management.proto",
    "open_inference": "proto/open_inference_grpc.proto",
    "status": "google/rpc/status.proto",
}
PACKAGE = "dlrm_serve.client._proto"
STAMP = "STAMP.json"
_GOOGLEAPIS = "googleapis"
_MODULES = (
    "inference_pb2",
    "inference_pb2_grpc",
    "management_pb2",
    "management_pb2_grpc",
    "open_inference_grpc_pb2",
    "open_inference_grpc_pb2_grpc",
)
_lock = threading.Lock()
_loaded: types.SimpleNamespace | None = None


def default_dir() -> Path:
    """The generated folder inside the package: ``dlrm_serve/client/_proto``."""
    return Path(__file__).resolve().parent / "_proto"


def _cache_dir() -> Path:
    env = os.environ.get("DLRM_SERVE_PROTO_DIR")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "dlrm-serve" / "proto"


def find_jar() -> Path:
    """``model-server.jar`` of the installed torchserve, without importing it."""
    spec = importlib.util.find_spec("ts")
    if spec is None or not spec.submodule_search_locations:
        raise ToolchainError(
            "torchserve is not installed, and the gRPC stubs are generated from its "
            "protocol files: pip install torchserve==0.12.0 (make setup does this)"
        )
    for root in spec.submodule_search_locations:
        jar = Path(root) / "frontend" / "model-server.jar"
        if jar.is_file():
            return jar
    raise ToolchainError(
        f"torchserve is installed at {list(spec.submodule_search_locations)} but has no "
        "frontend/model-server.jar; reinstall torchserve"
    )


def read_protos(jar: str | os.PathLike | None = None) -> dict[str, bytes]:
    """The ``.proto`` files out of the jar, keyed as in :data:`PROTO_MEMBERS`."""
    jar = Path(jar) if jar is not None else find_jar()
    out = {}
    try:
        with zipfile.ZipFile(jar) as zf:
            names = set(zf.namelist())
            for key, member in PROTO_MEMBERS.items():
                if member not in names:
                    raise ToolchainError(
                        f"{jar} holds no {member}; this torchserve does not ship the gRPC "
                        "protocol files dlrm-serve expects (it was written against 0.12.0)"
                    )
                out[key] = zf.read(member)
    except zipfile.BadZipFile as e:
        raise ToolchainError(f"{jar} is not a readable jar: {e}") from None
    return out


def _versions() -> dict[str, str]:
    out = {}
    for dist in ("grpcio-tools", "protobuf", "grpcio", "torchserve"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = ""
    return out


def _fingerprint(jar: Path) -> dict:
    st = jar.stat()
    return {"jar": str(jar), "jar_size": st.st_size, "jar_mtime_ns": st.st_mtime_ns, **_versions()}


def is_current(folder: str | os.PathLike, jar: str | os.PathLike | None = None) -> bool:
    """Whether ``folder`` holds stubs made from this jar with these tool versions."""
    folder = Path(folder)
    try:
        stamp = json.loads((folder / STAMP).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    jar = Path(jar) if jar is not None else find_jar()
    want = _fingerprint(jar)
    if any(stamp.get(k) != v for k, v in want.items()):
        return False
    return all((folder / f"{m}.py").is_file() for m in _MODULES)


def _protoc(args: list[str]) -> None:
    try:
        from grpc_tools import protoc
    except ImportError:
        raise ToolchainError(
            "grpcio-tools is not installed, and it generates the gRPC stubs: "
            "pip install grpcio-tools (make setup does this)"
        ) from None
    include = str(importlib.resources.files("grpc_tools") / "_proto")
    code = protoc.main(["grpc_tools.protoc", f"-I{include}", *args])
    if code != 0:
        raise ToolchainError(f"protoc failed with exit code {code} on {args[-3:]}")


def generate(out_dir: str | os.PathLike | None = None, jar: str | os.PathLike | None = None) -> Path:
    """Generate the stubs into ``out_dir`` (default :func:`default_dir`); returns it.

    The folder is built next to its destination and renamed into place, so a
    process that imports at the same time sees the old or the new stubs, not
    a half-written folder.
    """
    jar = Path(jar) if jar is not None else find_jar()
    out = Path(out_dir) if out_dir is not None else default_dir()
    protos = read_protos(jar)
    out.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=".proto-build-", dir=out.parent))
    try:
        src = work / "src"
        pkg_src = src / Path(*PACKAGE.split("."))
        pkg_src.mkdir(parents=True)
        (pkg_src / "inference.proto").write_bytes(protos["inference"])
        (pkg_src / "management.proto").write_bytes(protos["management"])
        (pkg_src / "open_inference_grpc.proto").write_bytes(protos["open_inference"])
        (src / "google" / "rpc").mkdir(parents=True)
        (src / "google" / "rpc" / "status.proto").write_bytes(protos["status"])
        gen = work / "gen"
        gen.mkdir()
        pkg_path = "/".join(PACKAGE.split("."))
        _protoc([
            f"-I{src}",
            f"--python_out={gen}",
            f"--grpc_python_out={gen}",
            f"{pkg_path}/inference.proto",
            f"{pkg_path}/management.proto",
            f"{pkg_path}/open_inference_grpc.proto",
        ])
        _protoc([f"-I{src}", f"--python_out={gen}", "google/rpc/status.proto"])
        final = work / "final"
        shutil.move(str(gen / Path(*PACKAGE.split("."))), str(final))
        rpc = final / _GOOGLEAPIS / "google" / "rpc"
        rpc.parent.mkdir(parents=True)
        shutil.move(str(gen / "google" / "rpc"), str(rpc))
        (final / "__init__.py").write_text(
            '"""Generated by dlrm_serve.client.protos from the installed torchserve; do not edit."""\n',
            encoding="utf-8",
        )
        stamp = {**_fingerprint(jar), "sha256": hashlib.sha256(b"".join(protos.values())).hexdigest()}
        (final / STAMP).write_text(json.dumps(stamp, indent=2) + "\n", encoding="utf-8")
        _swap_into_place(final, out, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return out


def _swap_into_place(new: Path, out: Path, work: Path) -> None:
    if out.exists():
        shutil.move(str(out), str(work / "old"))
    try:
        os.rename(new, out)
    except OSError:
        # Another process put its stubs there first; theirs are as good.
        if not out.exists():
            raise


def _writable(folder: Path) -> bool:
    parent = folder if folder.exists() else folder.parent
    return os.access(parent, os.W_OK)


def _ensure(folder: Path | None = None) -> Path:
    """A folder with current stubs: the package's own, else the cache folder."""
    jar = find_jar()
    candidates = [folder] if folder is not None else [default_dir(), _cache_dir()]
    for cand in candidates:
        if is_current(cand, jar):
            return cand
    for cand in candidates:
        if _writable(cand):
            return generate(cand, jar)
    raise ToolchainError(
        f"cannot write the gRPC stubs to any of {[str(c) for c in candidates]}; "
        "set DLRM_SERVE_PROTO_DIR to a writable folder"
    )


def load(folder: str | os.PathLike | None = None) -> types.SimpleNamespace:
    """The stub modules, generated first when missing or stale.

    Returns a namespace with ``inference_pb2``, ``inference_pb2_grpc``,
    ``management_pb2``, ``management_pb2_grpc``, ``open_inference_grpc_pb2``,
    ``open_inference_grpc_pb2_grpc`` and ``empty_pb2`` (for Ping).
    """
    global _loaded
    with _lock:
        if _loaded is not None:
            return _loaded
        where = _ensure(Path(folder) if folder is not None else None).resolve()
        googleapis = str(where / _GOOGLEAPIS)
        if googleapis not in sys.path:
            # Appended, so an installed googleapis-common-protos wins.
            sys.path.append(googleapis)
        if where != default_dir():
            # Stubs outside the package: serve them under the same module names.
            pkg = types.ModuleType(PACKAGE)
            pkg.__path__ = [str(where)]
            sys.modules[PACKAGE] = pkg
        importlib.invalidate_caches()
        mods = {m: importlib.import_module(f"{PACKAGE}.{m}") for m in _MODULES}
        from google.protobuf import empty_pb2

        _loaded = types.SimpleNamespace(empty_pb2=empty_pb2, folder=where, **mods)
        return _loaded


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m dlrm_serve.client.protos",
        description="Generate the gRPC stubs from the installed torchserve's protocol files.",
    )
    parser.add_argument("--out", default=None, help="folder to write (default: dlrm_serve/client/_proto)")
    parser.add_argument("--check", action="store_true", help="only say whether the stubs are current")
    args = parser.parse_args(argv)
    out = Path(args.out) if args.out else default_dir()
    try:
        if args.check:
            ok = is_current(out)
            print(f"{out}: {'current' if ok else 'missing or stale'}")
            return 0 if ok else 1
        generate(out)
    except DLRMServeError as e:
        print(f"dlrm_serve.client.protos: {e.message}", file=sys.stderr)
        return 2
    print(f"wrote gRPC stubs for torchserve {_versions()['torchserve']} to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
