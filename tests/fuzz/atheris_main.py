"""Run one Python harness under atheris: ``python -m tests.fuzz.atheris_main NAME [libFuzzer options] [corpus dirs or files]``.

pgmp's modules are imported inside atheris.instrument_imports, so their branches
guide the fuzzer; options and arguments are libFuzzer's (files instead of
directories replay those inputs once each). scripts/fuzz is the usual way in.
"""
import importlib
import sys

import atheris


def main() -> None:
    if len(sys.argv) < 2:
        sys.exit("usage: python -m tests.fuzz.atheris_main HARNESS [libFuzzer arguments]")
    name = sys.argv[1]
    with atheris.instrument_imports(include=["pgmp"]):
        harness = importlib.import_module(f"tests.fuzz.harnesses.{name}")
    atheris.Setup([sys.argv[0]] + sys.argv[2:], harness.one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
