"""Regenerate the committed gRPC stubs from ``proto/``, or check that they are current.

    python -m dhow.protocols.grpc.codegen --write   # rewrite generated/
    python -m dhow.protocols.grpc.codegen --check   # exit 1, naming the stale files

protoc writes flat imports (``import model_config_pb2``) and registers descriptors in protobuf's
default pool; both are rewritten here so the stubs import as a package and live in their own pool
(see ``generated/__init__.py``). Needs ``grpcio-tools`` (a dev dependency).
"""

from __future__ import annotations

import argparse
import re
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
PROTO_DIR = HERE / "proto"
GENERATED_DIR = HERE / "generated"
PACKAGE = "dhow.protocols.grpc.generated"
PROTOS = ("model_config.proto", "grpc_service.proto")
#: the protos that define a service, and so get a ``*_pb2_grpc.py``
SERVICE_PROTOS = ("grpc_service.proto",)

_FLAT_IMPORT = re.compile(r"^import (\w+_pb2) as (\w+)$", re.MULTILINE)
_DEFAULT_POOL = "_descriptor_pool.Default().AddSerializedFile("
_BUILDER_IMPORT = "from google.protobuf.internal import builder as _builder\n"


def generated_names() -> list[str]:
    """The files ``--write`` produces, relative to ``generated/``."""
    names = [f"{stem}_pb2{suffix}" for stem in _stems(PROTOS) for suffix in (".py", ".pyi")]
    names += [f"{stem}_pb2_grpc.py" for stem in _stems(SERVICE_PROTOS)]
    return sorted(names)


def _stems(protos: tuple[str, ...]) -> list[str]:
    return [proto.removesuffix(".proto") for proto in protos]


def generate(out_dir: Path) -> list[Path]:
    """Run protoc on ``proto/`` into ``out_dir`` and apply the fix-ups; return the files written."""
    # a dev dependency without type information, imported only when generating
    from grpc_tools import protoc  # type: ignore[import-untyped]

    args = [
        "grpc_tools.protoc",
        f"--proto_path={PROTO_DIR}",
        f"--python_out={out_dir}",
        f"--pyi_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        *(str(PROTO_DIR / proto) for proto in PROTOS),
    ]
    if protoc.main(args) != 0:
        raise RuntimeError(f"protoc failed on {', '.join(PROTOS)}")
    for stem in set(_stems(PROTOS)) - set(_stems(SERVICE_PROTOS)):
        # protoc writes a service module for every proto; one without services is only noise
        (out_dir / f"{stem}_pb2_grpc.py").unlink(missing_ok=True)
    paths = [out_dir / name for name in generated_names()]
    for path in paths:
        path.write_text(fix_up(path.name, path.read_text()))
    return paths


def fix_up(name: str, text: str) -> str:
    """Package-relative imports everywhere; in ``*_pb2.py`` also the private descriptor pool."""
    text = _FLAT_IMPORT.sub(rf"from {PACKAGE} import \1 as \2", text)
    if name.endswith("_pb2.py"):
        if _DEFAULT_POOL not in text or _BUILDER_IMPORT not in text:
            raise RuntimeError(f"{name}: protoc output changed shape; update codegen.fix_up")
        text = text.replace(_BUILDER_IMPORT, f"{_BUILDER_IMPORT}from {PACKAGE} import POOL as _POOL\n", 1)
        text = text.replace(_DEFAULT_POOL, "_POOL.AddSerializedFile(")
    return text


def stale_files() -> list[str]:
    """Generated files that are missing or differ from a fresh generation (empty: all current)."""
    with tempfile.TemporaryDirectory() as tmp:
        fresh_dir = Path(tmp)
        generate(fresh_dir)
        stale = []
        for name in generated_names():
            committed = GENERATED_DIR / name
            fresh = (fresh_dir / name).read_bytes()
            if not committed.exists() or committed.read_bytes() != fresh:
                stale.append(name)
        return stale


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dhow.protocols.grpc.codegen", description=__doc__)
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--write", action="store_true", help="regenerate the stubs in generated/")
    mode.add_argument("--check", action="store_true", help="exit 1 if the committed stubs are stale")
    options = parser.parse_args(argv)
    if options.write:
        for path in generate(GENERATED_DIR):
            print(f"wrote {path.relative_to(HERE.parent.parent.parent.parent)}")
        return 0
    stale = stale_files()
    if stale:
        print(
            f"stale gRPC stubs in {GENERATED_DIR}: {', '.join(stale)}; "
            "run: python -m dhow.protocols.grpc.codegen --write",
            file=sys.stderr,
        )
        return 1
    print("gRPC stubs are current")
    return 0


if __name__ == "__main__":
    sys.exit(main())
