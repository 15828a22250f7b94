"""Check the files a configuration names (auth_file, hba_file, TLS certificates and keys).

The master and the CLI run this before any worker needs the files, so a
broken one is refused at start or reload with a message naming it, instead
of failing in a worker.
"""
from pgmp import tls
from pgmp.auth.authfile import AuthFileError, load_auth_file
from pgmp.hba import HbaError, load_hba


class FileCheckError(Exception):
    """A file named by the configuration cannot be used; the message says which and why."""


def check_files(cfg) -> list[str]:
    """One summary line per file checked; raises FileCheckError on the first unusable one."""
    lines = []
    try:
        if cfg.auth_file:
            users = load_auth_file(cfg.auth_file)
            lines.append(f"{cfg.auth_file}: {len(users)} users")
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
