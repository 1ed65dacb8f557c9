"""Generate the Python gRPC stubs from proto/generate.proto (never committed).

    python scripts/gen_proto.py                  # into worker/pb/ (what `make proto` and the build do)
    python scripts/gen_proto.py --out DIR        # elsewhere, e.g. stubs for the GPU machine

The stubs require at run time a grpcio at least as new as the grpcio-tools that generated them: the
pinned grpcio-tools (pyproject.toml) is the oldest grpcio we run on (the GPU image's).
"""

from __future__ import annotations

import argparse
import os
import re
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def generate(out: str, proto_dir: str = os.path.join(ROOT, "proto")) -> None:
    """Write generate_pb2.py and generate_pb2_grpc.py into `out`; raises RuntimeError if protoc fails."""
    from grpc_tools import protoc  # here, so that a missing grpcio-tools fails with a clear ImportError

    os.makedirs(out, exist_ok=True)
    include = os.path.join(os.path.dirname(protoc.__file__), "_proto")
    rc = protoc.main(
        [
            "grpc_tools.protoc",
            f"-I{proto_dir}",
            f"-I{include}",
            f"--python_out={out}",
            f"--grpc_python_out={out}",
            "generate.proto",
        ]
    )
    if rc != 0:
        raise RuntimeError(f"protoc failed with exit code {rc}")
    grpc_file = os.path.join(out, "generate_pb2_grpc.py")
    with open(grpc_file) as f:  # the stubs live in a package: make their import relative
        text = re.sub(r"^import generate_pb2", "from . import generate_pb2", f.read(), flags=re.M)
    with open(grpc_file, "w") as f:
        f.write(text)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=os.path.join(ROOT, "worker", "pb"), help="output directory")
    args = ap.parse_args()
    try:
        generate(args.out)
    except RuntimeError as exc:
        print(exc, file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
