"""The man pages and the systemd unit: complete, current, and clean for groff and systemd-analyze."""
import inspect
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import typer

import pgmp
import pgmp.cli
import pgmp.manpage
import pgmp.master
from pgmp.config import SCHEMA
from tests.support.haproxy import documented_config, find_haproxy

ROOT = Path(__file__).resolve().parents[2]
MAN1 = ROOT / "man" / "pgmp.1"
MAN5 = ROOT / "man" / "pgmp.toml.5"
MAN7 = ROOT / "man" / "pgmp-ha.7"
README = ROOT / "README.md"
UNIT = ROOT / "scripts" / "pgmp.service"


def section(page: Path, name: str) -> str:
    """The roff source of one .SH section (up to the next .SH)."""
    text = page.read_text()
    m = re.search(rf"^\.SH {re.escape(name)}\n(.*?)(?=^\.SH |\Z)", text, re.S | re.M)
    assert m, f"{page.name} has no .SH {name} section"
    return m.group(1)


def plain(roff: str) -> str:
    """Roff source with the escapes these pages use undone, enough for a text search."""
    return re.sub(r"\\f[BIRP]", "", roff).replace("\\-", "-").replace("\\&", "")


# ---------------------------------------------------------------- pgmp.toml(5)

def test_every_setting_is_in_pgmp_toml_5():
    text = MAN5.read_text()
    missing = sorted({s.name for s in SCHEMA if f"\n.B {s.name}\n" not in text})
    assert not missing, f"settings missing from {MAN5.name}: {missing}; run `python -m pgmp.manpage`"


def test_pgmp_toml_5_is_generated_from_the_schema():
    assert MAN5.read_text() == pgmp.manpage.render(), (
        f"{MAN5.relative_to(ROOT)} is out of date with pgmp/config.py's SCHEMA: "
        f"regenerate it with `python -m pgmp.manpage` (from {ROOT}) and commit the result")


def test_pgmp_toml_5_settings_sections_in_schema_order():
    text = MAN5.read_text()
    for sec in ("pgmp", "databases", "users"):
        names = [s.name for s in SCHEMA if s.section == sec]
        body = text.split(f'.SS "[{sec}', 1)[1].split(".SS", 1)[0] if sec != "pgmp" else \
            text.split('.SS "[pgmp]"', 1)[1].split(".SS", 1)[0]
        found = re.findall(r"^\.B (\S+)$", body, re.M)
        assert found == names, sec


# ---------------------------------------------------------------- groff

@pytest.mark.parametrize("page", [MAN1, MAN5, MAN7], ids=lambda p: p.name)
def test_page_renders_without_warnings(page):
    if shutil.which("groff") is None:
        pytest.skip("groff is not installed")
    result = subprocess.run(["groff", "-man", "-ww", "-z", str(page)], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stderr == "", f"groff warnings for {page.name}:\n{result.stderr}"


def test_generated_page_renders_without_warnings(tmp_path):
    """Also what render() produces now, in case the committed file is stale."""
    if shutil.which("groff") is None:
        pytest.skip("groff is not installed")
    page = tmp_path / "pgmp.toml.5"
    page.write_text(pgmp.manpage.render())
    result = subprocess.run(["groff", "-man", "-ww", "-z", str(page)], capture_output=True, text=True,
                            timeout=60)
    assert (result.returncode, result.stderr) == (0, "")


# ---------------------------------------------------------------- pgmp(1)

def cli_commands() -> list[str]:
    """Every visible command of the typer app, as the operator types it ("start", "config check")."""
    names = []
    for cmd in pgmp.cli.app.registered_commands:
        if not cmd.hidden:
            names.append(cmd.name or cmd.callback.__name__.replace("_", "-"))
    for group in pgmp.cli.app.registered_groups:
        for cmd in group.typer_instance.registered_commands:
            if not cmd.hidden:
                names.append(f"{group.name} {cmd.name or cmd.callback.__name__}")
    return names


def test_cli_commands_are_the_expected_ones():
    top = {n for n in cli_commands() if " " not in n}
    assert {"start", "stop", "reload", "restart", "status", "stats"} <= top


def test_pgmp_1_documents_every_command():
    synopsis, commands = plain(section(MAN1, "SYNOPSIS")), section(MAN1, "COMMANDS")
    missing_synopsis = [n for n in cli_commands() if f".B pgmp {n}\n" not in synopsis]
    assert not missing_synopsis, f"pgmp(1) SYNOPSIS lacks: {missing_synopsis}"
    missing = [n for n in cli_commands() if not re.search(rf"^\.B {n}( |$)", commands, re.M)]
    assert not missing, f"pgmp(1) COMMANDS lacks an entry for: {missing}"


def test_pgmp_1_documents_every_option():
    """Each visible long option of each command is on the page (synopsis or OPTIONS)."""
    page = plain(MAN1.read_text())
    for cmd in pgmp.cli.app.registered_commands:
        for param in inspect.signature(cmd.callback).parameters.values():
            info = param.default
            if getattr(info, "hidden", False) or isinstance(info, typer.models.ArgumentInfo):
                continue                         # positional arguments are named in SYNOPSIS as words
            decls = [d for d in (getattr(info, "param_decls", None) or ()) if d.startswith("--")]
            if not decls:                        # typer derives --name from the parameter
                decls = [f"--{param.name.replace('_', '-')}"]
                if param.annotation in (bool, "bool") and info.default is True:
                    decls = [f"--no-{param.name.replace('_', '-')}"]
            assert any(d in page for d in decls), f"pgmp(1) lacks {decls} of {cmd.callback.__name__}"


def master_signals() -> list[str]:
    handlers = [name[len("handle_"):] for name, _ in inspect.getmembers(pgmp.master.Master, inspect.isfunction)
                if name.startswith("handle_")]
    return sorted(f"SIG{h.upper()}" for h in handlers if h != "chld")   # SIGCHLD only wakes the loop


def test_master_handles_the_documented_signals():
    assert master_signals() == sorted(["SIGHUP", "SIGTERM", "SIGINT", "SIGQUIT", "SIGUSR2"])


def test_pgmp_1_documents_every_signal():
    signals = section(MAN1, "SIGNALS")
    missing = [s for s in master_signals() if f".B {s}\n" not in signals]
    assert not missing, f"pgmp(1) SIGNALS lacks: {missing}"


def test_pgmp_1_documents_every_environment_variable():
    """Every variable pgmp reads from the environment is in ENVIRONMENT."""
    env = section(MAN1, "ENVIRONMENT")
    names = set()
    for path in Path(pgmp.__file__).parent.rglob("*.py"):
        text = path.read_text()
        names |= set(re.findall(r"""environ(?:\.get)?[\[(]\s*["']([A-Z_][A-Z0-9_]*)["']""", text))
        names |= set(re.findall(r"""getenv\(\s*["']([A-Z_][A-Z0-9_]*)["']""", text))
        names |= set(re.findall(r"""["'](PGMP_[A-Z0-9_]+)["']""", text))      # names kept in constants
    assert {"NOTIFY_SOCKET", "PGMP_IMPL", "PGMP_HEARTBEAT_TIMEOUT"} <= names
    missing = sorted(n for n in names if f".B {n}\n" not in env)
    assert not missing, f"pgmp(1) ENVIRONMENT lacks: {missing}"


def test_pgmp_1_exit_statuses():
    text = section(MAN1, "EXIT STATUS")
    for code in ("0", "1", "3", "4"):
        assert f".B {code}\n" in text


def test_pages_carry_the_version():
    assert f'"pgmp {pgmp.__version__}"' in MAN1.read_text().splitlines()[0]
    assert f'"pgmp {pgmp.__version__}"' in pgmp.manpage.render()
    assert f'"pgmp {pgmp.__version__}"' in MAN7.read_text().splitlines()[0]


# ---------------------------------------------------------------- pgmp-ha(7)

def test_pages_refer_to_pgmp_ha_7():
    for page in (MAN1, MAN5):
        assert ".BR pgmp\\-ha (7)" in section(page, "SEE ALSO"), page.name


def test_haproxy_example_is_the_same_in_readme_and_accepted_by_haproxy(tmp_path):
    """The example an operator copies (README or pgmp-ha(7)) is one text, and haproxy -c accepts it.
    (tests/integration/test_load_balancer.py runs it in front of two pgmp nodes.)"""
    example = documented_config()
    readme = re.search(r"^```haproxy\n(.*?)^```$", README.read_text(), re.S | re.M)
    assert readme, "README.md has no ```haproxy block"
    assert readme.group(1) == example, "README.md's haproxy.cfg differs from pgmp-ha(7)'s"
    binary = find_haproxy()
    if binary is None:
        pytest.skip("haproxy is not installed (run scripts/setup-env)")
    cfg = tmp_path / "haproxy.cfg"
    cfg.write_text(example)
    result = subprocess.run([binary, "-c", "-f", str(cfg)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


# ---------------------------------------------------------------- systemd unit

KNOWN_VERIFY_NOISE = (
    # the unit names the installed path; the test machine runs pgmp from a venv
    re.compile(r"Command /usr/local/bin/pgmp is not executable: No such file or directory"),
    # Documentation=man:... lookups fail where the pages are not installed
    re.compile(r"Command 'man pgmp(\.toml)?\(\d\)' failed with code \d+"),
)


def test_systemd_unit_verifies():
    if shutil.which("systemd-analyze") is None:
        pytest.skip("systemd-analyze is not installed")
    result = subprocess.run(["systemd-analyze", "verify", str(UNIT)], capture_output=True, text=True,
                            timeout=60)
    lines = [l for l in (result.stdout + result.stderr).splitlines() if l.strip()]
    unexpected = [l for l in lines if not any(p.search(l) for p in KNOWN_VERIFY_NOISE)]
    assert not unexpected, "systemd-analyze verify:\n" + "\n".join(lines)


def test_systemd_unit_matches_pgmp():
    unit = UNIT.read_text()
    assert re.search(r"^Type=notify$", unit, re.M)
    assert re.search(r"^ExecStart=\S*pgmp start -c ", unit, re.M)
    assert re.search(r"^ExecReload=\S*pgmp reload -c ", unit, re.M)
    assert re.search(r"^KillSignal=SIGTERM$", unit, re.M)      # graceful, per pgmp(1) SIGNALS
    assert re.search(r"^NotifyAccess=all$", unit, re.M)        # the new master after `pgmp restart`
    stop = int(re.search(r"^TimeoutStopSec=(\d+)$", unit, re.M).group(1))
    shutdown_default = next(s.default for s in SCHEMA if s.name == "shutdown_timeout")
    assert stop > shutdown_default + pgmp.master.KILL_GRACE
