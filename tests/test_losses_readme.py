"""The README's "Use the losses in your own project" example runs verbatim."""
import pathlib
import re

import numpy as np

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"
SECTION = "## Use the losses in your own project"


def _example_code() -> str:
    text = README.read_text()
    assert SECTION in text
    section = text.split(SECTION, 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    assert len(blocks) == 1, "expected exactly one python block in the section"
    return blocks[0]


def test_readme_losses_example_runs(capsys):
    code = _example_code()
    namespace = {"__name__": "readme_example"}
    exec(compile(code, str(README), "exec"), namespace)
    out = capsys.readouterr().out
    assert "step 2: loss" in out
    assert np.isfinite(float(namespace["loss"]))
    assert namespace["samples"].shape == namespace["noise"].shape
    assert np.all(np.isfinite(np.asarray(namespace["samples"])))
