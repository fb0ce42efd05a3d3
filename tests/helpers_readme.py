"""The README's shell commands, as the tests that run them read them."""

from __future__ import annotations

import re

from tests.conftest import ROOT


def readme_commands() -> list[str]:
    """Every line of the README's ```bash blocks (comments dropped), and `make bench`."""
    text = (ROOT / "README.md").read_text()
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        for line in block.splitlines():
            line = re.sub(r"\s+#.*$", "", line).strip()
            if line:
                commands.append(line)
    commands += re.findall(r"`(make bench)`", text)[:1]
    return commands
