"""What the wheel installs: anim_jax (with the recipes the library needs at run time) and
data_pipelines, and no generic top-level `configs` package; config files are loaded by path."""

import ast
import pathlib
import tomllib

import setuptools

from anim_jax import configlib

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_configs_is_not_an_installed_package():
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    include = pyproject["tool"]["setuptools"]["packages"]["find"]["include"]
    packages = setuptools.find_packages(where=str(ROOT), include=include)
    assert "anim_jax.recipes" in packages and "data_pipelines" in packages
    assert not [p for p in packages if p.split(".")[0] not in ("anim_jax", "data_pipelines")], packages
    assert not (ROOT / "configs" / "__init__.py").exists()


def test_the_library_never_imports_configs():
    offenders = []
    for path in [*(ROOT / "anim_jax").rglob("*.py"), *(ROOT / "data_pipelines").rglob("*.py")]:
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else [])
            offenders += [f"{path.relative_to(ROOT)}:{node.lineno}" for n in names if n.split(".")[0] == "configs"]
    assert not offenders, offenders


def test_config_files_load_by_path():
    for spec, stage in (("configs/stage1.py:tiny", 1), ("configs/stage2.py:tiny", 2), ("configs/demo.py:stage2,quick", 2)):
        assert configlib.load_config(str(ROOT / spec)).stage == stage
