"""The README's shell commands, as the tests that run them read them."""

from __future__ import annotations

import re

from tests.conftest import ROOT


def makefile_targets() -> set[str]:
    return set(re.findall(r"^([a-z-]+):", (ROOT / "Makefile").read_text(), flags=re.M))


def readme_commands() -> list[str]:
    """Every line of the README's ```bash blocks (comments dropped), and every `make TARGET [VAR=VALUE]` the
    prose shows in backticks (a placeholder value, `...`, is not a command)."""
    text = (ROOT / "README.md").read_text()
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        for line in block.splitlines():
            line = re.sub(r"\s+#.*$", "", line).strip()
            if line:
                commands.append(line)
    targets = makefile_targets()
    for command in re.findall(r"`(make [a-z-]+(?: [A-Z_]+=[^`\s]+)*)`", text):
        if command.split()[1] in targets and "..." not in command:
            commands.append(command)
    return commands
