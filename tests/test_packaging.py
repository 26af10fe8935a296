"""Packaging: what "just the loss" needs, and what the extras cover.

``pip install rcfast`` pulls torch and nothing else; the loss (every variant and
backend that works here) must then import and run with no other third-party
module importable. Everything else is an extra, declared in pyproject.toml.
"""
import subprocess
import sys
import textwrap
import tomllib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# Third-party modules the extras bring; "just the loss" must not import any of them.
EXTRA_MODULES = ("numpy", "yaml", "tqdm", "sklearn", "PIL", "matplotlib", "nvidia", "ot", "scipy", "triton")

BLOCKER = textwrap.dedent(f"""
    import importlib.abc, sys
    BLOCKED = set({EXTRA_MODULES!r})

    class Blocker(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path, target=None):
            if name.split(".")[0] in BLOCKED:
                raise ModuleNotFoundError(f"No module named {{name!r}} (blocked by the test)", name=name)

    sys.meta_path.insert(0, Blocker())
""")


def _pyproject() -> dict:
    return tomllib.loads((REPO / "pyproject.toml").read_text())


def test_the_loss_depends_on_torch_alone():
    project = _pyproject()["project"]
    assert [dep.split(">")[0].split("=")[0].strip() for dep in project["dependencies"]] == ["torch"]
    assert project["dependencies"] == ["torch>=2.6"]


def test_extras_cover_the_optional_features():
    extras = _pyproject()["project"]["optional-dependencies"]
    names = {extra: {dep.split(";")[0].split(">")[0].split("=")[0].strip().lower() for dep in deps}
             for extra, deps in extras.items()}
    assert {"pyyaml", "tqdm", "scikit-learn", "matplotlib", "rcfast[data]"} <= names["train"]
    assert {"pillow", "simplejpeg", "threadpoolctl", "nvidia-dali-cuda120"} <= names["data"]
    assert names["ot"] == {"pot"}
    assert extras["all"] == ["rcfast[train,data,ot,triton]"]


@pytest.mark.slow  # a fresh Python subprocess
def test_the_loss_runs_with_no_extra_installed():
    script = BLOCKER + textwrap.dedent("""
        import torch, rcfast
        student = torch.randn(4, 10, requires_grad=True)
        teacher = torch.randn(4, 10)
        for backend in rcfast.available_backends():
            loss = rcfast.multihead_kd_loss(student, teacher, splits=[3, 7], backend=backend)
            loss.backward()
        rcfast.MultiHeadKDLoss(splits=[3, 7])(student, teacher)
        leaked = sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED)
        assert not leaked, leaked
        print("ok", rcfast.available_backends())
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=REPO)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("ok ['reference', 'cpu'")
