"""Generate Python gRPC stubs from proto/generate.proto into worker/pb/ (never committed)."""
import os
import re
import sys


def main() -> int:
    from grpc_tools import protoc  # imported here so a missing grpcio-tools gives a clear error

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = os.path.join(root, "worker", "pb")
    os.makedirs(out, exist_ok=True)
    include = os.path.join(os.path.dirname(protoc.__file__), "_proto")
    rc = protoc.main(["grpc_tools.protoc", f"-I{os.path.join(root, 'proto')}", f"-I{include}",
                      f"--python_out={out}", f"--grpc_python_out={out}", "generate.proto"])
    if rc != 0:
        print("protoc failed", file=sys.stderr)
        return rc
    grpc_file = os.path.join(out, "generate_pb2_grpc.py")
    with open(grpc_file) as f:  # make the generated import package-relative
        text = re.sub(r"^import generate_pb2", "from . import generate_pb2", f.read(), flags=re.M)
    with open(grpc_file, "w") as f:
        f.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
