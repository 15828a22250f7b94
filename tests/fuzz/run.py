"""Build and run the fuzz harnesses, report what each did, keep the inputs that crash: the engine behind scripts/fuzz.

    python -m tests.fuzz.run [--seconds N] [--merge] [harness ...]

Each harness runs N seconds (default 60) with its committed seed corpus
(tests/fuzz/corpus/<harness>/) as input; new inputs the fuzzer finds go to a scratch
directory (tests/fuzz/.work/scratch/<harness>/), and into the committed corpus only with
--merge (libFuzzer's -merge=1: just the ones that add coverage). An input that crashes
is saved as tests/fuzz/crashes/<harness>-<hash> and the run exits 1. The smoke test
(tests/fuzz/test_fuzz_smoke.py) uses the same functions for its few seconds each.
"""
from __future__ import annotations

import argparse
import hashlib
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

FUZZ_DIR = Path(__file__).resolve().parent
REPO_ROOT = FUZZ_DIR.parents[1]
CORPUS_DIR = FUZZ_DIR / "corpus"
CRASH_DIR = FUZZ_DIR / "crashes"
DICT_DIR = FUZZ_DIR / "dict"
WORK_DIR = FUZZ_DIR / ".work"
OPEN_BUGS = CRASH_DIR / "OPEN"

C_HARNESS = "scan"
C_SOURCES = [REPO_ROOT / "csrc" / "fuzz_scan.c", REPO_ROOT / "csrc" / "pgmp_scan.c", REPO_ROOT / "csrc" / "pgmp_relay.c"]
C_MAX_LEN = 65536
CFLAGS = ["-fsanitize=fuzzer,address,undefined", "-fno-sanitize-recover=all", "-g", "-O1",
          "-Wall", "-Wextra", "-Werror"]
SANITIZER_ENV = {"ASAN_OPTIONS": "abort_on_error=1:detect_leaks=1:allocator_may_return_null=1",
                 "UBSAN_OPTIONS": "halt_on_error=1:print_stacktrace=1"}
# Python harnesses: tests/fuzz/harnesses/<name>.py
PYTHON_HARNESSES = ("startup", "frontend", "sql", "messages", "server_auth", "client_auth", "hba",
                    "authfile", "config", "link", "scanner")
HARNESSES = (C_HARNESS,) + PYTHON_HARNESSES
INPUT_TIMEOUT = 10          # seconds one input may take before it counts as a hang
ARTIFACT_PREFIXES = ("crash-", "leak-", "timeout-", "oom-")


class FuzzSetupError(RuntimeError):
    """A harness could not be built or started (not a finding)."""


@dataclass
class Result:
    harness: str
    seconds: float
    execs: int | None
    exec_per_s: int | None
    cov: int | None
    ft: int | None
    corpus: str | None           # libFuzzer's "corp: N/size" at the end
    crash: Path | None           # the saved input, when the harness crashed
    returncode: int
    log: Path
    new_inputs: int = 0

    @property
    def ok(self) -> bool:
        return self.crash is None and self.returncode == 0

    def line(self) -> str:
        def num(v):
            return "?" if v is None else f"{v:,}"
        text = (f"{self.harness:12} {num(self.execs):>13} execs  {num(self.exec_per_s):>9} exec/s  "
                f"cov {num(self.cov):>6}  ft {num(self.ft):>6}  corpus {self.corpus or '?'}  "
                f"new {self.new_inputs}  {self.seconds:.0f} s")
        if self.crash is not None:
            text += f"  CRASH: input saved as {self.crash.relative_to(REPO_ROOT)}"
        elif self.returncode:
            text += f"  FAILED (exit {self.returncode}; log {self.log})"
        return text


# ---- building and commands ---------------------------------------------------------

def clang() -> str:
    path = shutil.which("clang")
    if path is None:
        raise FuzzSetupError("clang is not installed: run scripts/fuzz or scripts/test (scripts/setup-env "
                             "installs it), or apt-get install clang libclang-rt-14-dev")
    return path


def build_c_harness(work: Path = WORK_DIR) -> Path:
    """csrc/fuzz_scan.c + pgmp_scan.c + pgmp_relay.c with libFuzzer, ASan and UBSan; rebuilt when a source changed."""
    binary = work / "build" / "fuzz_scan"
    headers = [REPO_ROOT / "csrc" / h for h in ("pgmp_scan.h", "pgmp_relay.h", "pgmp_frame.h")]
    stamp = hashlib.sha256(b"".join(p.read_bytes() for p in C_SOURCES + headers)
                           + " ".join(CFLAGS).encode()).hexdigest()
    stamp_file = binary.with_suffix(".stamp")
    if binary.exists() and stamp_file.exists() and stamp_file.read_text() == stamp:
        return binary
    binary.parent.mkdir(parents=True, exist_ok=True)
    cmd = [clang(), *CFLAGS, "-I", str(REPO_ROOT / "csrc"), *map(str, C_SOURCES), "-o", str(binary)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode:
        raise FuzzSetupError(f"building the C harness failed:\n{' '.join(cmd)}\n{done.stderr}")
    stamp_file.write_text(stamp)
    return binary


def max_len(harness: str) -> int:
    if harness == C_HARNESS:
        return C_MAX_LEN
    m = re.search(r"^MAX_LEN = (\d+)", (FUZZ_DIR / "harnesses" / f"{harness}.py").read_text(), re.M)
    return int(m[1]) if m else 4096


def dictionary(harness: str, work: Path = WORK_DIR) -> Path | None:
    """tests/fuzz/dict/<harness>.dict; for config, one written from the settings schema."""
    if harness == "config":
        path = work / "dict" / "config.dict"
        path.parent.mkdir(parents=True, exist_ok=True)
        names = subprocess.run([sys.executable, "-c", "from pgmp.config import describe_settings as d\n"
                                "print('\\n'.join(sorted({s.name for s in d()})))"],
                               capture_output=True, text=True, cwd=REPO_ROOT, env=_env()).stdout.split()
        words = names + ["[pgmp]", "[databases.", "[users.", "[databases.\"*\"]", " = ", "\"\"\"", "'''",
                         "true", "false", "\"1s\"", "\"10MB\"", "\"scram-sha-256\"", "\"transaction\""]
        path.write_text("".join(f'"{_dict_escape(w)}"\n' for w in words))
        return path
    path = DICT_DIR / f"{harness}.dict"
    return path if path.exists() else None


def _dict_escape(word: str) -> str:
    return "".join(c if c.isprintable() and c not in '"\\' else f"\\x{ord(c):02x}" for c in word)


def _env(**extra) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT)] + [p for p in [env.get("PYTHONPATH")] if p])
    env.update(SANITIZER_ENV)
    env.update(extra)
    return env


def command(harness: str, work: Path = WORK_DIR) -> list[str]:
    """The harness's executable and its first arguments (libFuzzer options follow)."""
    if harness == C_HARNESS:
        return [str(build_c_harness(work))]
    if harness not in PYTHON_HARNESSES:
        raise FuzzSetupError(f"unknown harness {harness!r}; harnesses: {', '.join(HARNESSES)}")
    return [sys.executable, "-m", "tests.fuzz.atheris_main", harness]


# ---- running -----------------------------------------------------------------------

_STAT = re.compile(r"^stat::(\w+):\s+(\d+)", re.M)
_STATUS = re.compile(r"^#(\d+)\s+\w+\s+cov: (\d+) ft: (\d+) corp: (\S+)", re.M)


def run_harness(harness: str, seconds: float, *, work: Path = WORK_DIR, merge: bool = False,
                crash_dir: Path = CRASH_DIR, extra: list[str] | None = None) -> Result:
    """Fuzz one harness for ``seconds``; a crashing input is moved to ``crash_dir``."""
    scratch = work / "scratch" / harness
    artifacts = work / "artifacts" / harness
    logs = work / "logs"
    for d in (scratch, artifacts, logs):
        d.mkdir(parents=True, exist_ok=True)
    for old in artifacts.iterdir():
        old.unlink()
    corpus = CORPUS_DIR / harness
    before = set(os.listdir(scratch))
    opts = [f"-max_total_time={max(1, int(seconds))}", "-print_final_stats=1", f"-timeout={INPUT_TIMEOUT}",
            f"-max_len={max_len(harness)}", f"-artifact_prefix={artifacts}/", "-rss_limit_mb=2048"]
    d = dictionary(harness, work)
    if d is not None:
        opts.append(f"-dict={d}")
    cmd = command(harness, work) + opts + (extra or []) + [str(scratch)] + ([str(corpus)] if corpus.is_dir() else [])
    log = logs / f"{harness}.log"
    started = time.monotonic()
    with open(log, "wb") as out:
        # libFuzzer stops itself at max_total_time; the margin covers loading and a last slow input
        try:
            rc = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=REPO_ROOT, env=_env(),
                                timeout=seconds + 120).returncode
        except subprocess.TimeoutExpired:
            rc = -9
    elapsed = time.monotonic() - started
    text = log.read_text(errors="replace")
    result = _parse(harness, text, rc, elapsed, log)
    result.new_inputs = len(set(os.listdir(scratch)) - before)
    result.crash = _keep_crash(harness, artifacts, crash_dir)
    if merge and result.ok and corpus.is_dir():
        merge_corpus(harness, work)
    return result


def _parse(harness: str, text: str, rc: int, elapsed: float, log: Path) -> Result:
    stats = dict(_STAT.findall(text))
    status = _STATUS.findall(text)
    cov = ft = corp = None
    if status:
        _, cov, ft, corp = status[-1]
    execs = int(stats["number_of_executed_units"]) if "number_of_executed_units" in stats else None
    rate = int(stats["average_exec_per_sec"]) if "average_exec_per_sec" in stats else None
    return Result(harness, elapsed, execs, rate, int(cov) if cov else None, int(ft) if ft else None,
                  corp, None, rc, log)


def _keep_crash(harness: str, artifacts: Path, crash_dir: Path) -> Path | None:
    found = sorted(p for p in artifacts.iterdir() if p.name.startswith(ARTIFACT_PREFIXES))
    kept = None
    for path in found:
        data = path.read_bytes()
        kind = path.name.split("-", 1)[0]
        name = f"{harness}-{hashlib.sha1(data).hexdigest()[:16]}" + ("" if kind == "crash" else f"-{kind}")
        crash_dir.mkdir(parents=True, exist_ok=True)
        kept = crash_dir / name
        kept.write_bytes(data)
        path.unlink()
    return kept


def merge_corpus(harness: str, work: Path = WORK_DIR) -> None:
    """Add to the committed corpus the scratch inputs that reach new coverage (libFuzzer -merge=1)."""
    corpus = CORPUS_DIR / harness
    cmd = command(harness, work) + ["-merge=1", f"-max_len={max_len(harness)}", str(corpus),
                                    str(work / "scratch" / harness)]
    subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=REPO_ROOT, env=_env(),
                   check=True)


def replay(harness: str, inputs: list[Path], work: Path = WORK_DIR) -> tuple[bool, str]:
    """Run each input through the harness once, open-bug guards off: (passed, output)."""
    cmd = command(harness, work) + [f"-timeout={INPUT_TIMEOUT}", "-runs=1"] + [str(p) for p in inputs]
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO_ROOT, timeout=300,
                          env=_env(PGMP_FUZZ_NO_GUARDS="1"))
    return done.returncode == 0, done.stdout + done.stderr


def open_bugs() -> dict[str, str]:
    """tests/fuzz/crashes/OPEN: kept inputs of bugs not fixed yet, "<file>  <what>" a line."""
    if not OPEN_BUGS.exists():
        return {}
    out = {}
    for line in OPEN_BUGS.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            name, _, what = line.partition(" ")
            out[name] = what.strip()
    return out


def kept_crashes() -> list[Path]:
    if not CRASH_DIR.is_dir():
        return []
    return sorted(p for p in CRASH_DIR.iterdir() if p.is_file() and p.name.split("-", 1)[0] in HARNESSES)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="scripts/fuzz", description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=60, help="how long each harness runs (default 60)")
    parser.add_argument("--merge", action="store_true",
                        help="add new inputs that reach new coverage to the committed corpus")
    parser.add_argument("harness", nargs="*", help=f"harnesses to run (default: all of {', '.join(HARNESSES)})")
    args = parser.parse_args(argv)
    names = args.harness or list(HARNESSES)
    unknown = [n for n in names if n not in HARNESSES]
    if unknown:
        parser.error(f"unknown harness {', '.join(unknown)}; harnesses: {', '.join(HARNESSES)}")
    failed = False
    for name in names:
        try:
            result = run_harness(name, args.seconds, merge=args.merge)
        except FuzzSetupError as exc:
            print(f"{name}: {exc}", file=sys.stderr)
            return 2
        print(result.line(), flush=True)
        if not result.ok:
            failed = True
            print(_tail(result.log), file=sys.stderr)
    return 1 if failed else 0


def _tail(log: Path, lines: int = 40) -> str:
    text = log.read_text(errors="replace").splitlines()
    keep = [line for line in text if not line.startswith(("INFO: Instrumenting", '"'))]
    return "\n".join(keep[-lines:])


if __name__ == "__main__":
    sys.exit(main())
