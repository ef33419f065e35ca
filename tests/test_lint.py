"""The code stays clean, so CI keeps it so: ruff's lint and format checks on the Python code (settings in
pyproject.toml) and `snakemake --lint` on the workflow."""

import subprocess
import sys

from .conftest import REPO


def _run(*args, cwd=REPO):
    return subprocess.run([sys.executable, "-m", *args], cwd=cwd, capture_output=True, text=True, timeout=300)


def test_python_code_passes_ruff_lint():
    proc = _run("ruff", "check", "--no-cache", ".")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]


def test_python_code_is_ruff_formatted():
    proc = _run("ruff", "format", "--check", "--no-cache", ".")
    assert proc.returncode == 0, "run `.venv/bin/ruff format .`:\n" + proc.stdout[-3000:]


def test_snakemake_lint_reports_nothing(tmp_path):
    (tmp_path / "clip.mp4").write_bytes(b"")  # the linter reads the workflow, not the videos
    (tmp_path / "config.yaml").write_text(f"subjects:\n  a: {{video: {tmp_path / 'clip.mp4'}}}\n")
    proc = _run(
        "snakemake", "--snakefile", str(REPO / "Snakefile"), "--configfile", "config.yaml", "--lint", cwd=tmp_path
    )
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0 and "Lints for" not in output, output[-4000:]
    assert "Congratulations, your workflow is in a good condition!" in output
