"""The model a run trains from: a local model directory, or a hub id downloaded to the HF cache.

Training needs the weights, not just the config.json that estimates read, so the checks here are
stricter than :mod:`advisor.model`'s. Every failure is a :class:`ModelLoadError` that says what is
missing and what to do; the token for a gated repository comes from the environment (HF_TOKEN),
never the plan.
"""

from __future__ import annotations

from pathlib import Path

WEIGHT_PATTERNS = ("*.safetensors", "*.bin", "*.pt", "*.pth", "*.safetensors.index.json", "*.bin.index.json")


class ModelLoadError(ValueError):
    """The model reference cannot be loaded for training (no weights, no such directory...)."""


def looks_local(ref: str) -> bool:
    """A reference the user meant as a path: it exists, or it starts like one (./ ../ / ~)."""
    return Path(ref).expanduser().exists() or ref.startswith((".", "/", "~"))


def check_model_dir(p: Path, ref: str) -> Path:
    """``p`` if it is a model directory with config.json and weights, else ModelLoadError."""
    if p.is_file():
        raise ModelLoadError(f"model.ref {ref} is a file; training needs a model directory with config.json "
                             "and weights (a config.json alone is enough for estimates only)")
    if not p.is_dir():
        raise ModelLoadError(f"model directory {ref} does not exist")
    if not (p / "config.json").is_file():
        raise ModelLoadError(f"{ref} has no config.json; is it a transformers model directory?")
    if not any(any(p.glob(pat)) for pat in WEIGHT_PATTERNS):
        raise ModelLoadError(f"{ref} has a config.json but no weights (*.safetensors or *.bin); training "
                             "needs the weights (download them or save_pretrained the model there)")
    return p


def check_ref(ref: str) -> None:
    """What can be said about ``ref`` without downloading anything (ModelLoadError when wrong)."""
    if looks_local(ref):
        check_model_dir(Path(ref).expanduser(), ref)
    elif ref.count("/") != 1:
        raise ModelLoadError(f"model.ref {ref!r} is neither a local model directory nor a hub id (org/name); "
                             "bundled profiles hold no weights and cannot be trained")


def find_model_dir(ref: str, revision: str | None = None) -> Path:
    """A local directory with config.json and weights, or a hub id downloaded to the HF cache."""
    check_ref(ref)
    if looks_local(ref):
        return Path(ref).expanduser()
    try:
        from huggingface_hub import HfApi, snapshot_download

        files = HfApi().list_repo_files(ref, revision=revision)
        weights = ["*.safetensors"] if any(f.endswith(".safetensors") for f in files) else ["*.bin"]
        path = snapshot_download(ref, revision=revision,
                                 allow_patterns=["*.json", "*.model", "*.txt", "*.jinja", "tokenizer*", *weights])
    except Exception as e:  # noqa: BLE001 - offline, gated, no such repo: all the same to the user
        raise ModelLoadError(f"cannot download {ref} from the hub: {type(e).__name__}: {e}".splitlines()[0]) from None
    return check_model_dir(Path(path), ref)
