"""docs/integration.md: its config snippets are what the agent accepts, its examples parse."""

from __future__ import annotations

import py_compile
import re
import subprocess
from pathlib import Path

import pytest

from agent.config import load_config

REPO = Path(__file__).resolve().parents[2]
DOC = REPO / "docs" / "integration.md"


@pytest.mark.parametrize(
    "snippet", re.findall(r"```toml\n(.*?)```", DOC.read_text(), re.S), ids=lambda s: s[:20]
)
def test_every_agent_toml_snippet_is_accepted_by_the_agent(snippet: str, tmp_path: Path) -> None:
    path = tmp_path / "agent.toml"
    path.write_text(f'device_id = "robot-1"\ndata_dir = "{tmp_path}"\n{snippet}')
    load_config(path)


def test_the_examples_parse_and_the_readme_links_the_doc(tmp_path: Path) -> None:
    py_compile.compile(
        str(REPO / "docs/examples/ros2_lifecycle_consumer.py"),
        cfile=str(tmp_path / "x.pyc"),
        doraise=True,
    )
    subprocess.run(["sh", "-n", str(REPO / "docs/examples/consumer.sh")], check=True)
    assert "(docs/integration.md)" in (REPO / "README.md").read_text()
    for link in re.findall(r"\]\((examples/[^)]+)\)", DOC.read_text()):
        assert (DOC.parent / link).is_file(), link
