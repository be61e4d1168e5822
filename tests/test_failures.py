"""The error plumbing's one lines, found wanting by a review: secrets in URLs the pattern misses,
errors of the file system that gave tracebacks, a usage error replaced by another, MLflow's retry
lines and torch's exit lines on stderr. Oracles: the strings themselves, ``os`` errors raised for
real, the CLI's own stderr."""

from __future__ import annotations

import errno
import logging
import os

import pytest

from wavesweep import cli, failures
from wavesweep import redact as redact_mod


@pytest.fixture
def passwords(monkeypatch):
    """A fresh set of remembered passwords (the module's is process-wide)."""
    monkeypatch.setattr(redact_mod, "_PASSWORDS", set())


@pytest.mark.parametrize("url, secret", [
    ("postgresql://user:pa/ss-7f3@127.0.0.1:1/db", "pa/ss-7f3"),  # a '/' in the password
    ("postgresql://user:pa/ss-7f3@db.example:54x2/optuna", "pa/ss-7f3"),  # a URL SQLAlchemy cannot parse (its port)
    ("postgresql+psycopg://u:q'uo\"te 7f3@h/db", "q'uo\"te 7f3"),
    ("postgresql://user@127.0.0.1:1/optuna?password=two w0rds-9q", "two w0rds-9q"),  # a query value with a space
    ("postgresql://user@h/o?sslpassword=qu'ote and 9q&x=1", "qu'ote and 9q"),
    ("http://u:p w-9q@host:5000", "p w-9q"),
])  # fmt: skip
def test_a_urls_secrets_are_hidden_wherever_the_url_is_shown(passwords, url, secret):
    """``remember_url_credentials`` reads the password as a driver does (up to the first ``@``) and
    ``password=``-style query values whole; the URL pattern alone left part or all of them visible."""
    assert secret in redact_mod.redact(f"storage '{url}'") or "=" in url  # the pattern alone misses it (query: partly)
    redact_mod.remember_url_credentials(url)
    for shown in (f"storage '{url}' is not a database URL", f"starting the MLflow UI on {url} (1 worker)"):
        out = redact_mod.redact(shown)
        assert secret not in out and "***" in out, out
        assert all(part not in out for part in secret.split() if len(part) > 3), out
    assert redact_mod._PASSWORDS  # remembered: what the pattern hides whole is not (ordinary words stay)


def test_ordinary_passwords_are_left_to_the_pattern(passwords):
    redact_mod.remember_url_credentials("postgresql://u:plainsecret@h/db?password=other&sslmode=require")
    assert redact_mod._PASSWORDS == set()
    assert redact_mod.redact("postgresql://u:plainsecret@h/db?password=other") == "postgresql://u:***@h/db?password=***"


def test_an_error_is_redacted_before_it_is_capped(passwords):
    """A URL cut off inside its password has no '@' left for the pattern: capped first, the start
    of the password was printed."""
    exc = ValueError("x" * (failures.MAX_ERROR_CHARS - 30) + " postgresql://user:s3cretpassword-long@db/optuna")
    for text in (failures.one_line(exc), failures.error_text(exc)):
        assert "s3cret" not in text and "more characters)" in text, text[-120:]


def test_permission_denied_and_a_file_in_a_folders_place_are_one_line(tmp_path, monkeypatch):
    """EACCES (a folder of another user) and a file where the store's folder should be gave tracebacks."""
    monkeypatch.setenv("WAVESWEEP_CACHE", str(tmp_path / "cache"))
    denied = PermissionError(errno.EACCES, "Permission denied", str(tmp_path / "ro" / "mlflow.db.lock"))
    assert failures.environment_error(RuntimeError("wrapped")) is None
    chained = RuntimeError("opening the store")
    chained.__cause__ = denied
    assert failures.environment_error(chained) == (
        f"permission denied on {str(tmp_path / 'ro' / 'mlflow.db.lock')!r}: give yourself access to it, or put the "
        "store in a folder you may write")  # fmt: skip
    afile = tmp_path / "afile"
    afile.write_text("x")
    with pytest.raises(FileExistsError) as info:  # what mkdir gives for a file in a folder's place
        os.makedirs(afile, exist_ok=True)
    assert failures.environment_error(info.value) == (
        f"{str(afile)!r} is a file where a folder is needed: move it away, or put the store elsewhere")
    assert failures.environment_error(FileExistsError(errno.EEXIST, "File exists", str(tmp_path))) is None  # a folder: not this


def test_mlflows_retries_of_a_database_it_cannot_reach_are_one_line():
    """MLflow logs each of its ten tries (about 101 s of waits) in four lines: the first is said once, the
    rest dropped; other lines of the logger pass."""
    flt = cli._FirstRetryOnly()
    err = RuntimeError("(sqlite3.OperationalError) unable to open database file\n(Background on this error at: ...)")

    def record(msg, *args):
        return logging.LogRecord("mlflow.store.db.utils", logging.WARNING, __file__, 1, msg, args, None)

    retry = "SQLAlchemy engine could not be created. The following exception is caught.\n%s\nOperation will be retried in %.1f seconds"
    first, second, other = record(retry, err, 0.1), record(retry, err, 0.3), record("something else")
    assert flt.filter(first) and not flt.filter(second) and flt.filter(other)
    assert first.getMessage() == ("the MLflow store does not answer; MLflow tries again for about 101 s (Ctrl-C stops): "
                                  "(sqlite3.OperationalError) unable to open database file")  # fmt: skip


def test_a_usage_error_under_mlflow_run_is_the_line_printed_and_torch_logs_warnings_only(tmp_path, monkeypatch, capsys):
    """``mlflow run``'s run id that the store does not hold: tagging it failed and its error replaced
    the usage error ("Run with id=... not found", the bad wavelet never named). The usage error is
    the one line; the failed tag is a warning before it. torch's loggers are at WARNING (their
    exit hooks' INFO lines followed the "interrupted" line)."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.setenv("MLFLOW_RUN_ID", "0123456789abcdef0123456789abcdef")
    assert cli.main(["trial", "--wavelet", "bior13"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("wavesweep: error: unknown wavelet 'bior13'") and "did you mean" in err[-1], err
    assert all("could not tag run" in line for line in err[:-1]), err
    assert logging.getLogger("torch").level == logging.WARNING
