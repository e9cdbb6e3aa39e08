"""Shared fixtures: where real MNIST lives for tests, and a helper that runs the real entry points."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# Tests and CI read MNIST from the shared copy beside the checkout; the project itself never does.
MNIST_DIR = Path(os.environ.get("DIST_GAN_TEST_MNIST", REPO.parent / "shared" / "data" / "mnist"))

# Small, fast settings every end-to-end run shares.
FAST = ["--data.batch_size=32", "--model.generator.width=16", "--model.discriminator.width=16",
        "--run.log_every=5", "--run.sample_every=10"]


# Every test names its tier: ``@pytest.mark.tier("e2e")``, or a module's ``pytestmark``, the test's own
# winning. The tier becomes the test's marker (-m unit), on the test alone, so a module's default
# never selects a test that says otherwise.
TIERS = ("unit", "e2e", "multiprocess", "cluster")


def tier_of(item) -> str:
    """The tier a test is marked with; a test with none is a collection error (say which)."""
    marker = item.get_closest_marker("tier")
    if marker is None or not marker.args or marker.args[0] not in TIERS:
        raise pytest.UsageError(f"{item.nodeid} has no tier: mark it (or its module's pytestmark) with "
                                f"pytest.mark.tier(NAME), NAME one of {', '.join(TIERS)} (pyproject.toml "
                                "says what each means)")
    return marker.args[0]


# The Slurm tests run one at a time on one pytest-xdist worker (--dist loadgroup): each module starts a
# cluster of its own, and two at once would fight over the machine's cores and the munge key. Every
# other test may run beside any other: multi-rank launches take free ports (helpers.ACCELERATE,
# helpers.free_port), never a fixed one.
SLURM_GROUP = "slurm"


def in_slurm_group(item) -> bool:
    return item.module.__name__.startswith("test_slurm")


@pytest.hookimpl(tryfirst=True)  # before xdist reads the groups
def pytest_collection_modifyitems(config, items) -> None:
    """Check every test's tier marker (-m unit, -m "unit or e2e", ...); every tier but unit is slow."""
    for item in items:
        if in_slurm_group(item):
            item.add_marker(pytest.mark.xdist_group(SLURM_GROUP))
        if item.get_closest_marker("cuda"):
            continue
        tier = tier_of(item)
        if tier == "unit" and item.get_closest_marker("slow"):
            raise pytest.UsageError(f"{item.nodeid} is marked unit and slow: a slow test is e2e or above")
        item.add_marker(getattr(pytest.mark, tier))
        if tier != "unit" and not item.get_closest_marker("slow"):
            item.add_marker(pytest.mark.slow)
    items[:] = heaviest_modules_first(items)


TIER_WEIGHT = {"cluster": 0, "multiprocess": 1, "e2e": 2, "unit": 3}
# Modules of several minutes each that would otherwise start late: the Slurm group (one worker runs
# all of it), the GPU check's CPU smoke run, the families (the conditional-samples run is the longest).
LONGEST_MODULES = ("test_slurm", "test_slurm_two_nodes", "test_gpu_check", "test_families")


def heaviest_modules_first(items: list) -> list:
    """The modules holding the heaviest tiers first (a module's tests stay together, in their order, so
    its fixtures are built once): two xdist workers then start the long runs at once and end on the
    short unit tests instead of one worker finishing a Slurm job alone."""
    rank: dict[str, int] = {}
    for item in items:  # a module weighs what its heaviest test weighs
        weight = TIER_WEIGHT[tier_of(item)] if not item.get_closest_marker("cuda") else TIER_WEIGHT["unit"]
        if item.module.__name__ in LONGEST_MODULES:  # first of all, in that order
            weight = LONGEST_MODULES.index(item.module.__name__) - len(LONGEST_MODULES)
        rank[item.module.__name__] = min(rank.get(item.module.__name__, 3), weight)
    position = {item.nodeid: i for i, item in enumerate(items)}
    return sorted(items, key=lambda item: (rank[item.module.__name__], position[item.nodeid]))


def starts_python(args) -> bool:
    """Whether a Popen command line runs this interpreter or a script of its bin directory."""
    argv = [args] if isinstance(args, (str, bytes, os.PathLike)) else list(args)
    program = Path(os.fsdecode(argv[0]).split()[0]) if argv else Path()
    return program.parent == Path(sys.executable).parent or program.name.startswith("python")


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item):
    """A unit test runs in this process: starting a Python process (a training run, a CLI, a launcher:
    anything from this interpreter's bin directory) fails it, naming the command, so its marker says
    e2e or above. Fixtures may start processes; the test body may not. (Tools libraries run on
    import, such as ctypes' ``ldconfig -p``, are not the test's.)"""
    if item.get_closest_marker("cuda") or tier_of(item) != "unit":
        return (yield)
    original = subprocess.Popen.__init__

    def refuse(self, args, *rest, **kwargs):
        if starts_python(args):
            raise AssertionError(f"{item.nodeid} is marked unit but starts a process ({args!r}): mark it e2e")
        return original(self, args, *rest, **kwargs)

    subprocess.Popen.__init__ = refuse
    try:
        return (yield)
    finally:
        subprocess.Popen.__init__ = original


@pytest.hookimpl(wrapper=True)
def pytest_xdist_node_collection_finished(node, ids):
    """Fail the run, rather than let two Slurm clusters start at once, when pytest-xdist did not put
    the Slurm tests in their group: with pytest 9.2 its loadgroup silently groups nothing
    (pytest-dev/pytest-xdist#1386; pyproject.toml pins pytest below 9.2 for this)."""
    grouped = [nodeid for nodeid in ids if nodeid.endswith(f"@{SLURM_GROUP}")]
    slurm = [nodeid for nodeid in ids if "tests/test_slurm" in nodeid]
    if node.config.getvalue("dist") == "loadgroup" and slurm and len(grouped) != len(slurm):
        raise pytest.UsageError(
            f"pytest-xdist --dist loadgroup did not group the Slurm tests ({len(grouped)} of {len(slurm)} "
            f"carry @{SLURM_GROUP}): pytest {pytest.__version__} is not supported by this pytest-xdist's "
            "loadgroup (pytest-dev/pytest-xdist#1386); install pytest<9.2")
    return (yield)


def pytest_configure(config) -> None:
    """Under pytest-xdist, the workers share the cores: in-process torch gets its share of threads
    (subprocesses already run with OMP_NUM_THREADS=1)."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers > 1:
        import torch

        torch.set_num_threads(max(1, (os.cpu_count() or 1) // workers))


@contextlib.contextmanager
def session_shared(tmp_path_factory, name: str):
    """A directory made once per test session and shared by every pytest-xdist worker: the first
    worker to arrive builds it (the others wait on its lock); yields (path, already_built)."""
    base = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        base = base.parent  # the session's directory, above each worker's own
    path = base / name
    path.mkdir(exist_ok=True)
    done = path / ".built"
    with open(base / f"{name}.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield path, done.exists()
            done.touch()
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def missing_prerequisite(reason: str) -> None:
    """Skip for want of ``reason`` (Slurm, network namespaces, a tmpfs mount, a package) on a developer's
    machine; in CI (CI=true) fail instead, so nothing CI promises to test is silently left out."""
    if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        pytest.fail(f"CI=true: {reason}")
    pytest.skip(reason)


@pytest.fixture(scope="session")
def mnist_dir() -> Path:
    if not (MNIST_DIR / "train-images-idx3-ubyte.gz").is_file():
        reason = f"real MNIST not found at {MNIST_DIR} (set DIST_GAN_TEST_MNIST)"
        if os.environ.get("DIST_GAN_REQUIRE_MNIST"):
            pytest.fail(reason)
        missing_prerequisite(reason)
    return MNIST_DIR


@pytest.fixture(scope="session")
def mnist_shards(mnist_dir, tmp_path_factory) -> str:
    """Real MNIST written once per session as 6 shards; returns the brace pattern."""
    from dist_gan.config import DataConfig
    from dist_gan.data import prepare_shards

    with session_shared(tmp_path_factory, "mnist_shards") as (out, built):
        if not built:
            prepare_shards(DataConfig(mnist_dir=str(mnist_dir)), out, "train", progress=False)
    return str(out / "train-{000000..000005}.tar")


@pytest.fixture
def shard_data(mnist_shards) -> list[str]:
    """Training settings for the session's MNIST shards read by 2 loader workers, as users run."""
    return [f"--data.shards={mnist_shards}", "--data.prepare_if_missing=false", "--data.workers=2"]


@pytest.fixture(scope="session")
def reference_classifier(mnist_dir, tmp_path_factory):
    """The shipped reference MNIST classifier, and a private cache directory for the session.

    DIST_GAN_CACHE is set for the whole session so subprocesses (training runs, evaluate) share the
    real images' features they cache there, and no test reads or writes the user's cache.
    """
    from dist_gan.metrics.classifier import SHIPPED_CLASSIFIER, load_or_train_classifier

    with session_shared(tmp_path_factory, "cache") as (cache, _):
        os.environ["DIST_GAN_CACHE"] = str(cache)
    return load_or_train_classifier(None), SHIPPED_CLASSIFIER


@pytest.fixture
def small_tmpfs(tmp_path):
    """A 24 MiB tmpfs (root only); skipped where mounts are not allowed."""
    mount = tmp_path / "tmpfs"
    mount.mkdir()
    made = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=24m", "tmpfs", str(mount)],
                          capture_output=True, text=True)
    if made.returncode != 0:
        missing_prerequisite(f"cannot mount a tmpfs here: {made.stderr.strip()}")
    yield mount
    subprocess.run(["umount", "-l", str(mount)])


def run_cli(args: list[str], launcher: list[str] | None = None, check: bool = True,
            timeout: int = 600, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run ``python -m <args>`` (or ``launcher + args``) from the repo root; fail with its output."""
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"),
               **(env or {}))
    cmd = (launcher or [sys.executable]) + ["-m"] + args
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {proc.returncode}\n--- stderr ---\n"
                             f"{proc.stderr[-6000:]}\n--- stdout ---\n{proc.stdout[-2000:]}")
    return proc


def read_metrics(run_dir: Path) -> list[dict]:
    """metrics.jsonl's records; a last line still being written (no newline yet) is left out."""
    text = (run_dir / "metrics.jsonl").read_text()
    lines = text.splitlines() if text.endswith("\n") else text.splitlines()[:-1]
    return [json.loads(line) for line in lines]


def start_cli(args: list[str], launcher: list[str] | None = None, log: Path | None = None,
              env: dict | None = None, new_session: bool = False) -> subprocess.Popen:
    """Start ``python -m <args>`` (or ``launcher + args``) in the background; output to ``log``.
    ``new_session``: in a process group of its own (as `setsid`), to signal the whole group."""
    full_env = dict(os.environ, PYTHONUNBUFFERED="1",
                    OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"), **(env or {}))
    cmd = (launcher or [sys.executable]) + ["-m"] + args
    out = open(log, "w") if log else subprocess.DEVNULL
    return subprocess.Popen(cmd, cwd=REPO, env=full_env, stdout=out, stderr=subprocess.STDOUT,
                            text=True, start_new_session=new_session)


def wait_for(predicate, timeout: float, what: str, proc: subprocess.Popen | None = None,
             interval: float = 0.05) -> None:
    """Poll ``predicate`` until true; fail naming ``what`` on timeout or if ``proc`` died first."""
    import time

    deadline = time.monotonic() + timeout
    while not predicate():
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"process exited ({proc.returncode}) before {what}")
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)
