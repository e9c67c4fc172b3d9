"""The documented commands stay true to the code: every `adapt ...` line in the shell blocks of the README and the
other tracked Markdown files parses with the CLI as written (a renamed or removed flag fails here, not for the first
user who copies it), an `adapt eval` line's flags and key=value overrides build its EvalConfig, and every recipe
launch line's config and overrides load."""
import subprocess

import re
import shlex

import pytest

from adapt import cli, config
from conftest import ROOT


def doc_commands() -> list[str]:
    """Shell lines of the ```bash blocks of every tracked Markdown file: continuations joined, comments dropped."""
    files = subprocess.run(["git", "ls-files", "*.md"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    text = "\n".join((ROOT / f).read_text() for f in files)
    lines = []
    for block in re.findall(r"```bash\n(.*?)```", text, re.S):
        joined = re.sub(r"\\\n\s*", " ", block)
        for line in joined.splitlines():
            line = line.split("  #")[0].strip()  # a trailing comment is set off by two spaces in the README
            if line and not line.startswith("#"):
                lines.append(line)
    return lines


COMMANDS = doc_commands()
ADAPT = [c for c in COMMANDS if c.startswith("adapt ") and "..." not in c]


def test_the_readme_has_the_commands_this_test_checks():
    assert len(ADAPT) >= 8 and any(c.startswith("accelerate launch") for c in COMMANDS)
    assert {shlex.split(c)[1 if not c.startswith("adapt --") else 3] for c in ADAPT} >= {"sample", "eval", "inspect", "export",
                                                                                           "data", "bench"}


@pytest.mark.parametrize("line", ADAPT, ids=[c[:70] for c in ADAPT])
def test_documented_adapt_command_parses(line):
    argv = shlex.split(line)[1:]
    try:
        a = cli.parse_args(argv)
    except SystemExit as e:  # argparse's way of refusing a flag
        pytest.fail(f"documented command no longer parses ({e}): {line}")
    assert callable(a.func)
    if a.func is cli.cmd_eval:
        cfg = cli.eval_config(a)  # unknown keys and bad values raise ConfigError
        assert cfg.adapter and cfg.out


LAUNCH = [c for c in COMMANDS if c.startswith("accelerate launch") and "recipes/lora_img2img.py" in c]


@pytest.mark.parametrize("line", LAUNCH, ids=[c[-70:] for c in LAUNCH])
def test_documented_recipe_launch_loads_its_config(line):
    args = shlex.split(line)
    rest = args[args.index("recipes/lora_img2img.py") + 1:]
    assert rest[0] == "--config"
    cfg = config.load(config.RunConfig, ROOT / rest[1], [a for a in rest[2:] if "=" in a])
    assert cfg.data.source
