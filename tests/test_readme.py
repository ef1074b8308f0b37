"""The README: short, its example runs and prints what it says, its set-up commands are
the CI's."""

import contextlib
import io
import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = os.path.join(ROOT, "README.md")


def test_readme_is_short():
    assert len(open(README).read().splitlines()) <= 300


def test_readme_code_blocks_run():
    """Every Python block of the README runs; the example prints what the text says."""
    text = open(README).read()
    blocks = re.findall(r"```python\n(.*?)```", text, re.S)
    assert blocks
    out = io.StringIO()
    for code in blocks:
        assert len([line for line in code.splitlines() if line.strip()]) <= 20
        with contextlib.redirect_stdout(out):
            exec(compile(code, "README.md", "exec"), {})
    printed = out.getvalue().splitlines()
    assert printed[:2] == ["NFE 100, L2 to FP 6.74", "NFE 110, L2 to FP 5.84"], printed
    assert "`NFE 100, L2 to FP 6.74` then `NFE 110, L2 to FP 5.84`" in text


def test_readme_setup_commands_are_the_ci_commands():
    text = open(README).read()
    ci = open(os.path.join(ROOT, ".ci", "run")).read()
    test_cmd = re.findall(r"```bash\n(.*?)\n```", text[text.index("## Set-up"):], re.S)[1]
    assert test_cmd.strip() in ci
