"""Check the files a configuration names (auth_file, hba_file, TLS certificates and keys).

The master and the CLI run this before any worker needs the files, so a
broken one is refused at start or reload with a message naming it, instead
of failing in a worker.
"""
import os
import stat

from pgmp import tls
from pgmp.auth.authfile import AuthFileError, load_auth_file
from pgmp.hba import HbaError, load_hba


MOCK_SECRET_MIN = 32


class FileCheckError(Exception):
    """A file named by the configuration cannot be used; the message says which and why."""


def read_mock_secret(path: str) -> bytes:
    """auth_mock_secret_file's bytes; FileCheckError unless it is a private file of 32 bytes or more."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise FileCheckError(f"{path}: auth_mock_secret_file must be a regular file")
        if st.st_mode & 0o077:
            raise FileCheckError(f"{path}: auth_mock_secret_file is readable by group or others "
                                 f"(mode {stat.S_IMODE(st.st_mode):04o}): chmod 600 {path}")
        data = os.read(fd, 4096)
    finally:
        os.close(fd)
    if len(data) < MOCK_SECRET_MIN:
        raise FileCheckError(f"{path}: auth_mock_secret_file has {len(data)} bytes, at least {MOCK_SECRET_MIN} "
                             f"are needed: head -c 32 /dev/urandom > {path}")
    return data


def check_files(cfg) -> list[str]:
    """One summary line per file checked; raises FileCheckError on the first unusable one."""
    lines = []
    try:
        if cfg.auth_file:
            users = load_auth_file(cfg.auth_file, cfg.auth_max_iterations)
            lines.append(f"{cfg.auth_file}: {len(users)} users")
        if cfg.auth_mock_secret_file:
            lines.append(f"{cfg.auth_mock_secret_file}: {len(read_mock_secret(cfg.auth_mock_secret_file))} bytes")
        if cfg.hba_file:
            rules = load_hba(cfg.hba_file)
            lines.append(f"{cfg.hba_file}: {len(rules.rules)} rules")
        if tls.for_clients(cfg) is not None:
            lines.append(f"client TLS: {cfg.client_tls_mode}, certificate {cfg.client_tls_cert_file}")
        if tls.for_servers(cfg) is not None:
            lines.append(f"server TLS: {cfg.server_tls_mode}")
    except (AuthFileError, HbaError, tls.TlsConfigError) as exc:
        raise FileCheckError(str(exc)) from None
    except OSError as exc:
        raise FileCheckError(f"{exc.filename or 'a configured file'}: {exc.strerror or exc}") from None
    return lines
