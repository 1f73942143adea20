from tests.fixtures.cli import run_cli


def test_version_and_help():
    proc = run_cli("--version")
    assert proc.returncode == 0 and "0.1.0" in proc.stdout
    proc = run_cli("--help")
    assert proc.returncode == 0 and "Usage" in proc.stdout


def test_unknown_command_is_a_clear_error():
    proc = run_cli("no-such-command")
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr
    assert "no-such-command" in proc.stderr
