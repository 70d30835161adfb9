"""The lab's committed models, loaded by name: ``mor_lab.load_pretrained("lab:vanilla")``.

Each model lives in ``<root>/<name>/seed<k>/`` (``root``: this folder, or ``$MOR_LAB_CHECKPOINTS``), as
``mor-lab train <name> --seed <k> --out <root>/<name>/seed<k>`` leaves it: 16-bit safetensors, its
config (``mor_config.json`` for the MoR family, ``mor_lab_config.json`` for a plain or relaxed
recursive ``Decoder``), the tokenizer, the held-out token blocks it was scored on
(``heldout.safetensors``) and the training log (``train.json``: the command that reproduces it, the
curve, the machine, and the held-out loss of the stored weights, which a reload reproduces).

``"lab:vanilla"`` is seed 0; ``"lab:vanilla@seed1"`` (or ``@1``) another seed.
"""
from __future__ import annotations

import os
import re
from pathlib import Path

import torch

FAMILY = ("vanilla", "recursive-3", "mor-expert-3", "mor-token-3")  # the lab's model family


def checkpoints_root() -> Path:
    """Where ``lab:`` names are looked up: ``$MOR_LAB_CHECKPOINTS``, else this package folder."""
    return Path(os.environ.get("MOR_LAB_CHECKPOINTS") or Path(__file__).parent)


def available(root: Path | None = None) -> list[str]:
    """The ``lab:`` names present (``name@seedK``), sorted."""
    root = root or checkpoints_root()
    found = []
    for directory in sorted(root.glob("*/seed*")):
        if directory.is_dir() and any((directory / f).exists() for f in ("mor_config.json", "mor_lab_config.json")):
            found.append(f"{directory.parent.name}@{directory.name}")
    return found


def parse_name(name: str) -> tuple[str, int]:
    """``"vanilla"`` -> ("vanilla", 0); ``"vanilla@seed1"`` or ``"vanilla@1"`` -> ("vanilla", 1)."""
    match = re.fullmatch(r"([A-Za-z0-9][\w.-]*)(?:@(?:seed)?(\d+))?", name.strip())
    if match is None:
        raise ValueError(f"bad lab model name {name!r}: use NAME or NAME@seedK, e.g. 'vanilla' or 'vanilla@seed1'")
    return match.group(1), int(match.group(2) or 0)


def model_dir(name: str, root: Path | None = None) -> Path:
    """The directory of ``lab:<name>``; a missing one is an error that says how to train it."""
    from ..models.hf import ModelLoadError
    member, seed = parse_name(name)
    root = root or checkpoints_root()
    directory = root / member / f"seed{seed}"
    if not directory.is_dir():
        present = available(root)
        hint = (f"the lab's models are {', '.join(FAMILY)}" if member not in FAMILY and
                member not in {p.split('@')[0] for p in present} else
                f"train it: python -m mor_lab.cli train {member} --size full --seed {seed} --out {directory}")
        raise ModelLoadError(f"no lab model {member!r} with seed {seed} in {root} ({hint}); present: "
                             f"{', '.join(present) or 'none'}")
    return directory


def load_dir(directory: str | Path, dtype=torch.float32, device=None):
    """The model saved in ``directory``: a ``MoRModel`` (``mor_config.json``) or a ``Decoder``."""
    from ..models.decoder import Decoder
    from ..models.hf import ModelLoadError
    from ..mor.model import MoRModel
    directory = Path(directory)
    if (directory / "mor_config.json").exists():
        model = MoRModel.load(directory)
    elif (directory / "mor_lab_config.json").exists():
        model = Decoder.load(directory)
    else:
        raise ModelLoadError(f"{directory} holds no mor_lab model (no mor_config.json or mor_lab_config.json)")
    model = model.to(dtype)
    return (model.to(device) if device is not None else model).eval()


def load_lab(name: str, *, dtype=torch.float32, device=None, with_tokenizer: bool = True):
    """(model, tokenizer) of ``lab:<name>`` (``name`` without the ``lab:`` prefix)."""
    from ..models.hf import load_tokenizer
    directory = model_dir(name)
    model = load_dir(directory, dtype, device)
    return model, load_tokenizer(directory) if with_tokenizer else None


def heldout_blocks(directory: str | Path) -> torch.Tensor:
    """``[n, T]`` the held-out token blocks a checkpoint's logged loss was measured on."""
    from safetensors.torch import load_file
    return load_file(str(Path(directory) / "heldout.safetensors"))["ids"].long()
