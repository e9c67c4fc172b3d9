"""Project layout rules: import direction, no shadowing of Hugging Face `datasets`, valid shipped configs."""

import subprocess
import sys

import pytest

from conftest import ROOT


def test_datasets_folder_has_no_init():
    assert not (ROOT / "datasets" / "__init__.py").exists()


def test_import_adapt_does_not_import_recipes_or_local_datasets():
    code = (
        "import sys, adapt, adapt.cli, adapt.lora, adapt.data, adapt.objective, adapt.model, adapt.sample, adapt.cache\n"
        "bad = [m for m in sys.modules if m == 'recipes' or m.startswith('recipes.')]\n"
        "import datasets\n"
        "assert 'site-packages' in datasets.__file__, datasets.__file__\n"
        "assert hasattr(datasets, 'load_dataset')\n"
        "print('BAD', bad)\n"
    )
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "BAD []" in r.stdout


def test_adapt_sources_never_import_recipes():
    for f in (ROOT / "adapt").rglob("*.py"):
        text = f.read_text()
        assert "import recipes" not in text and "from recipes" not in text, f


@pytest.mark.parametrize("path", sorted((ROOT / "recipes" / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_configs_validate(path):
    from adapt import config
    first = path.read_text().splitlines()[0]
    assert first.startswith("#"), f"{path.name} must start with a comment giving its launch command"
    assert "launch" in path.read_text().split("\n\n")[0].lower() or "Launch" in path.read_text()
    cls = config.PretrainConfig if path.name.startswith("pretrain") else config.EvalConfig if path.stem.endswith("_eval") else config.RunConfig
    cfg = config.load(cls, path)
    assert cfg is not None


def test_floor_pins_match_the_lower_bounds():
    """`make test-floors` installs .ci/floors.txt: each `>=` bound of pyproject.toml, torch's included, is pinned there
    at that version, so the bounds users get are the ones CI tested."""
    import re
    import tomllib
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    bounds = {}
    for d in deps["dependencies"] + deps["optional-dependencies"]["test"]:
        m = re.fullmatch(r"([A-Za-z0-9_.-]+)>=([0-9.]+)", d)
        assert m, f"pyproject.toml: {d!r} is not a plain 'name>=version' bound"
        bounds[m[1].lower()] = m[2]
    pins = dict(line.split("==") for line in (ROOT / ".ci/floors.txt").read_text().split("\n")
                if line.strip() and not line.startswith("#"))
    from packaging.version import Version
    assert {k.lower(): Version(v) for k, v in pins.items()} == {k: Version(v) for k, v in bounds.items()}
