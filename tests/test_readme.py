"""The README's `loss_fn` example is the file examples/readme_example.py, and it trains."""

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_readme_example_is_the_example_file():
    readme = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", readme, re.S)
    example = (ROOT / "examples" / "readme_example.py").read_text()
    assert example.strip() in [b.strip() for b in blocks]
    assert len(example.strip().splitlines()) <= 20


def test_readme_example_loss_decreases():
    out = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "readme_example.py")],
        capture_output=True, text=True, check=True, timeout=300,
    ).stdout
    losses = [float(line.split()[1]) for line in out.strip().splitlines()]
    assert len(losses) == 6
    assert losses[-1] < losses[0]


def test_readme_commands():
    readme = (ROOT / "README.md").read_text()
    assert 'pip install -e ".[test]"' in readme
    assert "python -m pytest" in readme
    assert "python launch.py --config=configs/tms_5-2.py" in readme
    ci = (ROOT / ".ci" / "run").read_text()
    assert 'pip install -e ".[test]"' in ci and "python -m pytest" in ci


def test_readme_custom_term_is_the_example_file_and_runs():
    readme = (ROOT / "README.md").read_text()
    blocks = [b.strip() for b in re.findall(r"```python\n(.*?)```", readme, re.S)]
    example = (ROOT / "examples" / "custom_term.py").read_text().strip()
    assert example in blocks
    out = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "custom_term.py")], capture_output=True, text=True, check=True,
        timeout=300,
    ).stdout.split()
    loss, u_norm = float(out[0]), float(out[1])
    assert u_norm > 0 and loss > 0.1 * u_norm  # the registered term is computed and enters the total
