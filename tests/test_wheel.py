"""The built wheel works away from the checkout: it carries the profiles, the app's stylesheet and the
demo data, and answers the smoke commands (the README's promise that `pip install` of the wheel works).

The wheel is installed with --no-deps into a folder of its own; the test's interpreter supplies torch,
transformers and the rest, and the checkout is neither the working directory nor on the path."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT

tomllib = pytest.importorskip("tomllib")  # Python 3.11+

pytestmark = pytest.mark.slow


def test_pyproject_names_every_package():
    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {".".join(p.parent.relative_to(ROOT).parts) for top in ("advisor", "runner")
             for p in (ROOT / top).rglob("__init__.py")}
    assert found <= listed, f"add to [tool.setuptools] packages in pyproject.toml: {sorted(found - listed)}"


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w",
                    str(tmp / "dist"), str(ROOT)], check=True, capture_output=True, cwd=ROOT)
    (wheel,) = (tmp / "dist").glob("tuneplan-*.whl")
    site = tmp / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(site), str(wheel)],
                   check=True, capture_output=True)
    away = tmp / "elsewhere"
    away.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "TUNEPLAN_GPUS")}
    env.update(PYTHONPATH=str(site), HF_HUB_OFFLINE="1", HOME=str(away), COLUMNS="200")  # no user GPU file either
    return site, away, env


def run(installed, *args: str) -> subprocess.CompletedProcess:
    site, away, env = installed
    return subprocess.run([sys.executable, "-m", "advisor.launcher", *args], cwd=away, env=env,
                          capture_output=True, text=True, timeout=300)


def test_the_installed_copy_is_the_wheel_not_the_checkout(installed):
    site, away, env = installed
    out = subprocess.run([sys.executable, "-c", "import advisor, runner; print(advisor.__file__, runner.__file__)"],
                         cwd=away, env=env, capture_output=True, text=True, check=True).stdout
    assert all(Path(p).is_relative_to(site) for p in out.split()), out
    assert (site / "advisor" / "profiles" / "gpus.yaml").is_file()
    assert (site / "advisor" / "tui" / "tuneplan.tcss").is_file()
    assert (site / "runner" / "demo_data" / "instructions.jsonl").is_file()
    assert (site / "bin" / "tuneplan").is_file()


def test_profiles_estimate_recommend_from_the_wheel(installed):
    r = run(installed, "profiles")
    assert r.returncode == 0 and "meta-llama/Llama-3.1-8B" in r.stdout, r.stderr
    r = run(installed, "profiles", "--gpus")
    assert r.returncode == 0 and "RTX 4090" in r.stdout, r.stderr
    r = run(installed, "estimate", "--model", "meta-llama/Llama-3.1-8B", "--gpu", "RTX 4090", "--json")
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout)
    assert res["model"]["params_total"] == 8_030_261_248 and res["gpu"]["status"] in ("fits", "tight", "oom")
    r = run(installed, "recommend", "--model", "Qwen/Qwen2.5-0.5B", "--gpu", "a100-80gb", "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["choice"]["method"] == "full"


def test_demo_data_check_and_the_app_from_the_wheel(installed):
    site, away, env = installed
    r = run(installed, "data", "check", str(site / "runner" / "demo_data" / "instructions.jsonl"), "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["valid_records"] > 0
    code = ("import asyncio\n"
            "from advisor.tui.app import make_app\n"
            "async def main():\n"
            "    app = make_app()\n"
            "    async with app.run_test(size=(160, 50)) as pilot:\n"
            "        await pilot.pause(0.5)\n"
            "        assert app.evaluation is not None and app.evaluation.ok, app.evaluation\n"
            "        print('app ok', app.evaluation.status)\n"
            "asyncio.run(main())\n")
    r = subprocess.run([sys.executable, "-c", code], cwd=away, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and "app ok" in r.stdout, r.stderr[-2000:]
