"""Running ``steer`` in-process in the bad-input tests."""

from __future__ import annotations

from steer import cli


def fails(capsys, argv: list[str], *needles: str) -> str:
    """Run ``steer argv`` in-process: status 2, one ``error:`` line holding every needle, no traceback."""
    code = cli.main(argv)
    out, err = capsys.readouterr()
    assert code == 2, f"exit status {code} for {argv}\nstdout: {out}\nstderr: {err}"
    assert "Traceback" not in out + err, err
    lines = [line for line in err.splitlines() if ": error: " in line]
    assert len(lines) == 1, err
    line = lines[0]
    assert line.startswith("steer "), line
    for needle in needles:
        assert needle in line, f"{needle!r} not in {line!r}"
    return line


def never_load(monkeypatch) -> None:
    """Make any model load fail loudly: the checks must come first."""
    import steer.models

    def boom(*args, **kwargs):
        raise AssertionError("a model was loaded before the inputs were checked")

    monkeypatch.setattr(steer.models, "load_causal_lm", boom)
