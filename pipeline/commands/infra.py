"""`moola-pipeline storage check URI` and `moola-pipeline stack up|down|env`.

`storage check` is the storage bootstrap a long run needs first: bucket/prefix created,
credentials proven by a write-read-delete probe. `stack` runs the local development stack
(SeaweedFS S3 + a token-auth Ray head on loopback) and prints what to export to use it.
"""

from __future__ import annotations

import shlex
from pathlib import Path

import click

stack_dir_option = click.option("--dir", "stack_dir", type=click.Path(file_okay=False), default=None,
                                help="State directory (default: $MOOLA_STACK_DIR or "
                                     "~/.cache/moola-pipeline/stack).")


@click.group("storage")
def storage() -> None:
    """Storage bootstrap for runs and data (local path or s3://bucket/prefix)."""


@storage.command("check")
@click.argument("uri")
def check(uri):
    """Create URI's bucket/prefix if needed and prove credentials with a write-read-delete probe."""
    from pipeline.deploy.storage_probe import check_storage

    result = check_storage(uri)
    made = f"; created {result.created}" if result.created else ""
    click.echo(f"ok: {uri} is writable (write, read back, delete: {result.seconds:.2f} s){made}")


@click.group("stack")
def stack() -> None:
    """Local development stack: SeaweedFS S3 and a Ray head on loopback."""


def _dir(stack_dir) -> Path:
    from pipeline.deploy.local_stack import default_dir

    return Path(stack_dir) if stack_dir else default_dir()


def _print_env(stack_dir: Path, state: dict) -> None:
    """The exports on stdout (for eval), then how to use and stop the stack; open ports loudly
    on stderr."""
    from pipeline.deploy.local_stack import command, env_for

    for key, value in env_for(stack_dir, state).items():
        click.echo(f"export {key}={shlex.quote(value)}")
    click.echo(f"# train on it:  moola-pipeline train --address {state['ray_address']} ...")
    click.echo("# submit to it: moola-pipeline submit -- ...   (RAY_ADDRESS is its job server)")
    click.echo(f"# stop it:      {command(stack_dir, 'down')}   (--wipe also deletes the S3 data)")
    for listener in state.get("exposed", []):
        click.secho(f"WARNING: not on loopback, reachable from other machines: {listener}",
                    fg="red", bold=True, err=True)


@stack.command("up")
@click.option("--num-cpus", type=click.IntRange(min=1), default=2, show_default=True,
              help="CPUs the Ray head offers.")
@stack_dir_option
def stack_up(num_cpus, stack_dir):
    """Start the stack in the background and print the environment to export
    (eval "$(moola-pipeline stack up)"), RAY_ADDRESS included; the S3 data of an earlier
    session is served again."""
    from pipeline.deploy.local_stack import start

    d = _dir(stack_dir)
    state = start(d, num_cpus)
    click.echo(f"# local stack running (state in {d})", err=True)
    _print_env(d, state)


@stack.command("env")
@stack_dir_option
def stack_env(stack_dir):
    """Print the variables to export for the running stack."""
    from pipeline.deploy.local_stack import command, read_state
    from pipeline.errors import UserError

    d = _dir(stack_dir)
    state = read_state(d)
    if not state:
        raise UserError(f"no local stack is running from {d}",
                        hint=f"start one: {command(d, 'up')}")
    _print_env(d, state)


@stack.command("down")
@click.option("--wipe", is_flag=True,
              help="Also delete the stack's S3 data, keys and logs (kept by default).")
@stack_dir_option
def stack_down(wipe, stack_dir):
    """Stop the stack (S3 data kept unless --wipe)."""
    from pipeline.deploy.local_stack import stop

    d = _dir(stack_dir)
    was_running = stop(d, wipe=wipe)
    click.echo("local stack stopped" if was_running else f"no local stack was running from {d}")
    if wipe:
        click.echo(f"deleted the stack's data and state in {d}")
