"""The wheel carries the agent: agents/farm_agent.py (its one copy, at the top of the tree) is
copied into the built package as farm/_agent/farm_agent.py, where farm.hosts.agent looks first.
Everything else about the package is declared in pyproject.toml."""

from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

AGENT = Path("agents") / "farm_agent.py"


class BuildWithAgent(build_py):
    def run(self) -> None:
        super().run()
        if not self.editable_mode:  # an editable install finds agents/ in its source tree
            target = Path(self.build_lib) / "farm" / "_agent"
            self.mkpath(str(target))
            self.copy_file(str(AGENT), str(target / AGENT.name))


setup(cmdclass={"build_py": BuildWithAgent})
