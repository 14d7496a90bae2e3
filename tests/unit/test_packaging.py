"""A quiet install: building our own package prints no deprecation warning (the install a newcomer watches)."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_building_the_package_warns_of_nothing(tmp_path: Path) -> None:
    res = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-v", "-w", str(tmp_path), str(ROOT)],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    out = res.stdout + res.stderr
    noisy = [line for line in out.splitlines() if "deprecat" in line.lower() or "SetuptoolsWarning" in line]
    assert not noisy, noisy[:10]
    assert list(tmp_path.glob("sdxl_service-*.whl"))
