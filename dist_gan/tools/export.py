"""Exporting a run's generator as a standalone model folder (``dist-gan export RUN --out DIR``).

The folder holds ``model.safetensors`` (the EMA generator's weights, or ``--raw`` the trained ones),
``config.json`` (the run's full config and what was trained: enough to rebuild the network without the
checkpoint layout, Accelerate or the training config file), ``samples.png`` (64 samples, seed 0) and
a ``README.md`` model card. ``dist_gan.load_generator(DIR)`` gives back a ready ``nn.Module``::

    from dist_gan import load_generator
    G = load_generator("exported/", device="cuda")
    images = G(torch.randn(16, G.z_dim, device="cuda"), None)   # in [-1, 1] (stylegan2, r3gan: clamp)

``--onnx`` also writes ``generator.onnx`` (ONNX opset ``ONNX_OPSET``, torch's dynamo exporter; needs
the ``onnx`` extra): inputs ``z`` (N, z_dim) float32, ``labels`` (N,) int64 for a class-conditional
generator, and ``truncation`` (a float32 scalar, 1: none) for stylegan2; output ``images`` (N, C, H, W)
in [-1, 1] (r3gan's are not clamped: clamp before saving). The batch size N is dynamic. StyleGAN2's
per-pixel noise stays random, as in PyTorch (ONNX's RandomNormalLike).

``--push_to_hub=USER/REPO`` uploads the folder with ``huggingface_hub`` when it is installed and the
machine is online (not exercised by the tests).
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import cast

import torch
import torch.nn as nn
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from dist_gan.config import ConfigError, config_from_dict, load_config, to_dict
from dist_gan.core.fsutil import sha256_of
from dist_gan.core.imagegrid import save_png
from dist_gan.models import build_generator
from dist_gan.models.sampling import generate
from dist_gan.models.stylegan2 import StyleGAN2Generator
from dist_gan.run.checkpoint import read_manifest
from dist_gan.run.nets import real_images_per_step
from dist_gan.tools.generate import generator_from_checkpoint

log = logging.getLogger(__name__)
EXPORT_FORMAT = "dist_gan.generator/1"
WEIGHTS, CONFIG, CARD, GRID = "model.safetensors", "config.json", "README.md", "samples.png"
ONNX_FILE, ONNX_OPSET = "generator.onnx", 18
# Generators whose last layer is no tanh: their images are about [-1, 1], not bounded by it
UNBOUNDED_OUTPUT = ("stylegan2", "r3gan")
# Config entries that name files on the training machine: a shared export keeps only their last part
LOCAL_PATHS = (("run", "dir"), ("data", "shards"), ("data", "manifest"), ("data", "mnist_dir"),
               ("data", "root"), ("data", "folder"), ("train", "resume"), ("eval", "classifier_path"),
               ("eval", "feature_weights"), ("eval", "reference_stats"))


def _latest_fid(checkpoint: Path, step: int) -> float | None:
    """The last FID the run logged at or before ``step`` (metrics.jsonl beside the checkpoints)."""
    metrics = checkpoint.parent.parent / "metrics.jsonl"
    if not metrics.is_file():
        return None
    found = None
    for line in metrics.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line still being written
        if isinstance(record.get("fid"), (int, float)) and record.get("step", 0) <= step:
            found = float(record["fid"])
    return found


def _refuse_used_out(out: Path, overwrite: bool) -> None:
    """An export never writes among other files, unless asked (``--overwrite``)."""
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out={out} is a file: name a folder for the export")
    held = sorted(p.name for p in out.iterdir()) if out.is_dir() else []
    if held and not overwrite:
        raise ConfigError(f"--out={out} is not empty ({len(held)} entries, e.g. {held[0]}): choose an empty "
                          "or new folder, or pass --overwrite to replace the export there")


def _shareable(config: dict) -> dict:
    """The config without the training machine's paths (each kept as its last component)."""
    config = json.loads(json.dumps(config))
    for section, key in LOCAL_PATHS:
        value = config[section].get(key)
        if isinstance(value, str) and value:
            config[section][key] = Path(value.split("::")[0]).name
    return config


def export(source: str | Path, out: str | Path, ema: bool = True, overwrite: bool = False,
           onnx: bool = False) -> Path:
    """Write the generator of ``source`` (a run directory or a checkpoint) as a model folder ``out``
    (refused if ``out`` holds other files, unless ``overwrite``); ``onnx``: with ``generator.onnx``."""
    out = Path(out)
    _refuse_used_out(out, overwrite)
    generator, checkpoint = generator_from_checkpoint(source, ema)
    config = load_config(checkpoint / "config.yaml")
    manifest = read_manifest(checkpoint)
    step = int(manifest["step"])
    info = {"format": EXPORT_FORMAT, "weights": "ema" if ema else "raw", "step": step,
            "kimg": step * real_images_per_step(config, int(manifest["world_size"])) / 1000,
            "fid": _latest_fid(checkpoint, step),
            "checkpoint": checkpoint.name, "z_dim": config.model.z_dim,
            "num_classes": config.model.num_classes, "resolution": config.data.resolution,
            "channels": config.data.channels, "config": _shareable(to_dict(config)),
            "fid_feature_net": config.eval.resolved_feature_net(config.data)}
    # Written into a staging folder beside ``out`` and swapped in whole: a failure (a full disk, an
    # ONNX exporter error) leaves an existing export as it was, and no file of an earlier export
    # (a generator.onnx of another model) survives an --overwrite.
    staging = out.parent / f".{out.name}.export-tmp"
    try:
        _remove_folder(staging)
        staging.mkdir(parents=True)
        save_file({k: v.detach().contiguous() for k, v in generator.state_dict().items()}, staging / WEIGHTS)
        info["sha256"] = {WEIGHTS: sha256_of(staging / WEIGHTS)}  # load_generator checks it
        if onnx:
            info["onnx"] = export_onnx(generator, config.model.generator.arch, config.model.z_dim,
                                       config.model.num_classes, staging / ONNX_FILE)
        (staging / CONFIG).write_text(json.dumps(info, indent=1))
        save_png(generate(generator, 64, seed=0), staging / GRID, nrow=8)
        (staging / CARD).write_text(model_card(info))
        _swap_in(staging, out)
    except (OSError, SafetensorError) as err:  # safetensors reports a full disk as its own error
        _remove_folder(staging)
        raise ConfigError(f"cannot write the export into --out={out}: {getattr(err, 'strerror', None) or err}"
                          f"{'; the export there is unchanged' if out.is_dir() else ''}") from None
    except BaseException:
        _remove_folder(staging)
        raise
    log.info("exported the %s generator of %s (step %d) to %s", info["weights"], checkpoint, step, out)
    return out


def _remove_folder(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)


def _swap_in(staging: Path, out: Path) -> None:
    """``staging`` becomes ``out``; an existing ``out`` is removed only once the new one is there."""
    if not out.exists():
        staging.rename(out)
        return
    old = out.parent / f".{out.name}.export-old"
    _remove_folder(old)
    out.rename(old)
    staging.rename(out)
    _remove_folder(old)


def model_card(info: dict) -> str:
    config = info["config"]
    model, data = config["model"], config["data"]
    feature_net = info.get("fid_feature_net", config["eval"]["feature_net"])
    fid = f"{info['fid']:.2f} (`eval.feature_net={feature_net}`)" if info["fid"] else "not measured"
    bounded = model["generator"]["arch"] not in UNBOUNDED_OUTPUT
    value_range = ("in [-1, 1]" if bounded else
                   "about [-1, 1], not clamped (no tanh): clamp(-1, 1) before saving")
    return f"""---
library_name: dist_gan
tags: [gan, image-generation, dist_gan]
---

# {model['generator']['arch']} generator, {data['source']} {data['resolution']}px

A GAN generator trained with dist_gan, a GAN training toolkit over Hugging Face Accelerate
({config['loss']['name']} loss), exported from
`{Path(info['checkpoint']).name}`: the {'EMA' if info['weights'] == 'ema' else 'trained (raw)'} weights.

| | |
|---|---|
| data | {data['source']}, {data['resolution']}x{data['resolution']}, {data['channels']} channel(s) |
| steps | {info['step']} |
| kimg (real images shown to D) | {info['kimg']:.1f} |
| latent size | {info['z_dim']} |
| classes | {info['num_classes'] or 'unconditional'} |
| FID | {fid} |

![64 samples, seed 0]({GRID})

```python
import torch
from dist_gan import load_generator

G = load_generator(".")  # or device="cuda"
z = torch.randn(16, G.z_dim)
images = G(z, None)  # (16, {data['channels']}, {data['resolution']}, {data['resolution']}) {value_range}
```
{_onnx_section(info)}"""


def _onnx_section(info: dict) -> str:
    """The model card's ONNX usage, when the export has ``generator.onnx``."""
    onnx = info.get("onnx")
    if not onnx:
        return ""
    feeds = ", ".join(f'"{name}": {value}' for name, value in (
        ("z", "np.random.randn(16, %d).astype(np.float32)" % info["z_dim"]),
        ("labels", "np.arange(16) % {}".format(info["num_classes"])),
        ("truncation", "np.array(1.0, dtype=np.float32)")) if name in onnx["inputs"])
    return f"""
`{onnx['file']}` (ONNX opset {onnx['opset']}, dynamic batch) runs without PyTorch:

```python
import numpy as np, onnxruntime as ort
session = ort.InferenceSession("{onnx['file']}")
images, = session.run(None, {{{feeds}}})
```
"""


class OnnxGenerator(nn.Module):
    """What ``generator.onnx`` computes: ``generator(z, labels)``, and for stylegan2 with the
    truncation psi as an input (w pulled towards ``w_avg`` always, so there is no branch on psi)."""

    def __init__(self, generator: nn.Module, arch: str, conditional: bool):
        super().__init__()
        self.generator, self.arch, self.conditional = generator, arch, conditional
        for module in generator.modules():
            if hasattr(module, "grouped"):  # stylegan2's modulated convolutions: the unfused form
                setattr(module, "grouped", False)

    def forward(self, z: torch.Tensor, labels: torch.Tensor | None = None,
                truncation: torch.Tensor | None = None) -> torch.Tensor:
        labels = labels if self.conditional else None
        if self.arch != "stylegan2":
            return self.generator(z, labels)
        g = cast(StyleGAN2Generator, self.generator)
        assert truncation is not None, "a stylegan2 export takes the truncation as an input"
        w = g.mapping.w_avg.to(z.dtype).lerp(g.mapping(z, labels), truncation)
        return g.synthesis(w[:, None].expand(-1, g.num_ws, -1))


def onnx_inputs(arch: str, z: torch.Tensor, labels: torch.Tensor | None,
                truncation: float = 1.0) -> dict[str, torch.Tensor]:
    """The named inputs ``generator.onnx`` takes, for ``z`` (and ``labels``, ``truncation``)."""
    inputs = {"z": z}
    if labels is not None:
        inputs["labels"] = labels.long()
    if arch == "stylegan2":
        inputs["truncation"] = torch.tensor(truncation, dtype=torch.float32)
    return inputs


def export_onnx(generator: nn.Module, arch: str, z_dim: int, num_classes: int, path: Path) -> dict:
    """Write ``generator`` as ONNX to ``path`` (dynamic batch); returns what config.json records.
    An architecture the exporter cannot trace is a ConfigError naming it."""
    try:
        import onnxscript  # noqa: F401  (torch's ONNX exporter needs it and onnx)
    except ImportError:
        raise ConfigError("--onnx needs the onnx and onnxscript packages: pip install 'dist_gan[onnx]'") from None
    example = onnx_inputs(arch, torch.randn(2, z_dim),
                          torch.arange(2) % num_classes if num_classes else None)
    batch = torch.export.Dim("batch", min=1, max=1 << 16)
    shapes = {name: ({0: batch} if name in ("z", "labels") else None) for name in example}
    wrapper = OnnxGenerator(generator, arch, bool(num_classes)).eval()
    try:
        torch.onnx.export(wrapper, (), str(path), kwargs=example, dynamo=True, opset_version=ONNX_OPSET,
                          input_names=list(example), output_names=["images"], dynamic_shapes=shapes,
                          external_data=False, verbose=False)
    except Exception as err:  # the exporter raises many types; the first line says what failed
        raise ConfigError(f"model.generator.arch={arch} cannot be exported to ONNX: "
                          f"{str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__}") from None
    return {"file": ONNX_FILE, "opset": ONNX_OPSET, "inputs": list(example), "outputs": ["images"],
            "sha256": sha256_of(path)}


def load_generator(directory: str | Path, device: torch.device | str = "cpu") -> nn.Module:
    """The generator exported into ``directory``, in eval mode on ``device``. A missing, malformed or
    damaged file is a ConfigError naming it (the weights are checked against their sha256)."""
    directory = Path(directory)
    config_file, weights = directory / CONFIG, directory / WEIGHTS
    try:
        info = json.loads(config_file.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"{config_file} not found: export a run with `dist-gan export "
                                "RUN --out DIR` first") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ConfigError(f"{config_file} is not valid JSON ({err}): the export is damaged; export again") from None
    if not isinstance(info, dict) or info.get("format") != EXPORT_FORMAT:
        raise ConfigError(f"{config_file} is not a dist_gan generator export "
                          f"(format {info.get('format') if isinstance(info, dict) else None!r})")
    if not isinstance(info.get("config"), dict) or not isinstance(info.get("sha256", {}), dict):
        raise ConfigError(f"{config_file}: its 'config' (a mapping of sections) or 'sha256' field is "
                          "missing or mistyped: the export is damaged; export again")
    if not weights.is_file():
        raise FileNotFoundError(f"{weights} not found: the export is incomplete; export again")
    expected = info.get("sha256", {}).get(WEIGHTS)
    if expected is not None and sha256_of(weights) != expected:
        raise ConfigError(f"{weights} does not match the sha256 in {config_file}: the file is damaged "
                          "or was replaced; export again")
    config = config_from_dict(info["config"], str(config_file))
    try:
        generator = build_generator(config)
    except (TypeError, ValueError, KeyError) as err:
        raise ConfigError(f"{config_file}: its config cannot build a generator ({err}); export again") from None
    try:
        generator.load_state_dict(load_file(weights))
    except Exception as err:  # safetensors raises its own error types for a damaged header
        raise ConfigError(f"{weights} cannot be loaded into a {config.model.generator.arch} generator: "
                          f"{str(err).splitlines()[0]}") from None
    return generator.to(device).eval().requires_grad_(False)


def upload_to_hub(directory: Path, repo: str) -> None:
    """Upload the exported folder to the Hugging Face Hub (needs ``huggingface_hub`` and a login)."""
    try:
        from huggingface_hub import HfApi
    except ImportError:
        raise ConfigError("--push_to_hub needs huggingface_hub: pip install huggingface_hub") from None
    api = HfApi()
    api.create_repo(repo, exist_ok=True)
    api.upload_folder(folder_path=str(directory), repo_id=repo)
