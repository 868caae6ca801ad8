#!/usr/bin/env python3
"""An environment for the edge runner as a Raspberry Pi with a Neural Compute Stick 2 has it: Python 3.7,
OpenVINO 2022.3 (the last release with the stick's MYRIAD plugin), OpenCV 4.8, numpy 1.21.

    python scripts/edge_legacy_env.py --venv .venv-edge-legacy     # what `make edge-legacy` does

Finds a Python 3.7 (--python, else `python3.7` on PATH, else a pyenv 3.7.x), makes the virtual environment and
installs the pinned wheels from PyPI; tests/test_edge_legacy.py then runs the runner in it beside the current
stack. Exits 0 with one line saying why when no Python 3.7 is there (the tests skip, saying the same).
"""
import argparse
import glob
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from caffekit.errors import KitError, cli  # noqa: E402

# The newest of each that still installs on Python 3.7 and that OpenVINO 2022.3 was released beside.
PINS = ("openvino==2022.3.0", "opencv-python-headless==4.8.1.78", "numpy==1.21.6")
WANTED = (3, 7)


def find_python(explicit):
    candidates = [explicit] if explicit else [shutil.which("python3.7")] + sorted(
        glob.glob(os.path.expanduser("~/.pyenv/versions/3.7.*/bin/python3.7")), reverse=True)
    for candidate in filter(None, candidates):
        try:
            version = subprocess.run([candidate, "-c", "import sys; print(sys.version_info[:2])"],
                                     capture_output=True, text=True, timeout=30).stdout.strip()
        except OSError:
            continue
        if version == str(WANTED):
            return candidate
    if explicit:
        raise KitError(f"{explicit}: not a Python {WANTED[0]}.{WANTED[1]}")
    return None


def run_step(command, venv: Path) -> int:
    """The command's exit status. Ctrl-C is ours alone (the child ignores it, so no traceback of its own reaches
    the terminal): the child is stopped and the half-made environment removed before the interrupt goes on."""
    child = subprocess.Popen(command, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
    try:
        return child.wait()
    except KeyboardInterrupt:
        child.terminate()
        child.wait()
        shutil.rmtree(venv, ignore_errors=True)
        raise


@cli
def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--venv", type=Path, default=Path(".venv-edge-legacy"))
    parser.add_argument("--python", help="a Python 3.7 interpreter (default: found on PATH or in pyenv)")
    args = parser.parse_args(argv)
    python = find_python(args.python)
    if python is None:
        print("edge-legacy: no Python 3.7 here (python3.7 on PATH or ~/.pyenv/versions/3.7.*): "
              "the OpenVINO 2022.3 runner tests will skip")
        return
    marker = args.venv / "pins.txt"
    if marker.is_file() and marker.read_text().split() == list(PINS):
        print(f"edge-legacy: {args.venv} is ready ({', '.join(PINS)})")
        return
    shutil.rmtree(args.venv, ignore_errors=True)
    steps = [[python, "-m", "venv", str(args.venv)],
             [str(args.venv / "bin" / "python"), "-m", "pip", "install", "-q", *PINS]]
    for step in steps:
        if run_step(step, args.venv) != 0:
            shutil.rmtree(args.venv, ignore_errors=True)
            raise KitError(f"edge-legacy: `{' '.join(step)}` failed")
    marker.write_text("\n".join(PINS) + "\n")  # last: a half-made environment has none
    print(f"edge-legacy: {args.venv} with {python}: {', '.join(PINS)}")


if __name__ == "__main__":
    main()
