"""README's two set-up commands stay the ones CI and the examples actually use."""

import re

from tests.helpers import REPO


def _setup_commands() -> list[str]:
    readme = (REPO / "README.md").read_text()
    section = readme.split("## Set up", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```bash\n(.*?)\n```", section, flags=re.S)


def test_readme_has_exactly_two_setup_commands():
    commands = _setup_commands()
    assert len(commands) == 2 and all("\n" not in c for c in commands)
    assert "ftpipe run examples/quickstart.yaml" in commands[0]
    assert "pytest" in commands[1]


def test_ci_runs_the_readme_test_command():
    ci = (REPO / ".ci" / "run").read_text()
    assert f"TEST_COMMAND='{_setup_commands()[1]}'" in ci


def test_quickstart_command_names_files_that_exist():
    for path in re.findall(r"(examples/\S+\.(?:py|yaml))", _setup_commands()[0]):
        assert (REPO / path).is_file(), path


def test_example_configs_validate():
    from pipeline.config import load_config

    examples = sorted((REPO / "examples").glob("*.yaml"))
    assert examples
    for path in examples:
        load_config(path)
