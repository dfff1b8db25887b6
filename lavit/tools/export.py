"""``lavit export``: a run's checkpoint as a folder that timm loads as it loads Hub weights.

    lavit export runs/base                       # its best (else last) checkpoint → runs/base/export/
    lavit export runs/base --push-to-hub my-name/lavit-cifar10   # and upload it (network, token)

timm's own ``save_for_hf`` writes ``model.safetensors`` (the EMA weights when the run kept them)
and ``config.json`` (architecture, label names, the model's arguments, the run's evaluation
preprocessing), ``push_to_hf_hub`` uploads them; the folder is then loaded back through timm and
its logits compared with the checkpoint's. Loading it (docs/training.md)::

    model = timm.create_model("local-dir:runs/base/export", pretrained=True)  # after `import lavit`
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import timm
import torch
from torch import nn

from lavit.errors import CheckpointError
from lavit.tools._cli import fail, tool_parser
from lavit.training.checkpoint_io import load_checkpoint_file
from lavit.training.trained import data_config, load_eval_model

PROG = "lavit export"
HUB_PROBE_TIMEOUT_S = 5.0


class ExportError(Exception):
    """The checkpoint cannot be exported or pushed as asked (the message says why, and what to do)."""


def find_checkpoint(path: str | Path) -> Path:
    """A checkpoint file as given, or a run directory's best checkpoint (else its ``last.ckpt``)."""
    path = Path(path)
    if path.is_file():
        return path
    folder = path / "checkpoints" if (path / "checkpoints").is_dir() else path
    if not folder.is_dir():
        raise ExportError(f"{path}: no such checkpoint file or run directory")
    found = sorted(folder.glob("best-*.ckpt"), key=os.path.getmtime) or list(
        folder.glob("last.ckpt")
    )
    if not found:
        raise ExportError(f"{path}: no best-*.ckpt or last.ckpt in {folder}")
    return found[-1]


def check_hub_push_possible(repo_id: str, timeout: float = HUB_PROBE_TIMEOUT_S) -> None:
    """Fail at once (``ExportError``) when a push to ``repo_id`` cannot work from here."""
    import huggingface_hub
    import huggingface_hub.constants

    problem = None
    if huggingface_hub.constants.HF_HUB_OFFLINE:
        problem = (
            "HF_HUB_OFFLINE is set; unset it on a machine with the network (the folder can be "
            "pushed later from there)"
        )
    elif huggingface_hub.get_token() is None:
        problem = "no Hugging Face token; set HF_TOKEN or run `hf auth login`"
    else:
        try:
            huggingface_hub.HfApi().model_info(repo_id, timeout=timeout)
        except huggingface_hub.errors.HfHubHTTPError:
            pass  # the Hub answered (a new repo is a 404): reachable
        except Exception as err:  # the transport's error classes differ between versions
            problem = (
                f"the Hugging Face Hub is unreachable from this machine ({type(err).__name__}: "
                f"{err}); export without --push-to-hub and push the folder from a machine with "
                "the network"
            )
    if problem:
        raise ExportError(f"--push-to-hub {repo_id}: {problem}")


def _same_logits(model: nn.Module, folder: Path, input_size: tuple[int, ...]) -> None:
    """Load ``folder`` back through timm and compare its logits with ``model``'s."""
    import lavit  # noqa: F401  (registers the lavit_* architectures)

    reloaded = timm.create_model(f"local-dir:{folder}", pretrained=True).eval()
    images = torch.randn(2, *input_size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected, got = model(images), reloaded(images)
    if not torch.allclose(expected, got, rtol=1e-4, atol=1e-5):
        raise ExportError(
            f"{folder}: timm rebuilds a model whose logits differ from the checkpoint's "
            f"(max |Δ| {float((expected - got).abs().max()):.3g}); the export is not usable"
        )


def export_checkpoint(
    checkpoint_path: str | Path,
    out: str | Path | None = None,
    ema: bool = True,
    push_to_hub: str | None = None,
    private: bool = False,
) -> Path:
    """Write ``out/model.safetensors`` and ``out/config.json`` (``out``: by default the run
    directory's ``export/``), optionally push them; returns ``out``."""
    from timm.models import push_to_hf_hub, save_for_hf

    if push_to_hub:
        check_hub_push_possible(push_to_hub)  # before any work
    path = find_checkpoint(checkpoint_path)
    try:
        checkpoint = load_checkpoint_file(path)
        model, used_ema = load_eval_model(checkpoint, ema)
    except CheckpointError as err:
        raise ExportError(str(err)) from None
    config = data_config(checkpoint)
    names = checkpoint.get("class_names")  # stored by `lavit fit`
    model_config = {"label_names": names} if names else None
    if names and len(names) != model.num_classes:
        raise ExportError(f"{len(names)} class names for a {model.num_classes}-class model")
    run_dir = path.parent.parent if path.parent.name == "checkpoints" else path.parent
    out = Path(out or run_dir / "export")
    save_for_hf(model, out, model_config=model_config, safe_serialization=True, data_config=config)
    saved = json.loads((out / "config.json").read_text(encoding="utf-8"))
    _same_logits(model, out, tuple(saved["pretrained_cfg"]["input_size"]))
    weights = "EMA weights" if used_ema else "weights"
    print(
        f"[export] {path} ({weights}) → {out}: {saved['architecture']}, "
        f"{saved['num_classes']} classes, input {tuple(saved['pretrained_cfg']['input_size'])}; "
        "reloaded through timm: same logits"
    )
    print(
        "[export] load it with: import lavit, timm; "
        f'timm.create_model("local-dir:{out}", pretrained=True)'
    )
    if push_to_hub:
        started = time.monotonic()
        push_to_hf_hub(
            model,
            push_to_hub,
            model_config=model_config,
            data_config=config,
            safe_serialization=True,
            private=private,
            model_card={"license": "apache-2.0", "tags": ["image-classification", "timm", "lavit"]},
        )
        print(
            f"[export] pushed to {push_to_hub} in {time.monotonic() - started:.0f} s: "
            f'timm.create_model("hf-hub:{push_to_hub}", pretrained=True)'
        )
    return out


def main(argv: list[str] | None = None) -> int:
    """``lavit export``: see the module docstring."""
    parser = tool_parser(
        PROG, "Export a run's checkpoint as model.safetensors + config.json that timm loads."
    )
    add = parser.add_argument
    add("checkpoint", type=Path, help="a *.ckpt, or a run directory (its best, else last.ckpt)")
    add("--out", type=Path, help="output folder (default: <run dir>/export/)")
    add("--no-ema", action="store_true", help="the raw weights even when the run kept an EMA")
    add("--push-to-hub", metavar="REPO", help="also upload to this Hugging Face Hub model repo")
    add("--private", action="store_true", help="a new Hub repo is private")
    args = parser.parse_args(argv)
    try:
        export_checkpoint(
            args.checkpoint, args.out, not args.no_ema, args.push_to_hub, args.private
        )
    except ExportError as err:
        return fail(PROG, str(err))
    return 0
