"""Errors that carry an SQLSTATE, so the IO loop can answer them with an ErrorResponse."""

# SQLSTATEs pgmp sends itself; the codes are PostgreSQL's own.
PROTOCOL_VIOLATION = "08P01"
CONNECTION_FAILURE = "08006"
INVALID_AUTHORIZATION = "28000"
INVALID_PASSWORD = "28P01"
INVALID_CATALOG_NAME = "3D000"
TOO_MANY_CONNECTIONS = "53300"
CONFIGURATION_LIMIT_EXCEEDED = "53400"
PROGRAM_LIMIT_EXCEEDED = "54000"
ADMIN_SHUTDOWN = "57P01"
FEATURE_NOT_SUPPORTED = "0A000"
QUERY_CANCELED = "57014"
CANNOT_CONNECT_NOW = "57P03"
READ_ONLY_SQL_TRANSACTION = "25006"
INTERNAL_ERROR = "XX000"


class PgmpError(Exception):
    """An error to report to a client as an ErrorResponse.

    ``severity`` is FATAL when the connection must end after the report.
    """

    def __init__(self, sqlstate: str, message: str, *, severity: str = "FATAL",
                 detail: str | None = None, hint: str | None = None):
        super().__init__(message)
        self.sqlstate = sqlstate
        self.message = message
        self.severity = severity
        self.detail = detail
        self.hint = hint


class ClientProtocolError(PgmpError):
    """The client broke the protocol (its fault): 08P01 unless told otherwise."""

    def __init__(self, message: str, sqlstate: str = PROTOCOL_VIOLATION, **kw):
        super().__init__(sqlstate, message, **kw)


class ServerProtocolError(PgmpError):
    """The server (or whatever answered on its port) broke the protocol."""

    def __init__(self, message: str, sqlstate: str = CONNECTION_FAILURE, **kw):
        super().__init__(sqlstate, message, **kw)


class AuthenticationFailed(PgmpError):
    """A client failed to authenticate; ``reason`` is for the log, never for the client."""

    def __init__(self, message: str, reason: str, sqlstate: str = INVALID_PASSWORD):
        super().__init__(sqlstate, message)
        self.reason = reason
