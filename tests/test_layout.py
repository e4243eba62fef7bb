"""The house: the files a user copies stand alone, the top level depends on no tool at import, and no file
imports itself back through another (read from the syntax trees, every import counted, lazy ones too)."""

import ast
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import data
import model

ROOT = Path(__file__).resolve().parent.parent
TOP_LEVEL = sorted(p.stem for p in ROOT.glob("*.py"))
TOOLS = sorted(p.stem for p in (ROOT / "tools").glob("*.py") if p.stem != "__init__")
STANDALONE = {  # a file users copy -> what it needs beside it
    "loss": [],
    "model": [],
    "data": ["bpe_simple_vocab_16e6.txt.gz"],
}


def project_imports(path, lazy):
    """The project modules a file imports ('tools.scans' for a tool): at module level, or only inside a
    function or an `if` block when lazy=True."""
    tree = ast.parse(path.read_text())
    module_level = {id(node) for node in tree.body}
    names = set()
    for node in ast.walk(tree):
        if lazy == (id(node) in module_level) or not isinstance(node, ast.Import | ast.ImportFrom):
            continue
        if isinstance(node, ast.Import):
            found = [alias.name for alias in node.names]
        elif node.module == "tools":
            found = [f"tools.{alias.name}" for alias in node.names]
        else:
            found = [node.module or ""]
        names.update(name for name in found if name in TOP_LEVEL or name.startswith("tools."))
    return names


def all_imports(name):
    path = ROOT / (f"{name.replace('.', '/')}.py")
    return project_imports(path, lazy=False) | project_imports(path, lazy=True)


def test_the_layout_is_the_card_plus_configurator_protocol_and_predict():
    card = {"loss", "model", "data", "train", "evaluate", "export"}
    assert set(TOP_LEVEL) == card | {"configurator", "protocol", "predict"}
    assert set(TOOLS) == {
        "scans",
        "prepare",
        "synthetic",
        "cache",
        "quantize",
        "analysis",
        "sweep",
        "bench",
    }


@pytest.mark.parametrize("name", sorted(STANDALONE))
def test_a_copied_file_imports_alone(name, tmp_path):
    """Copied into an empty folder, with the project out of reach, the file imports and does its one job."""
    assert not all_imports(name), f"{name}.py imports {all_imports(name)}"
    for needed in [f"{name}.py", *STANDALONE[name]]:
        shutil.copy(ROOT / needed, tmp_path / needed)
    jobs = {
        "loss": "import torch; student = torch.eye(2), torch.eye(2), torch.tensor(1.0); "
        "print(loss.distill_loss(student, mode='none')['loss'].item() > 0)",
        "model": "import torch; m = model.create_model('demo_student'); "
        "print(m.encode_image(torch.zeros(1, 3, m.image_size, m.image_size)).shape[1] == m.embed_dim)",
        "data": "print(data.tokenize('fetal brain').shape[1] == data.CONTEXT_LENGTH)",
    }
    environment = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    process = subprocess.run(
        [sys.executable, "-c", f"import {name}; {jobs[name]}"],
        cwd=tmp_path,
        env=environment,
        capture_output=True,
    )
    assert process.returncode == 0 and process.stdout.decode().strip() == "True", (
        process.stderr.decode()[-2000:]
    )


def test_the_tokenizer_and_the_text_tower_agree_on_the_context():
    assert data.CONTEXT_LENGTH == model.CONTEXT_LENGTH


def test_the_top_level_imports_tools_only_lazily():
    for name in TOP_LEVEL:
        eager = {
            n for n in project_imports(ROOT / f"{name}.py", lazy=False) if n.startswith("tools.")
        }
        assert not eager, f"{name}.py imports {eager} at module level"


def test_no_file_imports_itself_back():
    """Every import, lazy or not: a cycle (export -> quantize -> export was one) is a file that cannot be read alone."""
    graph = {name: all_imports(name) for name in TOP_LEVEL + [f"tools.{t}" for t in TOOLS]}

    def reaches(start, goal, seen):
        for nxt in graph[start]:
            if nxt == goal or (nxt not in seen and reaches(nxt, goal, seen | {nxt})):
                return True
        return False

    cycles = [name for name in graph if reaches(name, name, {name})]
    assert not cycles, f"import cycles through {cycles}"
