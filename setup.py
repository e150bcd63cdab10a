"""Build hook: install ``hf_splitquant_autoload.pth`` into site-packages (everything else is in pyproject.toml).

The ``.pth`` file runs ``_hf_splitquant_autoload.install()`` at interpreter start, so that transformers
finds the ``splitquant`` quantization method without ``import hf_splitquant`` (see that module).
setuptools has no declarative way to put a file at the root of site-packages, so a build sub-command
does it: into ``build_lib`` for a wheel (``pip install .``), and straight into the editable wheel for
``pip install -e .`` (whose build_lib is not shipped; setuptools points ``install_lib`` at the editable
wheel's contents).
"""

from __future__ import annotations

import os

from setuptools import Command, setup
from setuptools.command.build import build

PTH_FILE = "hf_splitquant_autoload.pth"


class build_autoload_pth(Command):  # noqa: N801 - setuptools command names are lowercase
    """Copy :data:`PTH_FILE` to the root of the built distribution."""

    description = "install the hf_splitquant autoload .pth file"
    user_options: list = []
    editable_mode = False

    def initialize_options(self) -> None:
        self.build_lib = None
        self.editable_mode = False

    def finalize_options(self) -> None:
        self.set_undefined_options("build_py", ("build_lib", "build_lib"))

    def _target(self) -> str:
        if self.editable_mode:
            return self.get_finalized_command("install").install_lib
        return self.build_lib

    def run(self) -> None:
        self.copy_file(PTH_FILE, os.path.join(self._target(), PTH_FILE))

    def get_outputs(self) -> list[str]:
        return [os.path.join(self.build_lib, PTH_FILE)]

    def get_source_files(self) -> list[str]:
        return [PTH_FILE]


class build_with_autoload(build):  # noqa: N801
    sub_commands = [*build.sub_commands, ("build_autoload_pth", None)]


setup(cmdclass={"build": build_with_autoload, "build_autoload_pth": build_autoload_pth})
