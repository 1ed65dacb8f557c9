"""Build hook only (metadata lives in pyproject.toml): generate the protobuf stubs into worker/pb/."""

from __future__ import annotations

import importlib.util
import os

from setuptools import setup
from setuptools.command.build_py import build_py

HERE = os.path.dirname(os.path.abspath(__file__))


def generate_stubs(out: str) -> None:
    spec = importlib.util.spec_from_file_location("gen_proto", os.path.join(HERE, "scripts", "gen_proto.py"))
    assert spec is not None and spec.loader is not None
    gen_proto = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gen_proto)
    gen_proto.generate(out)


class BuildPyWithStubs(build_py):
    """A wheel gets the stubs in its build directory; an editable install (PEP 660), which imports
    worker/ from the source tree, gets them in the source tree's worker/pb/."""

    def run(self) -> None:
        if self.editable_mode:
            generate_stubs(os.path.join(HERE, "worker", "pb"))
        super().run()
        if not self.editable_mode:
            generate_stubs(os.path.join(self.build_lib, "worker", "pb"))


setup(cmdclass={"build_py": BuildPyWithStubs})
