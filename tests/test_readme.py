"""The README's example runs and prints what it says."""

import contextlib
import io
import os
import re

README = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")


def test_readme_example_runs():
    text = open(README).read()
    section = text[text.index("## Example"):]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    assert len([line for line in code.splitlines() if line.strip()]) <= 11  # a ten-line example
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(code, "README.md", "exec"), {})
    assert "'nfe': 110, 'nfe_full': 20, 'nfe_partial': 90" in out.getvalue()


def test_readme_setup_commands_are_the_ci_commands():
    text = open(README).read()
    ci = open(os.path.join(os.path.dirname(README), ".ci", "run")).read()
    test_cmd = re.findall(r"```bash\n(.*?)\n```", text[text.index("## Set-up"):], re.S)[1]
    assert test_cmd.strip() in ci
