"""The README stays true: every setting is documented, and the two Quickstart commands are the Makefile's."""

import re

from app.settings import Settings
from tests.procs import ROOT
from worker.settings import WorkerSettings

README = (ROOT / "README.md").read_text()


def test_every_setting_is_in_the_readme() -> None:
    classes = [Settings, WorkerSettings]
    try:
        from dispatcher.delivery import DispatcherSettings

        classes.append(DispatcherSettings)
    except ImportError:
        pass
    missing = sorted({f"SDXL_{name.upper()}" for cls in classes for name in cls.model_fields} -
                     set(re.findall(r"SDXL_[A-Z0-9_]+", README)))
    assert not missing, f"settings missing from README.md: {missing}"


def test_quickstart_names_the_two_make_targets() -> None:
    quickstart = README.split("## Quickstart", 1)[1].split("##", 1)[0]
    assert "make run" in quickstart and "make test" in quickstart
    makefile = (ROOT / "Makefile").read_text()
    assert re.search(r"^run:", makefile, re.M) and re.search(r"^test:", makefile, re.M)
    assert "make test" in (ROOT / ".ci" / "run").read_text()
