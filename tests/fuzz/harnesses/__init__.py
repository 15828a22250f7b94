"""The Python fuzz harnesses, one module each: ``one_input(data: bytes)`` raises only on a bug.

A harness catches the errors its target documents (the ones pgmp turns into an
ErrorResponse or a refusal) and lets anything else escape: an escaping exception,
or a failed ``check()``, is a crash. ``MAX_LEN`` is the input size the fuzzer
tries at most.
"""
