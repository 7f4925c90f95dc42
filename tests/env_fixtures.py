"""Fixture trees for torch_wsl.env (tests/fixtures/env/<name>/, layout in torch_wsl/env/_fs.py)
and variants of them built in a temporary directory, shared by test_env.py and test_doctor.py."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from torch_wsl import env as E

FIXTURES = Path(__file__).parent / "fixtures" / "env"


def fx(name: str, environ: dict | None = None) -> E.Env:
    return E.Env(FIXTURES / name, environ)


def variant(
    tmp_path: Path, base: str, files: dict | None = None, remove: tuple = (), torch_facts: dict | None = None
) -> E.Env:
    """A copy of fixture ``base`` with files replaced/added/removed and torch facts updated."""
    root = tmp_path / base
    shutil.copytree(FIXTURES / base, root, symlinks=True)
    for rel in remove:
        (root / rel).unlink()
    for rel, content in (files or {}).items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(json.dumps(content) if isinstance(content, dict) else content)
    if torch_facts:
        tj = root / "_fixture" / "torch.json"
        tj.write_text(json.dumps({**json.loads(tj.read_text()), **torch_facts}))
    return E.Env(root)
