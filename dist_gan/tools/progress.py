"""Training as a picture: the fixed-noise grids a run wrote during training as one animated GIF (or MP4),
each frame labelled with its step and kimg, and an evaluated run's FID curve as ``RUN_DIR/fid.png``.

Written at the end of every run by rank 0 (``write_run_pictures``; a failure there is a warning, never a
failed run) and on demand by ``dist-gan sample RUN --progress --gif=progress.gif``. Pillow only: no
plotting library is needed.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

from PIL import Image, ImageDraw

from dist_gan.config import ConfigError

log = logging.getLogger(__name__)

_GRID = re.compile(r"(?P<tag>[A-Za-z]+)_(?P<step>\d{8})\.png$")
LABEL_HEIGHT = 14
# A long run's animation shows at most this many grids (evenly spaced, first and last kept), each
# at most this wide: 60 full-size grids of a 256 px run held 2.3 GB and took minutes.
MAX_FRAMES = 48
MAX_FRAME_WIDTH = 1024


def _records(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue  # a line still being written
    return records


def grids(run_dir: str | Path) -> list[tuple[int, Path]]:
    """(step, file) of the run's sample grids in step order, the EMA's when there are any."""
    found: dict[str, list[tuple[int, Path]]] = {}
    for path in (Path(run_dir) / "samples").glob("*.png"):
        match = _GRID.match(path.name)
        if match:
            found.setdefault(match["tag"], []).append((int(match["step"]), path))
    chosen = found.get("ema") or found.get("G") or next(iter(found.values()), [])
    return sorted(chosen)


def kimg_per_step(records: list[dict]) -> float | None:
    """Thousands of real images per step, from the run's last logged kimg."""
    logged = [r for r in records if isinstance(r.get("kimg"), (int, float)) and r.get("step")]
    return logged[-1]["kimg"] / logged[-1]["step"] if logged else None


def spaced(frames: list, most: int) -> list:
    """At most ``most`` of ``frames``, evenly spaced, the first and the last always among them."""
    if len(frames) <= most:
        return frames
    picks = sorted({round(i * (len(frames) - 1) / (most - 1)) for i in range(most)})
    return [frames[i] for i in picks]


def labelled(path: Path, step: int, per_step: float | None, max_width: int = MAX_FRAME_WIDTH) -> Image.Image:
    """The grid (shrunk to ``max_width``) with a strip above it reading its step (and kimg)."""
    with Image.open(path) as opened:
        grid = opened.convert("RGB")
    if grid.width > max_width:
        grid = grid.resize((max_width, round(grid.height * max_width / grid.width)), Image.Resampling.LANCZOS)
    frame = Image.new("RGB", (grid.width, grid.height + LABEL_HEIGHT), "white")
    frame.paste(grid, (0, LABEL_HEIGHT))
    text = f"step {step}" + (f"  {step * per_step:.1f} kimg" if per_step is not None else "")
    ImageDraw.Draw(frame).text((3, 1), text, fill="black")
    return frame


def write_progress(run_dir: str | Path, out: str | Path, fps: int = 4, max_frames: int = MAX_FRAMES) -> Path:
    """The run's sample grids as one animation at ``out`` (.gif, or .mp4 with imageio[ffmpeg]): at
    most ``max_frames`` of them, read one at a time, with progress in the log."""
    run_dir, out = Path(run_dir), Path(out)
    if not (run_dir / "samples").is_dir() and (run_dir / "manifest.json").is_file():
        run_dir = run_dir.parent.parent  # a checkpoint: its run's grids
    found = grids(run_dir)
    if not found:
        raise ConfigError(f"{run_dir / 'samples'} holds no sample grids (written every run.sample_every steps)")
    frames = spaced(found, max_frames)
    per_step = kimg_per_step(_records(run_dir))
    log.info("writing %s from %d of the run's %d sample grids", out, len(frames), len(found))

    def images():
        for index, (step, path) in enumerate(frames, 1):
            if index % 10 == 0 or index == len(frames):
                log.info("%s: frame %d/%d", out.name, index, len(frames))
            yield labelled(path, step, per_step)

    out.parent.mkdir(parents=True, exist_ok=True)
    if out.suffix == ".mp4":
        try:
            import imageio.v3 as iio
            import numpy as np
        except ImportError:
            raise ConfigError("an MP4 needs imageio with ffmpeg: pip install 'imageio[ffmpeg]' (or write a "
                              ".gif)") from None
        iio.imwrite(out, np.stack([np.asarray(i) for i in images()]), fps=fps)  # capped: <= 150 MB
        return out
    # the last frame stays up longer, so the end of training is readable; Pillow takes the frames
    # from the generator one at a time and keeps only their palette images
    durations = [round(1000 / fps)] * (len(frames) - 1) + [2000]
    stream = images()
    first = next(stream)
    first.save(out, save_all=True, append_images=stream, duration=durations, loop=0)
    return out


CURVES = {"fid": "FID", "modes": "modes covered", "modes_kl": "KL(modes || uniform)"}  # key: title


def write_fid_curve(run_dir: str | Path, out: str | Path | None = None,
                    size: tuple[int, int] = (480, 300)) -> Path | None:
    """The run's logged FIDs against steps as a line chart (``RUN_DIR/fid.png``); None without any."""
    return write_curve(run_dir, "fid", out, size)


def write_curve(run_dir: str | Path, key: str, out: str | Path | None = None,
                size: tuple[int, int] = (480, 300)) -> Path | None:
    """One logged evaluation figure (``CURVES``) against steps as a line chart (``RUN_DIR/<key>.png``);
    None when the run logged none."""
    run_dir = Path(run_dir)
    points = [(r["step"], r[key]) for r in _records(run_dir)
              if isinstance(r.get(key), (int, float)) and r[key] == r[key] and abs(r[key]) != float("inf")]
    if not points:
        return None
    out = Path(out) if out is not None else run_dir / f"{key}.png"
    width, height = size
    left, right, top, bottom = 56, 16, 24, 36
    image = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(image)
    steps, fids = [p[0] for p in points], [p[1] for p in points]
    low, high = min(fids), max(fids)
    span_x, span_y = max(max(steps) - min(steps), 1), max(high - low, 1e-9)

    def xy(step: float, fid: float) -> tuple[float, float]:
        return (left + (step - min(steps)) / span_x * (width - left - right),
                height - bottom - (fid - low) / span_y * (height - top - bottom))

    draw.rectangle([left, top, width - right, height - bottom], outline="grey")
    if len(points) > 1:
        draw.line([xy(*p) for p in points], fill="navy", width=2)
    for p in points:
        x, y = xy(*p)
        draw.ellipse([x - 3, y - 3, x + 3, y + 3], fill="navy")
    draw.text((4, 4), f"{CURVES.get(key, key)} ({run_dir.name})", fill="black")
    draw.text((4, top - 2), f"{high:.1f}", fill="black")
    draw.text((4, height - bottom - 10), f"{low:.1f}", fill="black")
    draw.text((left, height - bottom + 6), f"step {min(steps)}", fill="black")
    draw.text((width - right - 80, height - bottom + 6), f"step {max(steps)}", fill="black")
    image.save(out)
    return out


def write_run_pictures(run_dir: str | Path) -> None:
    """At the end of a run: ``progress.gif`` (two or more grids) and ``fid.png`` (any FID; also
    ``modes.png`` and ``modes_kl.png`` for a mode-coverage run) in the run directory. A picture that
    cannot be written is a warning: it never fails the run."""
    run_dir = Path(run_dir)
    try:
        if len(grids(run_dir)) >= 2:
            write_progress(run_dir, run_dir / "progress.gif")
        for key in CURVES:
            write_curve(run_dir, key)
    except Exception as err:  # a full disk, an odd PNG: the run itself is done and saved
        log.warning("could not write the run's progress pictures in %s: %s", run_dir, err)
