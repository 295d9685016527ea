"""ftaudit runs with what pyproject.toml declares: an audit from the Hub, its cache and a fix import nothing else."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.hubserver import HubServer
from tests.models import card, folder_files, llama_like, low_rank_update, write_model

ROOT = Path(__file__).resolve().parent.parent

# Runs in a fresh interpreter: every installed distribution outside the declared dependencies and
# what they require is made unimportable, as it would be where only ftaudit was installed.
DECLARED_ONLY = r"""
import importlib.metadata as md, re, sys

def norm(name):
    return re.sub(r"[-_.]+", "-", name).lower()

def requirement(text):
    return norm(re.match(r"[A-Za-z0-9_.-]+", text).group(0))

with open(sys.argv[1]) as f:
    listed = re.search(r"^dependencies = \[(.*?)\]", f.read(), re.S | re.M).group(1)
todo = [requirement(r) for r in re.findall(r'"([^"]+)"', listed)]
needed = set()
while todo:
    name = todo.pop()
    if name in needed:
        continue
    needed.add(name)
    try:
        requires = md.requires(name) or []
    except md.PackageNotFoundError:
        continue
    todo += [requirement(r) for r in requires if "extra ==" not in r and "extra==" not in r]

blocked = {module for module, dists in md.packages_distributions().items()
           if module not in sys.stdlib_module_names and module != "ftaudit"
           and not any(norm(d) in needed for d in dists)}

class Undeclared:
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in blocked:
            raise ModuleNotFoundError(f"No module named {name!r} (not a declared dependency)", name=name)
        return None

sys.meta_path.insert(0, Undeclared())
from ftaudit.cli import main
sys.argv = ["ftaudit", *sys.argv[2:]]
main()
"""


def run_declared_only(*args: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", DECLARED_ONLY, str(ROOT / "pyproject.toml"), *map(str, args)],
                          capture_output=True, text=True, cwd=ROOT, timeout=300)


@pytest.fixture
def published(hub_env: HubServer, tmp_path: Path) -> Path:
    base = llama_like()
    base_dir = write_model(tmp_path / "base", base)
    tuned_dir = write_model(tmp_path / "tuned", low_rank_update(base), readme=card("org/base"))
    hub_env.add_repo("org/base", folder_files(base_dir))
    hub_env.add_repo("org/tuned", folder_files(tuned_dir))
    return tuned_dir


def test_an_audit_its_cache_and_a_fix_need_only_the_declared_dependencies(published, tmp_path):
    report = tmp_path / "report.json"
    for _ in ("cold", "warm"):
        done = run_declared_only("check", "org/tuned", "--json", report, "--quiet")
        assert done.returncode == 1, done.stderr
        assert json.loads(report.read_text())["summary"]["intruder_dimensions"] > 0
    done = run_declared_only("fix", published, "--base", published.parent / "base", "--out", tmp_path / "fixed",
                             "--quiet")
    assert done.returncode in (0, 1), done.stderr
    assert (tmp_path / "fixed" / "model.safetensors").is_file()


def test_undeclared_modules_are_really_kept_out():
    done = subprocess.run(
        [sys.executable, "-c", DECLARED_ONLY.replace("from ftaudit.cli import main", "import peft"),
         str(ROOT / "pyproject.toml")], capture_output=True, text=True, timeout=300)
    assert re.search(r"No module named 'peft' \(not a declared dependency\)", done.stderr), done.stderr
