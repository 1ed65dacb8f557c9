"""qwen-worker: a sharded gRPC model worker serving Qwen (v1) with many LoRA adapters."""
import os
import subprocess
import sys

from setuptools import find_packages, setup
from setuptools.command.build_py import build_py


class BuildWithProto(build_py):
    """Generate the protobuf stubs into worker/pb/ before building (they are never committed)."""

    def run(self) -> None:
        here = os.path.dirname(os.path.abspath(__file__))
        try:
            subprocess.check_call([sys.executable, os.path.join(here, "scripts", "gen_proto.py")])
        except (subprocess.CalledProcessError, OSError) as exc:  # grpcio-tools missing: `make proto` later
            print(f"warning: protobuf stubs not generated ({exc}); run `make proto`", file=sys.stderr)
        super().run()


setup(
    name="qwen-worker",
    version="0.1.0",
    description="Sharded gRPC worker serving Qwen (v1) models with many LoRA adapters (LoRAX contract)",
    python_requires=">=3.10",
    packages=find_packages(include=["worker", "worker.*", "router_client", "router_client.*"]),
    install_requires=[
        "torch>=2.10",
        "safetensors>=0.4",
        "tiktoken>=0.6",
        "grpcio>=1.60",
        "protobuf>=4.25",
        "numpy",
        "tqdm",
        "regex",
    ],
    extras_require={
        "test": ["pytest>=8", "hypothesis>=6", "transformers>=4.45", "grpcio-tools>=1.60"],
        "gpu": ["triton>=3.2"],
    },
    entry_points={
        "console_scripts": [
            "qwen-worker=worker.cli:main",
            "qwen-launch=worker.launcher:main",
            "qwen-router=router_client.cli:main",
        ]
    },
    cmdclass={"build_py": BuildWithProto},
)
