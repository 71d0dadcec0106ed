"""docs/protocol.md is generated from the protocol models and must not go stale."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_protocol_doc_matches_the_models() -> None:
    done = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "gen-protocol-doc"), "--check"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr


def test_every_reason_code_has_a_sentence_in_the_protocol_doc() -> None:
    from protocol.messages import ReasonCode

    text = (REPO / "docs" / "protocol.md").read_text()
    for code in ReasonCode:
        assert f"| `{code.value}` |" in text, code


def test_every_test_the_docs_cite_exists() -> None:
    cited = set()
    for doc in (REPO / "docs").glob("*.md"):
        cited |= set(re.findall(r"(tests/[\w/]+\.py)::(test_\w+)", doc.read_text()))
    assert len(cited) > 30
    missing = [
        f"{path}::{name}"
        for path, name in sorted(cited)
        if not (REPO / path).is_file() or f"def {name}(" not in (REPO / path).read_text()
    ]
    assert missing == []
