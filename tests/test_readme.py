"""The README's two commands are the ones CI and users run."""
import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _readme_commands():
    text = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```bash\n(.*?)```", text, flags=re.S)
    return [b.strip() for b in blocks]


def test_ci_runs_the_readme_test_command_verbatim():
    cmds = _readme_commands()
    test_cmds = [c for c in cmds if "pytest" in c and c.startswith("pip install")]
    assert len(test_cmds) == 1, f"README must have exactly one install+test command, got {test_cmds}"
    ci = (ROOT / ".ci" / "run").read_text()
    assert test_cmds[0] in ci.splitlines(), ".ci/run must run the README test command verbatim"


def test_readme_main_command_installs_and_samples():
    cmds = _readme_commands()
    assert cmds, "README has no bash blocks"
    main = cmds[0]
    assert main.startswith("pip install") and "unclip sample" in main
