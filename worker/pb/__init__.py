"""Generated protobuf stubs (see scripts/gen_proto.py); the generated files are not committed."""
