"""deploy/README.md names files that exist, and the commands it tells a reader to run are real."""

from __future__ import annotations

import re
import shlex

from tests.deploy.manifests import DEPLOY, parse_loraplex_command

README = DEPLOY / "README.md"


def test_every_path_in_the_readme_table_exists() -> None:
    paths = []
    for line in README.read_text().splitlines():
        if line.startswith("| `"):
            first = line.split("|")[1]
            paths += re.findall(r"`([^`]+)`", first)
    assert len(paths) >= 8, f"table not found: {paths}"
    missing = [p for p in paths if not (DEPLOY / p).exists()]
    assert not missing, f"deploy/README.md names missing files: {missing}"


def test_loraplex_commands_in_the_readme_parse() -> None:
    """Every `loraplex ...` command in a code block of the README parses with the real CLI."""
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", README.read_text(), flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():
            words = shlex.split(line.split("#")[0]) if line.strip() else []
            for i, word in enumerate(words):
                if word == "loraplex" and i + 1 < len(words) and not words[i + 1].startswith("-"):
                    if i > 0 and words[i - 1] in {"exec"}:
                        continue  # `compose exec loraplex` names the service
                    commands.append(words[i + 1 :])
    assert commands, "no loraplex command found in the README"
    for args in commands:
        parse_loraplex_command(args)
