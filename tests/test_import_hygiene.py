import subprocess
import sys

from conftest import ROOT


def _modules_after(code: str) -> set[str]:
    out = subprocess.run([sys.executable, "-c", code + "\nimport sys; print(' '.join(sys.modules))"],
                         cwd=ROOT, capture_output=True, text=True, check=True)
    return set(out.stdout.split())


def test_advisor_never_imports_textual():
    mods = _modules_after("import advisor.spec, advisor.model, advisor.memory, advisor.gpus, advisor.cli")
    assert "textual" not in mods


def test_estimate_of_a_bundled_profile_does_not_import_torch():
    code = ("from advisor.cli.main import main\n"
            "import contextlib, io\n"
            "with contextlib.redirect_stdout(io.StringIO()):\n"
            "    main(['estimate', '--model', 'meta-llama/Llama-3.1-8B', '--json'])")
    mods = _modules_after(code)
    assert "torch" not in mods and "transformers" not in mods
