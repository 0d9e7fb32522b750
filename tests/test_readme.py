"""Every command in the README works as written: the ones it times in seconds run here, in a scratch copy of the repository
layout (outputs stay out of the checkout), the others are checked for valid options without running them."""
import os, re, shlex, subprocess, sys
from pathlib import Path
import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent/"shared"
README = (ROOT/"README.md").read_text()
QUICK = re.compile(r"\[~?\d+(\.\d+)? s\]")        # "[~15 s]": run as written


def readme_blocks(lang: str) -> list:
    "The README's fenced blocks of one language, in order."
    return re.findall(rf"```{lang}\n(.*?)```", README, flags=re.S)


def readme_commands() -> list:
    "(command, comment) of every line of every bash block; backslash continuations joined."
    out = []
    for block in readme_blocks("bash"):
        for line in block.replace("\\\n", " ").splitlines():
            if not line.strip() or line.lstrip().startswith("#"): continue
            cmd = line[: line.index(" # ")] if " # " in line else line     # the comment starts at the first " # "
            out.append((cmd.strip(), line[len(cmd):].strip()))
    return out


COMMANDS = readme_commands()


def test_readme_commands_found_and_timed():
    assert len(COMMANDS) >= 40, f"only {len(COMMANDS)} commands found: has the README's layout changed?"
    untimed = [c for c, note in COMMANDS if not re.search(r"\[[^\]]+\]", note)]
    assert not untimed, f"README commands without a time estimate in brackets: {untimed}"
    assert sum(bool(QUICK.search(n)) for _, n in COMMANDS) >= 15


@pytest.fixture(scope="module")
def sandbox(tmp_path_factory):
    "A scratch folder laid out like the checkout (links to its code, notebooks, data manifests and ../shared)."
    top = tmp_path_factory.mktemp("readme")
    repo = top/"repo"; repo.mkdir()
    for name in (".venv", "nbs", "benchmarks", "data_manifests", "rs_prompt_lab", "Makefile", "requirements", "settings.ini", "setup.py"):
        if (ROOT/name).exists(): (repo/name).symlink_to(ROOT/name)
    if SHARED.exists(): (top/"shared").symlink_to(SHARED)
    return repo


def _env():
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", MPLBACKEND="Agg", OMP_NUM_THREADS="1")
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"
    return env


def _check_without_running(cmd: str, repo: Path):
    "Options of a command that is too long (or needs files or a GPU) to run here."
    argv = shlex.split(cmd)
    while "=" in argv[0] and not argv[0].startswith(("/", ".")): argv = argv[1:]     # VAR=value prefixes
    prog = argv[0]
    if prog == "make":
        r = subprocess.run(["make", "-n", *argv[1:]], cwd=ROOT, capture_output=True, text=True, env=_env())
        assert r.returncode == 0, f"{cmd}: {r.stderr}"
    elif prog.endswith(("rs-lab", "torchrun")):
        from rs_prompt_lab.cli import parse_command
        rest = argv[argv.index("rs_prompt_lab.cli") + 1:] if prog.endswith("torchrun") else argv[1:]
        try: parse_command(rest)
        except SystemExit as e: pytest.fail(f"README command {cmd!r} has invalid options (argparse exit {e.code})")
    elif prog.endswith("papermill"):
        from rs_prompt_lab.reproduce import notebook_parameters
        decl = notebook_parameters(ROOT/argv[1])
        keys = [argv[i + 1] for i, t in enumerate(argv) if t == "-p"]
        bad = [k for k in keys if k not in decl]
        assert not bad, f"{cmd}: {bad} are not parameters of {argv[1]}"
    elif prog.startswith("benchmarks/"):
        script = ROOT/prog
        assert script.exists() and os.access(script, os.X_OK), f"{cmd}: {prog} missing or not executable"
        assert all(f"{a})" in script.read_text() or f"{a}|" in script.read_text() for a in argv[1:]), f"{cmd}: unknown lane {argv[1:]}"
    else:
        pytest.fail(f"README command {cmd!r}: no check for {prog!r}; teach tests/test_readme.py about it")


def test_readme_slow_commands_have_valid_options(sandbox):
    "The commands too long (or needing files or a GPU) to run here: options, notebooks, parameters, scripts and lanes exist."
    slow = [cmd for cmd, note in COMMANDS if not QUICK.search(note)]
    assert len(slow) >= 20
    for cmd in slow: _check_without_running(cmd, sandbox)


def test_readme_commands_work_as_written(sandbox):
    "Quick commands run in order (later ones read what earlier ones wrote)."
    if not SHARED.exists() and os.environ.get("CI") != "true": pytest.skip("needs ../shared/data beside the checkout")
    ran, failed = 0, []
    for cmd, note in COMMANDS:
        if not QUICK.search(note): continue
        r = subprocess.run(cmd, shell=True, cwd=sandbox, capture_output=True, text=True, env=_env(), timeout=600)
        ran += 1
        allowed = {0, *map(int, re.findall(r"\bexits (\d+)", note))}     # "... and exits 1": a documented exit code
        if r.returncode not in allowed: failed.append(f"{cmd}\n  exit {r.returncode}: {(r.stderr.strip() or r.stdout.strip()).splitlines()[-1:]}")
    assert not failed, "README commands that fail as written:\n" + "\n".join(failed)
    assert ran >= 15
    assert (sandbox/"runs"/"one"/"report.html").exists(), "rs-lab report runs/one wrote no report"
    assert not (sandbox/"scene.npz").exists(), "README commands must write under runs/, not the repository root"


def test_readme_python_snippet_runs(sandbox):
    if not SHARED.exists() and os.environ.get("CI") != "true": pytest.skip("needs ../shared/data beside the checkout")
    (snippet,) = readme_blocks("python")
    r = subprocess.run([sys.executable, "-c", snippet], cwd=sandbox, capture_output=True, text=True, env=_env(), timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "houston2013-pixelset: 1 x 2832 px" in r.stdout
